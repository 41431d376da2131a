"""Tenant quotas: a tenant past its quota in a tier evicts its own pages there, never another
tenant's; what cannot leave raises a clear PagerError and loses nothing; a randomised workload
of several tenants under quotas keeps every quota, every page's bytes and every frame and slot
accounted for."""

from __future__ import annotations

import random

import pytest
import torch

from paged_kv import Engine, PagerError, Policy, Tier

from pager_helpers import append_written, make_pager, pattern, read_any_copy, service_some, tier


def _sealed_row(pager, tenant, n, tags):
    row = pager.add_sequence(tenant=tenant)
    append_written(pager, row, n, tags)
    pager.seal(row, n - 1)
    return row


def _check_pages(pager, tags):
    for (row, page), tag in tags.items():
        if pager.is_live(row):
            assert torch.equal(read_any_copy(pager, row, page), pattern(pager, tag)), (row, page)


def test_gpu_quota_evicts_the_tenants_own_pages():
    pager = make_pager(frames=8, host=8)
    tags = {}
    other = _sealed_row(pager, 2, 2, tags)
    pager.set_quota(1, Tier.GPU, 2)
    assert pager.quota(1, Tier.GPU) == 2 and pager.quota(1, Tier.HOST) is None
    row = _sealed_row(pager, 1, 2, tags)
    pager.touch([(row, 1)], 1)  # page 0 is tenant 1's least recently used
    append_written(pager, row, 1, tags)  # a third page: tenant 1 gives up page 0, not tenant 2's
    assert pager.usage(1, Tier.GPU) == 2
    assert tier(pager, row, 0) == Tier.HOST and tier(pager, row, 1) == Tier.GPU
    assert [tier(pager, other, p) for p in range(2)] == [Tier.GPU, Tier.GPU]
    assert pager.free_frames() == 8 - 4
    pager.service([(row, 0)])  # a fault within the quota: tenant 1 evicts page 1 (sealed) for it
    assert tier(pager, row, 0) == Tier.GPU and tier(pager, row, 1) == Tier.HOST
    assert pager.usage(1, Tier.GPU) == 2
    _check_pages(pager, tags)
    pager.check_invariants()


def test_host_and_disk_quotas(tmp_path):
    pager = make_pager(frames=8, host=8, disk=8, folder=tmp_path)
    tags = {}
    pager.set_quota(1, Tier.HOST, 2)
    pager.set_quota(1, Tier.DISK, 2)
    row = _sealed_row(pager, 1, 4, tags)
    pager.demote([(row, 0)], Tier.HOST)
    pager.demote([(row, 1)], Tier.HOST)
    pager.demote([(row, 2)], Tier.HOST)  # the host quota is full: page 0 goes on to disk
    assert [tier(pager, row, p) for p in range(3)] == [Tier.DISK, Tier.HOST, Tier.HOST]
    assert pager.usage(1, Tier.HOST) == 2 and pager.usage(1, Tier.DISK) == 1
    pager.demote([(row, 1)], Tier.DISK)
    assert pager.usage(1, Tier.DISK) == 2
    # A third disk page: both disk slots hold a page's only copy, so nothing can leave.
    with pytest.raises(PagerError, match=r"tenant 1 would hold more than its quota of 2 disk slots \(it holds 2\)"):
        pager.demote([(row, 2)], Tier.DISK)
    assert tier(pager, row, 2) == Tier.HOST
    _check_pages(pager, tags)
    pager.check_invariants()
    # Tenant 2 has no quota: it uses the room tenant 1 may not.
    other = _sealed_row(pager, 2, 3, tags)
    pager.demote([(other, p) for p in range(3)], Tier.DISK)
    assert pager.usage(2, Tier.DISK) == 3
    _check_pages(pager, tags)
    pager.check_invariants()


def test_more_at_once_than_the_quota_is_refused_up_front():
    pager = make_pager(frames=8, host=8)
    pager.set_quota(1, Tier.GPU, 2)
    row = pager.add_sequence(tenant=1)
    with pytest.raises(PagerError, match="needs 3 GPU frames for tenant 1 at once, more than its quota of 2"):
        pager.append_pages(row, 3)
    assert pager.num_pages(row) == 0 and pager.usage(1, Tier.GPU) == 0
    pager.check_invariants()


def test_open_pages_cannot_leave_the_quota():
    pager = make_pager(frames=8, host=8)
    pager.set_quota(1, Tier.GPU, 2)
    row = pager.add_sequence(tenant=1)
    pager.append_pages(row, 2, seal_open=False)
    with pytest.raises(PagerError, match="too few of its pages there can leave: they are open, pinned"):
        pager.append_pages(row, 1, seal_open=False)
    assert pager.num_pages(row) == 2
    pager.check_invariants()


def test_set_quota_below_use_evicts_at_once_or_keeps_the_old_quota():
    pager = make_pager(frames=8, host=8)
    tags = {}
    row = _sealed_row(pager, 1, 3, tags)
    pager.set_quota(1, Tier.GPU, 1)
    assert pager.usage(1, Tier.GPU) == 1 and sum(tier(pager, row, p) == Tier.GPU for p in range(3)) == 1
    pager.set_quota(1, Tier.GPU, None)
    assert pager.quota(1, Tier.GPU) is None
    pager.append_pages(row, 2, seal_open=False)  # two open pages
    pager.set_quota(1, Tier.GPU, 3)
    with pytest.raises(PagerError, match="set_quota of 1 GPU frames for tenant 1"):
        pager.set_quota(1, Tier.GPU, 1)
    assert pager.quota(1, Tier.GPU) == 3
    _check_pages(pager, tags)
    pager.check_invariants()


