"""Forks: a fork shares its parent's sealed pages (no bytes copied, one copy per tier, moved for
both), copies the open ones, outlives its parent (the copies change owner and a disk copy keeps
its tag), and leaves every frame and slot accounted for."""

from __future__ import annotations

import random

import pytest
import torch

from paged_kv import Engine, PagerError, Policy, Tier

from pager_helpers import append_written, make_pager, new_tag, pattern, read_any_copy, service_some, tier, write_page


def _parent(pager, sealed, open_pages, tags, tenant=3):
    row = pager.add_sequence(tenant=tenant)
    append_written(pager, row, sealed, tags)
    pager.seal(row, sealed - 1)
    if open_pages:
        append_written(pager, row, open_pages, tags, seal_open=False)
    return row


def _check(pager, rows_tags):
    for row, tags in rows_tags.items():
        for page, tag in enumerate(tags):
            assert torch.equal(read_any_copy(pager, row, page), pattern(pager, tag)), (row, page)


def test_fork_shares_sealed_pages_and_copies_open_ones():
    pager = make_pager(frames=8, host=8)
    tags = {}
    parent = _parent(pager, 3, 1, tags)
    free = pager.free_frames()
    child = pager.fork(parent)
    assert pager.tenant(child) == 3 and pager.num_pages(child) == 4
    assert pager.free_frames() == free - 1  # only the open page took a frame
    table = pager.page_table()
    assert torch.equal(table[child, :3], table[parent, :3])
    assert pager.page_info(child, 0)["sharers"] == 2 and pager.page_info(parent, 3)["sharers"] == 1
    assert pager.page_info(child, 3)["frame"] != pager.page_info(parent, 3)["frame"]
    assert not pager.page_info(child, 3)["sealed"]
    _check(pager, {parent: [tags[(parent, p)] for p in range(4)], child: [tags[(parent, p)] for p in range(4)]})
    # The two open pages are apart: writing the child's does not touch the parent's.
    tag = new_tag()
    write_page(pager, child, 3, tag)
    assert torch.equal(read_any_copy(pager, parent, 3), pattern(pager, tags[(parent, 3)]))
    pager.check_invariants()


def test_a_shared_page_moves_for_both():
    pager = make_pager(frames=8, host=8)
    tags = {}
    parent = _parent(pager, 3, 0, tags)
    child = pager.fork(parent)
    pager.demote([(child, 1)], Tier.HOST)
    assert tier(pager, parent, 1) == Tier.HOST and tier(pager, child, 1) == Tier.HOST
    assert pager.usage(3, Tier.HOST) == 1 and pager.usage(3, Tier.GPU) == 2
    assert pager.service([(parent, 1), (child, 1)]) == 1  # one page, listed twice
    assert tier(pager, child, 1) == Tier.GPU
    pager.pin([(child, 0)])
    assert pager.page_info(parent, 0)["pins"] == 1
    with pytest.raises(ValueError, match="is pinned"):
        pager.demote([(parent, 0)], Tier.HOST)
    pager.unpin([(parent, 0)])
    assert pager.page_table()[child, 1] == pager.page_table()[parent, 1]
    pager.check_invariants()


@pytest.mark.parametrize("remove", ["parent", "child"])
def test_a_shared_page_outlives_the_sequence_that_made_it(remove, tmp_path):
    pager = make_pager(frames=8, host=8, disk=8, folder=tmp_path)
    tags = {}
    parent = _parent(pager, 3, 0, tags)
    child = pager.fork(parent)
    grandchild = pager.fork(child)
    pager.demote([(parent, 0)], Tier.DISK)  # a disk copy carrying the parent's tag
    pager.demote([(parent, 1)], Tier.HOST)
    gone, kept = (parent, child) if remove == "parent" else (child, parent)
    pager.remove_sequence(gone)
    pager.check_invariants()
    assert pager.page_info(kept, 0)["sharers"] == 2 and pager.page_info(grandchild, 2)["sharers"] == 2
    want = [tags[(parent, p)] for p in range(3)]
    _check(pager, {kept: want, grandchild: want})
    pager.service([(grandchild, 0), (kept, 1)])  # the disk read checks the tag it was written with
    _check(pager, {kept: want, grandchild: want})
    pager.remove_sequence(kept)
    assert pager.page_info(grandchild, 0)["sharers"] == 1
    _check(pager, {grandchild: want})
    pager.demote([(grandchild, p) for p in range(3)], Tier.DISK)
    pager.service([(grandchild, p) for p in range(3)])
    _check(pager, {grandchild: want})
    pager.remove_sequence(grandchild)
    assert pager.free_frames() == 8 and pager.free_host_slots() == 8 and pager.free_disk_slots() == 8
    pager.check_invariants()


