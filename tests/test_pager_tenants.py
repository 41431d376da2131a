"""Isolation between tenants in the pager: a frame that passes from one tenant's page to
another's is zeroed before the new page is appended (appends write only part of a page), and a
randomised workload of several tenants never shows one tenant a byte another wrote."""

from __future__ import annotations

import random

import pytest
import torch

from paged_kv import Tier

from pager_helpers import append_written, make_pager, pattern, read_any_copy, tier


def _frame(pager, row, page):
    return pager.page_info(row, page)["frame"]


def _reuse(next_tenant):
    """Tenant 1 writes a page and frees its sequence; `next_tenant` appends a page into the
    same frame. Returns the pager, the frame and the page's first tag."""
    pager = make_pager(frames=2, host=4)
    tags = {}
    a = pager.add_sequence(tenant=1)
    append_written(pager, a, 1, tags)
    frame = _frame(pager, a, 0)
    pager.remove_sequence(a)
    b = pager.add_sequence(tenant=next_tenant)
    pager.append_pages(b, 1)
    assert _frame(pager, b, 0) == frame  # the most recently released frame goes first
    return pager, frame, tags[(a, 0)]


@pytest.mark.parametrize("next_tenant, cleared", [(2, True), (1, False)], ids=["another", "same"])
def test_a_frame_is_zeroed_only_for_another_tenant(next_tenant, cleared):
    pager, frame, tag = _reuse(next_tenant)
    words = pager.pool.view(torch.int32)[frame]
    if cleared:
        assert bool((words == 0).all())
    else:
        assert torch.equal(words, pattern(pager, tag))  # the tenant's own bytes stay
    assert pager.stats()["frames_zeroed"] == int(cleared)


def test_eviction_then_append_by_another_tenant_zeroes():
    pager = make_pager(frames=2, host=8)
    tags = {}
    a = pager.add_sequence(tenant=1)
    append_written(pager, a, 2, tags)
    pager.seal(a, 1)
    b = pager.add_sequence(tenant=2)
    first = pager.append_pages(b, 1)  # evicts one of a's pages (written back to host)
    assert bool((pager.pool.view(torch.int32)[_frame(pager, b, first)] == 0).all())
    for page in range(2):
        assert torch.equal(read_any_copy(pager, a, page), pattern(pager, tags[(a, page)]))


def test_random_tenants_never_see_each_others_bytes():
    """Several tenants append (writing only part of each new page), fault, evict and free at
    random; every page a tenant can read holds only its own pattern or zeros."""
    rng = random.Random(11)
    pager = make_pager(frames=5, host=40, max_sequences=6, max_pages=12)
    pager.pool.zero_()  # as Engine does: a fresh frame holds nobody's bytes
    owner_of_tag = {}
    tags = {}
    rows = {}
    for step in range(400):
        tenant = rng.randrange(3)
        live = [r for r, t in rows.items() if t == tenant]
        action = rng.random()
        if action < 0.15 and len(rows) < 6:
            rows[pager.add_sequence(tenant=tenant)] = tenant
        elif action < 0.25 and live:
            row = rng.choice(live)
            pager.remove_sequence(row)
            del rows[row]
        elif action < 0.7 and live:
            row = rng.choice(live)
            if pager.num_pages(row) < 12 and pager.max_serviceable() >= 1:
                first = pager.append_pages(row, 1)
                # Write only the first half of the new page, as a partial append does.
                tag = step + 1
                words = pager.pool.view(torch.int32)[_frame(pager, row, first)].view(-1)
                half = words.numel() // 2
                words[:half] = pattern(pager, tag).view(-1)[:half]
                tags[(row, first)] = tag
                owner_of_tag[tag] = tenant
        elif live:
            row = rng.choice(live)
            sealed = [p for p in range(pager.num_pages(row)) if pager.page_info(row, p)["sealed"]]
            want = rng.sample(sealed, min(len(sealed), 2))
            if want and len(want) <= pager.max_serviceable():
                pager.service([(row, p) for p in want])
        pager.check_invariants()
        # Every page of every live row: its own half pattern, then zeros; nothing of another tenant.
        for row, tenant in rows.items():
            for page in range(pager.num_pages(row)):
                info = pager.page_info(row, page)
                if info["tier"] == Tier.GPU:
                    words = pager.pool.view(torch.int32)[info["frame"]].view(-1)
                else:
                    words = read_any_copy(pager, row, page).view(-1)
                half = words.numel() // 2
                assert owner_of_tag[tags[(row, page)]] == tenant
                assert torch.equal(words[:half], pattern(pager, tags[(row, page)]).view(-1)[:half])
                assert bool((words[half:] == 0).all()), (row, page, tenant)
    assert pager.stats()["frames_zeroed"] >= 10  # the workload did pass frames between tenants


def test_a_frame_a_failed_read_wrote_is_zeroed_for_another_tenant(tmp_path):
    """A fault-in that fails part-way may leave part of a tenant's page in the frame it gives
    back; the next tenant to append into that frame gets it zeroed."""
    pager = make_pager(frames=2, host=2, disk=4, folder=tmp_path)
    pager.pool.zero_()
    tags = {}
    a = pager.add_sequence(tenant=1)
    append_written(pager, a, 1, tags)
    pager.seal(a, 0)
    pager.demote([(a, 0)], Tier.DISK)
    b = pager.add_sequence(tenant=2)
    append_written(pager, b, 1, tags)  # takes the frame a's page left (zeroed: tenant 1 -> 2)
    frame = _frame(pager, b, 0)
    pager.remove_sequence(b)
    assert pager.stats()["frames_zeroed"] == 1
    pager.disk_store.inject_fault("read_eio")
    with pytest.raises(Exception):
        pager.service([(a, 0)])  # takes the same frame, the read fails
    assert tier(pager, a, 0) == Tier.DISK
    c = pager.add_sequence(tenant=2)
    pager.append_pages(c, 1)
    assert _frame(pager, c, 0) == frame
    assert bool((pager.pool.view(torch.int32)[frame] == 0).all())
    assert pager.stats()["frames_zeroed"] == 2
    pager.check_invariants()
