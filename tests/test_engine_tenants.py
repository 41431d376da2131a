"""Several tenants share one Engine under a random workload: sessions are created, grow by decode
steps and prefill chunks (ending inside pages), attend, are suspended to the host or the disk,
resumed, bound to and unbound from batch slots (steps over rows=None), prefetched and freed,
while each tenant's per-tier quota changes. The tiers are a handful of pages, so pages are
evicted and faulted all the time.

What is checked, after every operation:
- every attention output and LSE equals the float64 reference over that session's own K/V (kept
  unpaged by the test), so a byte of another tenant (or of a stale frame) read anywhere shows;
- through the pager: every page of a session belongs to the session's tenant, the pager's
  invariants hold, every quota holds, each tier's frames or slots are exactly the free ones plus
  those the tenants' pages hold, and the device page table equals the pager's mirror (also right
  after a refused call);
- a PagerError (a full quota or tier) may refuse an operation, and the engine stays consistent.
At the end every frame and slot is free, and the workload is shown to have evicted, faulted,
moved pages through every tier and passed frames between tenants.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

import paged_kv
from paged_kv import Engine, PagerError, Policy, Tier, reference

from conftest import DEVICES, engine_dtype as _dtype, engine_tolerance as _tolerance

PAGE_SIZE, LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 16, 2, 2, 4, 64
TENANTS = 4  # tenants 0-2 have quotas; tenant 3 has none
FRAMES, HOST_SLOTS, DISK_SLOTS = 10, 16, 48
MAX_SEQUENCES, MAX_PAGES, MAX_BATCH = 10, 8, 4
MAX_TOKENS = MAX_PAGES * PAGE_SIZE
OPERATIONS = 1500
TIERS = {"gpu": Tier.GPU, "host": Tier.HOST, "disk": Tier.DISK}
CAPACITY = {"gpu": FRAMES, "host": HOST_SLOTS, "disk": DISK_SLOTS}
# Starting quotas in pages (gpu, host, disk) of the tenants that have them.
QUOTAS = {0: (4, 6, 16), 1: (5, 5, 12), 2: (3, 8, 20)}


def _page_bytes(dtype):
    return LAYERS * 2 * KV_HEADS * PAGE_SIZE * HEAD_DIM * torch.empty((), dtype=dtype).element_size()


class Session:
    """One sequence's tenant and its K/V per layer, unpaged ([T, H, D] on the CPU)."""

    def __init__(self, tenant, dtype):
        self.tenant = tenant
        empty = torch.empty(0, KV_HEADS, HEAD_DIM, dtype=dtype)
        self.keys = [empty] * LAYERS
        self.values = [empty] * LAYERS

    def tokens(self):
        return self.keys[0].shape[0]