@pytest.mark.parametrize("tenant, tier_, pages, error, match", [
    (-1, Tier.GPU, 1, ValueError, "tenant must be >= 0, got -1"),
    (0, Tier.GPU, -2, ValueError, r"pages must be >= 0 \(or -1 for no quota\), got -2"),
    (0, 3, 1, ValueError, "quotas are per GPU, host or disk tier"),
])
def test_set_quota_argument_errors(tenant, tier_, pages, error, match):
    pager = make_pager()
    with pytest.raises(error, match=match):
        pager.set_quota(tenant, tier_, pages)


def test_serviceable_prefix_counts_each_tenants_quota():
    pager = make_pager(frames=8, host=16)
    tags = {}
    a = _sealed_row(pager, 1, 4, tags)
    b = _sealed_row(pager, 2, 4, tags)
    pager.demote([(r, p) for r in (a, b) for p in range(4)], Tier.HOST)
    pager.set_quota(1, Tier.GPU, 2)
    faults = [(a, 0), (b, 0), (a, 1), (b, 1), (a, 2), (b, 2)]
    assert pager.serviceable_prefix(faults) == 4  # the third page of tenant 1 would pass its quota
    pager.service(faults[:4])
    assert pager.usage(1, Tier.GPU) == 2
    pager.pin([(a, 0)])
    assert pager.serviceable_prefix([(a, 2), (a, 3)]) == 1  # one of its frames is pinned
    pager.unpin([(a, 0)])
    pager.check_invariants()


def test_random_tenants_keep_their_quotas_and_their_bytes(tmp_path):
    """Three tenants with quotas on every tier and one without append, fault, demote, change
    quotas and free sequences at random; after every call each quota holds, every live page
    reads back its own pattern, and at the end every frame and slot is free again."""
    rng = random.Random(5)
    pager = make_pager(frames=12, host=16, disk=24, folder=tmp_path, max_sequences=8, max_pages=10)
    quotas = {1: (3, 4, 6), 2: (4, 5, 8), 3: (2, 3, 5)}
    for tenant, limits in quotas.items():
        for t, limit in zip((Tier.GPU, Tier.HOST, Tier.DISK), limits):
            pager.set_quota(tenant, t, limit)
    tags, rows = {}, {}
    refused = 0
    for _ in range(600):
        tenant = rng.randrange(4)
        live = [r for r, t in rows.items() if t == tenant]
        action = rng.random()
        try:
            if action < 0.12 and len(rows) < 8:
                rows[pager.add_sequence(tenant=tenant)] = tenant
            elif action < 0.2 and live:
                row = rng.choice(live)
                pager.remove_sequence(row)
                del rows[row]
                tags = {k: v for k, v in tags.items() if k[0] != row}
            elif action < 0.55 and live:
                row = rng.choice(live)
                if pager.num_pages(row) < 10:
                    append_written(pager, row, 1, tags)
            elif action < 0.75 and live:
                service_some(pager, rng, rng.choice(live))
            elif action < 0.9 and live:
                row = rng.choice(live)
                sealed = [(row, p) for p in range(pager.num_pages(row)) if pager.page_info(row, p)["sealed"]]
                if sealed:
                    pager.demote(rng.sample(sealed, min(len(sealed), 2)), rng.choice([Tier.HOST, Tier.DISK]))
            elif tenant in quotas:
                t = rng.choice([Tier.GPU, Tier.HOST, Tier.DISK])
                pager.set_quota(tenant, t, rng.randrange(2, 8))
        except PagerError:
            refused += 1  # a full quota or tier; the pager must be as it was
        pager.check_invariants()  # includes: no tenant over a quota
        for tenant in quotas:
            for t in (Tier.GPU, Tier.HOST, Tier.DISK):
                limit = pager.quota(tenant, t)
                assert limit is None or pager.usage(tenant, t) <= limit
        _check_pages(pager, tags)
    assert refused > 0 and pager.stats()["evictions"]["gpu"] > 20
    for row in list(rows):
        pager.remove_sequence(row)
    assert pager.free_frames() == 12 and pager.free_host_slots() == 16 and pager.free_disk_slots() == 24
    assert all(pager.usage(t, x) == 0 for t in range(4) for x in (Tier.GPU, Tier.HOST, Tier.DISK))
    pager.check_invariants()


def test_engine_quota_keeps_attention_exact():
    """An engine whose tenant may hold 2 GPU frames streams a 6-page context through them in
    batches and gets the same attention as without the quota."""
    torch.manual_seed(0)
    layers, heads, dim, page = 1, 2, 64, 16
    page_bytes = layers * 2 * heads * page * dim * 4
    policy = Policy(page_size=page, gpu_budget=8 * page_bytes, host_budget=16 * page_bytes, zero_copy=False)
    key, value = torch.randn(6 * page, heads, dim), torch.randn(6 * page, heads, dim)
    query = torch.randn(1, 4, dim)
    outs = []
    for quota in (None, 2 * page_bytes):
        with Engine(policy, num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=torch.float32,
                    device="cpu", max_sequences=2, max_pages=8) as engine:
            if quota is not None:
                engine.set_quota(1, gpu=quota)
            row = engine.new_sequence(tenant=1)
            for start in range(0, 6 * page, page):  # a page per step, as prefill chunks would
                engine.append(row, key[start:start + page], value[start:start + page], 0)
            engine.suspend(row)
            outs.append(engine.attention(query, [row], [0, 1], 0))
            if quota is not None:
                assert engine.usage(1)["gpu"] <= 2 and engine.stats()["fault_batches"] >= 3
                with pytest.raises(ValueError, match="tenant must be an int >= 0"):
                    engine.set_quota(-1, gpu=0)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