def test_fork_errors():
    pager = make_pager(frames=3, host=4, max_sequences=2)
    tags = {}
    with pytest.raises(ValueError, match="fork: row 0 holds no sequence"):
        pager.fork(0)
    parent = _parent(pager, 1, 2, tags)  # two open pages, one frame free
    with pytest.raises(PagerError, match="fork of sequence 0 .*needs 2 GPU frames"):
        pager.fork(parent)
    pager.seal(parent, 1)
    child = pager.fork(parent)  # nothing open: nothing copied
    with pytest.raises(PagerError, match="all 2 page-table rows hold sequences"):
        pager.fork(child)
    pager.check_invariants()


def test_random_forks_keep_every_page_and_free_everything(tmp_path):
    rng = random.Random(3)
    pager = make_pager(frames=6, host=10, disk=24, folder=tmp_path, max_sequences=8, max_pages=8)
    contents = {}  # row -> tag per page
    for _ in range(400):
        live = list(contents)
        action = rng.random()
        try:
            if action < 0.15 and len(live) < 8:
                row = pager.add_sequence(tenant=1)
                contents[row] = []
            elif action < 0.3 and live and len(live) < 8:
                parent = rng.choice(live)
                child = pager.fork(parent)
                contents[child] = list(contents[parent])
            elif action < 0.4 and live:
                row = rng.choice(live)
                pager.remove_sequence(row)
                del contents[row]
            elif action < 0.65 and live:
                row = rng.choice(live)
                if pager.num_pages(row) < 8:
                    first = pager.append_pages(row, 1)
                    tag = new_tag()
                    write_page(pager, row, first, tag)
                    contents[row].append(tag)
            elif action < 0.85 and live:
                service_some(pager, rng, rng.choice(live))
            elif live:
                row = rng.choice(live)
                sealed = [(row, p) for p in range(pager.num_pages(row)) if pager.page_info(row, p)["sealed"]]
                if sealed:
                    pager.demote(rng.sample(sealed, min(2, len(sealed))), rng.choice([Tier.HOST, Tier.DISK]))
        except PagerError:
            pass  # a full tier; nothing may be lost
        pager.check_invariants()
        _check(pager, contents)
    forked = sum(1 for row in contents for p in range(pager.num_pages(row)) if pager.page_info(row, p)["sharers"] > 1)
    assert forked > 0
    for row in list(contents):
        pager.remove_sequence(row)
    assert pager.free_frames() == 6 and pager.free_host_slots() == 10 and pager.free_disk_slots() == 24
    pager.check_invariants()


def test_engine_fork_grows_apart_exactly():
    """A forked sequence and its parent each take different next tokens; each attends its own
    history exactly (checked against attention over its tokens laid out contiguously)."""
    torch.manual_seed(1)
    heads, dim, page = 2, 64, 16
    page_bytes = 2 * heads * page * dim * 4
    policy = Policy(page_size=page, gpu_budget=6 * page_bytes, host_budget=32 * page_bytes, zero_copy=False)
    with Engine(policy, num_layers=1, num_kv_heads=heads, head_dim=dim, dtype=torch.float32, device="cpu",
                max_sequences=3, max_pages=16) as engine:
        parent = engine.new_sequence(tenant=2)
        prompt_k, prompt_v = torch.randn(5 * page + 7, heads, dim), torch.randn(5 * page + 7, heads, dim)
        engine.append(parent, prompt_k, prompt_v, 0)
        child = engine.fork(parent)
        assert engine.pager.page_info(child, 0)["sharers"] == 2
        keys = {parent: [prompt_k], child: [prompt_k]}
        values = {parent: [prompt_v], child: [prompt_v]}
        for step in range(2 * page):
            for row in (parent, child):
                k, v = torch.randn(1, heads, dim), torch.randn(1, heads, dim)
                engine.append(row, k, v, 0)
                keys[row].append(k)
                values[row].append(v)
                query = torch.randn(1, 4, dim)
                out = engine.attention(query, [row], [0, 1], 0)
                kk, vv = torch.cat(keys[row]), torch.cat(values[row])
                kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)  # GQA: 4 query heads on 2
                scores = torch.einsum("qhd,khd->hqk", query.double(), kk.double()) / dim ** 0.5
                want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv.double())
                torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert engine.stats()["faults_seen"] > 0  # the shared pages were paged in and out
        engine.free_sequence(parent)
        engine.pager.check_invariants()
        engine.free_sequence(child)
        assert engine.pager.free_frames() == engine.num_frames
        assert engine.pager.free_host_slots() == engine.num_host_slots