class TenantWorkload:
    """Drives the engine and keeps every session's reference; counts what was refused."""

    def __init__(self, engine, rng, generator):
        self.engine, self.rng, self.g = engine, rng, generator
        self.dtype, self.device = engine.dtype, engine.device
        self.sessions: dict[int, Session] = {}
        self.quotas = {t: dict(zip(TIERS, pages)) for t, pages in QUOTAS.items()}
        self.refused: dict[str, int] = {}
        self.steps_checked = 0
        self.tenants_checked: set[int] = set()
        self.mixed_steps = 0  # checked steps whose batch held sessions of several tenants
        self.window_steps = 0
        self.bound_steps = 0

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def refuse(self, what):
        self.refused[what] = self.refused.get(what, 0) + 1

    # ---- operations ----

    def new_session(self, tenant):
        row = self.engine.new_sequence(tenant)
        assert row not in self.sessions
        self.sessions[row] = Session(tenant, self.dtype)
        return row

    def free_session(self, row):
        self.engine.free_sequence(row)
        del self.sessions[row]
        assert row not in self.engine.bound()

    def step(self, entries, bound=False, window=0, sinks=0):
        """One forward step: entry (row, q) appends q new tokens to every layer, and each layer
        attends its queries (checked). Each row's pages are reserved first; a row refused by a
        PagerError sits the step out (unbound when the step is over the batch slots)."""
        engine = self.engine
        admitted = []
        for row, q in entries:
            try:
                engine.reserve(row, q)
            except PagerError:
                self.refuse("reserve")
                assert engine.pager.num_pages(row) == -(-self.sessions[row].tokens() // PAGE_SIZE)
                if bound:
                    slot = engine.batch_rows.tolist().index(row)
                    assert engine.unbind(slot) == row
                continue
            admitted.append((row, q))
        if not admitted:
            return
        rows = [row for row, _ in admitted]
        if bound:
            assert engine.bound() == rows
            self.bound_steps += 1
        starts = [0]
        for _, q in admitted:
            starts.append(starts[-1] + q)
        if window:
            self.window_steps += 1
        for layer in range(LAYERS):
            for row, q in admitted:
                key, value = self._randn(q, KV_HEADS, HEAD_DIM), self._randn(q, KV_HEADS, HEAD_DIM)
                engine.append(row, key.to(self.device), value.to(self.device), layer)
                assert engine.num_tokens(row, layer) == self.sessions[row].keys[layer].shape[0] + q
                session = self.sessions[row]
                session.keys[layer] = torch.cat([session.keys[layer], key])
                session.values[layer] = torch.cat([session.values[layer], value])
            query = self._randn(starts[-1], Q_HEADS, HEAD_DIM)
            try:
                out, lse = engine.attention(query.to(self.device), None if bound else rows, starts, layer,
                                            window=window, sinks=sinks, return_lse=True)
            except PagerError:
                self.refuse("attention: tiers full")  # no room below for a page that must make way
                continue
            except RuntimeError as error:
                # Every frame the faulting tenant may use holds an open page of this step: the
                # engine's own "cannot service" error, not a wrong answer.
                if "no GPU frame can be freed" not in str(error):
                    raise
                self.refuse("attention: no frame")
                continue
            self.check_attention(query, admitted, starts, layer, out, lse, window, sinks)
        for row, _ in admitted:
            assert engine.num_tokens(row) == self.sessions[row].tokens()

    def check_attention(self, query, admitted, starts, layer, out, lse, window, sinks):
        tol = _tolerance(self.dtype)
        out, lse = out.cpu(), lse.cpu()
        for b, (row, q) in enumerate(admitted):
            session = self.sessions[row]
            kv_len = session.keys[layer].shape[0]
            lo, hi = starts[b], starts[b + 1]
            ref_out, ref_lse = reference.attention(query[lo:hi], session.keys[layer], session.values[layer],
                                                   causal_offset=kv_len - q, window=window, sinks=sinks)
            torch.testing.assert_close(out[lo:hi].double(), ref_out.double(), **tol,
                                       msg=lambda m: f"row {row} (tenant {session.tenant}), layer {layer}: {m}")
            torch.testing.assert_close(lse[lo:hi].double(), ref_lse, rtol=tol["rtol"], atol=max(tol["atol"], 1e-4))
        self.steps_checked += 1
        tenants = {self.sessions[row].tenant for row, _ in admitted}
        self.tenants_checked |= tenants
        self.mixed_steps += len(tenants) > 1

    def suspend(self, row, to):
        engine = self.engine
        try:
            engine.suspend(row, to)
        except PagerError:
            self.refuse("suspend")
            return
        least = TIERS[to]
        for page in range(engine.pager.num_pages(row)):
            info = engine.pager.page_info(row, page)
            if info["sealed"]:
                assert info["tier"] >= least, (row, page, to, info)
            else:  # the open tail page stays in its frame
                assert info["tier"] == Tier.GPU, (row, page, info)

    def resume(self, row, to):
        engine = self.engine
        target = Tier.GPU if to == "gpu" else Tier.HOST
        below = [p for p in range(engine.pager.num_pages(row) - 1, -1, -1) if self.tier(row, p) > target]
        try:
            moved = engine.resume(row, to)
        except PagerError:
            self.refuse("resume")
            return
        # The newest `moved` pages below the target came up to it (a tenant at its quota there
        # may have sent its own older pages down to make room).
        assert moved == len(below) if to == "host" else 0 <= moved <= len(below)
        assert all(self.tier(row, p) <= target for p in below[:moved]), (row, to, below, moved)

    def prefetch(self, rows):
        engine = self.engine
        on_disk = [(row, p) for row in (engine.bound() if rows is None else rows)
                   for p in range(engine.pager.num_pages(row)) if self.tier(row, p) == Tier.DISK]
        free_frames = engine.pager.free_frames()
        try:
            moved = engine.prefetch(rows)
        except PagerError:
            self.refuse("prefetch")
            return
        # Every page on disk was read into a host slot (a tenant at its host quota may send its
        # own older pages down to make room), and host pages went only into free frames.
        assert moved["disk_to_host"] == len(on_disk)
        assert all(self.tier(row, p) != Tier.DISK for row, p in on_disk)
        assert 0 <= moved["host_to_gpu"] <= free_frames

    def tier(self, row, page):
        return Tier(self.engine.pager.page_info(row, page)["tier"])

    def set_quota(self, tenant, tier, pages):
        engine = self.engine
        value = None if pages is None else pages * engine.page_bytes
        try:
            engine.set_quota(tenant, **{tier: value})
        except PagerError:
            self.refuse("set_quota")  # below what the tenant cannot give up: the old quota stays
        else:
            self.quotas[tenant][tier] = pages
        assert engine.pager.quota(tenant, TIERS[tier]) == self.quotas[tenant][tier]

    # ---- consistency ----

    def check_consistent(self):
        engine, pager = self.engine, self.engine.pager
        pager.check_invariants()
        assert torch.equal(engine.page_table.cpu(), pager.page_table())
        for row, session in self.sessions.items():
            assert pager.is_live(row) and pager.tenant(row) == session.tenant
            assert engine.num_tokens(row) == session.tokens()
            assert pager.num_pages(row) == -(-session.tokens() // PAGE_SIZE)
            for page in range(pager.num_pages(row)):
                info = pager.page_info(row, page)
                assert info["tenant"] == session.tenant, (row, page, session.tenant, info)
        for row in range(MAX_SEQUENCES):
            if row not in self.sessions:
                assert not pager.is_live(row)
                assert bool((engine.page_table[row].cpu() == paged_kv.UNMAPPED).all())
        usage = {t: engine.usage(t) for t in range(TENANTS)}
        for tenant, quotas in self.quotas.items():
            for tier, pages in quotas.items():
                assert pages is None or usage[tenant][tier] <= pages, (tenant, tier, usage[tenant], pages)
        free = {"gpu": pager.free_frames(), "host": pager.free_host_slots(), "disk": pager.free_disk_slots()}
        for tier in TIERS:
            assert free[tier] + sum(u[tier] for u in usage.values()) == CAPACITY[tier], (tier, free, usage)
        bound = engine.bound()
        assert all(row in self.sessions for row in bound) and len(set(bound)) == len(bound)


def _random_operation(work, rng):
    engine = work.engine
    live = list(work.sessions)
    unbound = [r for r in live if r not in engine.bound()]
    action = rng.random()
    if action < 0.10 or not live:
        if len(live) < MAX_SEQUENCES:
            row = work.new_session(rng.randrange(TENANTS))
            work.step([(row, rng.randrange(1, 3 * PAGE_SIZE))])  # its prompt
        else:
            work.free_session(rng.choice(live))
    elif action < 0.19:
        # A finished session leaves; a full one always goes first.
        full = [r for r in live if work.sessions[r].tokens() >= MAX_TOKENS - PAGE_SIZE]
        work.free_session(rng.choice(full or live))
    elif action < 0.42:
        # A batch of sessions of mixed tenants: decode steps and prefill chunks that end anywhere.
        rows = rng.sample(live, min(len(live), rng.randint(1, 3)))
        entries = []
        for row in rows:
            room = MAX_TOKENS - work.sessions[row].tokens()
            q = 1 if rng.random() < 0.6 else rng.randint(2, 2 * PAGE_SIZE + 5)
            if min(q, room):
                entries.append((row, min(q, room)))
        windowed = rng.random() < 0.15
        work.step(entries, window=3 * PAGE_SIZE if windowed else 0, sinks=4 if windowed else 0)
    elif action < 0.62:
        # The context switch: bind a session into a batch slot (or empty one), then a step over
        # the bound slots.
        if unbound and rng.random() < 0.8:
            engine.bind(rng.randrange(MAX_BATCH), rng.choice(unbound))
        else:
            engine.unbind(rng.randrange(MAX_BATCH))
        entries = [(row, 1 if rng.random() < 0.7 else rng.randint(2, PAGE_SIZE + 3)) for row in engine.bound()]
        entries = [(row, min(q, MAX_TOKENS - work.sessions[row].tokens())) for row, q in entries]
        for row, q in entries:
            if q == 0:  # full: it leaves the batch and the engine
                work.free_session(row)
        entries = [(row, q) for row, q in entries if q]
        if entries:
            work.step(entries, bound=True)
    elif action < 0.74:
        work.suspend(rng.choice(live), rng.choice(["host", "disk"]))
    elif action < 0.83:
        work.resume(rng.choice(live), rng.choice(["gpu", "host"]))
    elif action < 0.90:
        work.prefetch(None if rng.random() < 0.5 else rng.sample(live, min(len(live), 2)))
    else:
        tenant = rng.choice(list(QUOTAS))
        tier = rng.choice(list(TIERS))
        lowest = {"gpu": 3, "host": 3, "disk": 6}[tier]
        pages = None if rng.random() < 0.1 else rng.randint(lowest, CAPACITY[tier] // 2)
        work.set_quota(tenant, tier, pages)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_copy, write_policy", [(False, "write_back"), (True, "write_through")],
                         ids=["copies-write_back", "zero_copy-write_through"])
def test_random_tenants_stay_isolated_exact_and_within_quota(device, zero_copy, write_policy, tmp_path, one_thread):
    dtype = _dtype(device)
    pb = _page_bytes(dtype)
    policy = Policy(page_size=PAGE_SIZE, gpu_budget=FRAMES * pb, host_budget=HOST_SLOTS * pb,
                    disk_budget=DISK_SLOTS * pb, disk_path=str(tmp_path), io_backend="posix",
                    zero_copy=zero_copy, write_policy=write_policy)
    seed = zlib.crc32(repr(("tenants", device, zero_copy, write_policy)).encode())
    rng = random.Random(seed)
    with Engine(policy, num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype,
                device=device, max_sequences=MAX_SEQUENCES, max_pages=MAX_PAGES, max_batch=MAX_BATCH) as engine:
        assert (engine.num_frames, engine.num_host_slots, engine.num_disk_slots) == (FRAMES, HOST_SLOTS, DISK_SLOTS)
        work = TenantWorkload(engine, rng, torch.Generator().manual_seed(seed))
        for tenant, pages in QUOTAS.items():
            for tier, n in zip(TIERS, pages):
                work.set_quota(tenant, tier, n)
        for _ in range(OPERATIONS):
            _random_operation(work, rng)
            work.check_consistent()

        stats = engine.stats()
        for row in list(work.sessions):
            work.free_session(row)
        work.check_consistent()
        assert engine.bound() == []
        assert engine.pager.free_frames() == engine.num_frames
        assert engine.pager.free_host_slots() == engine.num_host_slots
        assert engine.pager.free_disk_slots() == engine.num_disk_slots
        assert all(v == 0 for t in range(TENANTS) for v in engine.usage(t).values())

    # The workload did what it is for: every kind of step ran and was checked, pages were evicted
    # from every tier and faulted back, frames passed between tenants, and quotas and full tiers
    # refused some operations.
    print(f"stats: {dict((k, stats[k]) for k in ('evictions', 'faults_seen', 'fault_services', 'pages_moved', 'frames_zeroed', 'write_throughs', 'fault_host_passes', 'fault_batches'))}")
    print(f"refused: {work.refused}; steps checked: {work.steps_checked} (over bound slots "
          f"{work.bound_steps}, windowed {work.window_steps}, mixed tenants {work.mixed_steps})")
    assert work.steps_checked > 1200 and work.bound_steps > 150 and work.window_steps > 20
    assert work.tenants_checked == set(range(TENANTS)) and work.mixed_steps > 300
    # Floors about 40% of what the CPU run gives (the CUDA run's refusals, and so its path, differ).
    assert stats["evictions"]["gpu"] > 250 and stats["evictions"]["host"] > 150
    assert stats["faults_seen"] > 500 and stats["fault_services"] > 150
    assert stats["pages_moved"]["disk_to_host"] + stats["pages_moved"]["disk_to_gpu"] > 300
    assert stats["frames_zeroed"] > 120
    assert work.refused.get("reserve", 0) > 10  # quotas and full tiers did refuse appends
    if write_policy == "write_through":
        assert stats["write_throughs"] > 200
    if zero_copy:
        assert stats["fault_host_passes"] > 100
    else:
        assert stats["fault_batches"] > 600 and stats["pages_moved"]["host_to_gpu"] > 900


# ---- refused moves ----

def _tenant_at_its_gpu_quota():
    """An engine whose tenant 1 holds its GPU quota of 3 frames: row b's sealed page (with a
    host copy, so it can leave without a write) and two open pages; row a has 2 sealed pages on
    the host."""
    pb = LAYERS * 2 * KV_HEADS * PAGE_SIZE * HEAD_DIM * 4
    engine = Engine(Policy(page_size=PAGE_SIZE, gpu_budget=8 * pb, host_budget=16 * pb, zero_copy=False,
                           prefetch=False),
                    num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float32,
                    device="cpu", max_sequences=4, max_pages=8)

    def grow(row, n):
        kv = torch.randn(n, KV_HEADS, HEAD_DIM)
        for layer in range(LAYERS):
            engine.append(row, kv, kv, layer)

    a = engine.new_sequence(tenant=1)
    grow(a, 2 * PAGE_SIZE)
    engine.suspend(a)
    b = engine.new_sequence(tenant=1)
    grow(b, PAGE_SIZE + 1)
    engine.suspend(b)
    engine.resume(b)  # its sealed page is back in a frame and keeps its host copy
    grow(engine.new_sequence(tenant=1), 1)
    engine.set_quota(1, gpu=3 * pb)
    assert engine.usage(1)["gpu"] == 3
    return engine, a, b


def test_resume_brings_up_what_the_quota_allows():
    """Tenant 1 is at its GPU quota with one page that can leave: resume brings one of a's two
    pages up (the newest), not both, and raises nothing; the device table stays in sync."""
    engine, a, b = _tenant_at_its_gpu_quota()
    assert engine.resume(a) == 1
    assert engine.usage(1)["gpu"] == 3
    assert Tier(engine.pager.page_info(a, 1)["tier"]) == Tier.GPU
    assert torch.equal(engine.page_table, engine.pager.page_table())
    engine.pager.check_invariants()


def test_a_refused_set_quota_moves_nothing():
    """A quota the tenant's pages cannot get down to is refused before any of them moves; the
    old quota stays and the device table is in sync."""
    engine, a, b = _tenant_at_its_gpu_quota()
    before = engine.pager.page_table()
    with pytest.raises(PagerError, match="too few of its pages there can leave"):
        engine.set_quota(1, gpu=engine.page_bytes)
    assert engine.pager.quota(1, Tier.GPU) == 3
    assert torch.equal(engine.pager.page_table(), before)
    assert torch.equal(engine.page_table, engine.pager.page_table())
    engine.pager.check_invariants()
