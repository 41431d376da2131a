"""paged_kv.Engine: tiers sized from a Policy, appends through the pager, and exact attention over
contexts ten times the GPU frames (the rest on host slots, or on host slots and disk), against
the float64 reference over an unpaged copy of the K/V the test appended."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import paged_kv
from paged_kv import Engine, FaultError, Policy, Tier, reference
from paged_kv.policy import format_bytes

from conftest import DEVICES, engine_dtype as _dtype, engine_tolerance as _tolerance

PAGE_SIZE, LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 16, 2, 2, 4, 64
GPU_PAGES = 6


def _page_bytes(dtype):
    return LAYERS * 2 * KV_HEADS * PAGE_SIZE * HEAD_DIM * torch.empty((), dtype=dtype).element_size()


def _policy(dtype, host_pages=0, disk_pages=0, **options):
    pb = _page_bytes(dtype)
    return Policy(page_size=PAGE_SIZE, gpu_budget=format_bytes(GPU_PAGES * pb),
                  host_budget=format_bytes(host_pages * pb), disk_budget=format_bytes(disk_pages * pb), **options)


def _engine(policy, device, max_sequences=3, max_pages=64):
    return Engine(policy, num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=_dtype(device),
                  device=device, max_sequences=max_sequences, max_pages=max_pages)


def _generator(*params):
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


class Model:
    """Drives an engine the way a forward pass does (per step: for each layer, append then
    attend) and keeps the same K/V unpaged in a reference pool (page p of row r in its own
    frame)."""

    def __init__(self, engine, g):
        self.engine, self.g = engine, g
        self.dtype, self.device = engine.dtype, engine.device
        rows, pages = engine.max_sequences, engine.max_pages
        self.ref_pool = paged_kv.new_pool(rows * pages, LAYERS, KV_HEADS, PAGE_SIZE, HEAD_DIM, self.dtype)
        self.ref_pool.fill_(float("nan"))
        self.ref_table = paged_kv.new_page_table(rows, pages)
        for r in range(rows):
            for p in range(pages):
                self.ref_table[r, p] = paged_kv.make_pte(Tier.GPU, r * pages + p)

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def append(self, row, n, layer):
        key, value = self._randn(n, KV_HEADS, HEAD_DIM), self._randn(n, KV_HEADS, HEAD_DIM)
        start = self.engine.num_tokens(row, layer)
        self.engine.append(row, key.to(self.device), value.to(self.device), layer)
        positions = torch.arange(start, start + n, dtype=torch.int32)
        paged_kv.append_kv(key, value, self.ref_pool, self.ref_table, torch.full((n,), row, dtype=torch.int32),
                           positions, layer)

    def fill(self, rows, length, chunk):
        """Grow every row to `length` tokens in steps of `chunk`, rows interleaved."""
        while any(self.engine.num_tokens(r) < length for r in rows):
            for r in rows:
                n = min(chunk, length - self.engine.num_tokens(r))
                for layer in range(LAYERS):
                    if n:
                        self.append(r, n, layer)

    def step(self, rows, queries, check=True, **kwargs):
        """One forward step: entry b appends queries[b] tokens, then each layer attends them
        (checked against the reference). Returns the outputs per layer."""
        starts = [0]
        for q in queries:
            starts.append(starts[-1] + q)
        outs = []
        for layer in range(LAYERS):
            for r, q in zip(rows, queries):
                self.append(r, q, layer)
            query = self._randn(starts[-1], Q_HEADS, HEAD_DIM)
            out, lse = self.engine.attention(query.to(self.device), rows, starts, layer, return_lse=True, **kwargs)
            if check:
                self.check(query, rows, starts, layer, out, lse, **kwargs)
            outs.append(out)
        return outs

    def check(self, query, rows, starts, layer, out, lse, **kwargs):
        kv_lens = torch.tensor([self.engine.num_tokens(r, layer) for r in rows], dtype=torch.int32)
        ref_out, ref_lse, faults, _ = reference.paged_attention(
            query, self.ref_pool, self.ref_table, torch.tensor(rows, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32), kv_lens, layer, faults=False, **kwargs)
        assert faults == []
        tol = _tolerance(self.dtype)
        torch.testing.assert_close(out.cpu().double(), ref_out.double(), **tol)
        torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=tol["rtol"], atol=max(tol["atol"], 1e-4))


def _tiers(engine, row):
    return [Tier(engine.pager.page_info(row, p)["tier"]) for p in range(engine.pager.num_pages(row))]


# ---- construction and errors ----

def test_construction_from_policy_with_byte_strings():
    policy = Policy(page_size=16, gpu_budget="128KiB", host_budget="1 MiB", disk_budget="2MiB")
    with Engine(policy, num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu",
                max_sequences=4, max_pages=32) as engine:
        assert engine.page_bytes == 32 * 1024
        assert (engine.num_frames, engine.num_host_slots, engine.num_disk_slots) == (4, 32, 64)
        assert engine.pool.shape == (4, 2, 2, 2, 16, 64) and engine.pool.dtype == torch.float32
        assert engine.host_pool.shape == (32, 2, 2, 2, 16, 64) and engine.host_pool.device.type == "cpu"
        assert engine.page_table.shape == (4, 32) and engine.page_table.dtype == torch.int32
        assert bool((engine.page_table == paged_kv.UNMAPPED).all())
        assert engine.io_backend == "posix"
        folder = engine.disk_path
        assert os.path.isdir(folder) and os.listdir(folder)
        assert engine.pager.config is not None
    assert engine.closed and not os.path.exists(folder)


def test_disk_path_is_used_and_kept(tmp_path):
    policy = Policy(page_size=16, gpu_budget="128KiB", host_budget="128KiB", disk_budget="256KiB",
                    disk_path=str(tmp_path), io_backend="posix")
    engine = Engine(policy, num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu",
                    max_sequences=1, max_pages=8)
    assert engine.disk_path == str(tmp_path) and os.listdir(tmp_path)
    engine.close()
    engine.close()  # idempotent
    assert os.path.isdir(tmp_path)
    with pytest.raises(RuntimeError, match="closed"):
        engine.new_sequence()


def test_no_disk_tier():
    with _engine(_policy(torch.float32, host_pages=2), "cpu") as engine:
        assert engine.disk_store is None and engine.io_backend is None and engine.disk_path is None
    with _engine(_policy(torch.float32), "cpu") as engine:
        assert engine.host_pool is None and engine.num_host_slots == 0


@pytest.mark.parametrize("changes, match", [
    (dict(host_budget=0), "disk_budget is set but Policy.host_budget is 0"),
    (dict(gpu_budget="1KiB"), "gpu_budget of 1 KiB holds no whole page"),
])
def test_policy_errors(changes, match):
    policy = _policy(torch.float32, host_pages=2, disk_pages=4).replace(**changes)
    with pytest.raises(ValueError, match=match):
        _engine(policy, "cpu")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=torch.float64), "dtype torch.float64 is not supported on cpu"),
    (dict(head_dim=96), "head_dim must be one of"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(device="meta"), "CUDA device or the CPU"),
])
def test_argument_errors(kwargs, match):
    args = dict(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float32, device="cpu",
                max_sequences=2, max_pages=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Engine(_policy(torch.float32), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        Engine(_policy(torch.bfloat16), num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
               dtype=torch.bfloat16, device="cuda", max_sequences=2, max_pages=8)


def test_failed_pinned_allocation_names_the_budget(monkeypatch):
    """A pinned host pool that cannot be allocated is a clear error naming the bytes and the
    budget, with the allocator's message; unpinned (CPU) pools pass errors through."""
    real_empty = torch.empty

    def refusing_empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refusing_empty)
    shape = (8, LAYERS, 2, KV_HEADS, PAGE_SIZE, HEAD_DIM)
    with pytest.raises(RuntimeError, match=r"could not allocate 131,072 bytes of pinned host memory "
                                           r"for 8 host slots \(Policy.host_budget\).*out of memory"):
        paged_kv.engine._new_host_pool(shape, torch.float16, pin=True)
    assert paged_kv.engine._new_host_pool(shape, torch.float16, pin=False).shape == shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pins host memory for a GPU pool")
def test_host_budget_beyond_the_machine_is_a_clear_error():
    policy = _policy(torch.bfloat16)
    # Far past any machine's memory, yet within what a page-table entry can index (2**28 slots).
    policy = Policy(page_size=policy.page_size, gpu_budget=policy.gpu_budget, host_budget="4TiB")
    with pytest.raises(RuntimeError, match="pinned host memory"):
        _engine(policy, "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_append_and_attention_errors(device):
    dtype = _dtype(device)
    with _engine(_policy(dtype, host_pages=8), device) as engine:
        row = engine.new_sequence()
        kv = torch.zeros(3, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
        with pytest.raises(ValueError, match="must be"):
            engine.append(row, kv.float() if dtype != torch.float32 else kv.double(), kv, 0)
        with pytest.raises(ValueError, match=r"must be \[T, 2, 64\]"):
            engine.append(row, kv[:, :1], kv[:, :1], 0)
        with pytest.raises(ValueError, match="layer must be"):
            engine.append(row, kv, kv, LAYERS)
        with pytest.raises(ValueError, match="not a live sequence"):
            engine.append(row + 1, kv, kv, 0)
        engine.append(row, kv, kv, 0)
        # Layer 0 may not run ahead of the reservation while layer 1 lags behind it.
        with pytest.raises(ValueError, match="other layers have not written"):
            engine.append(row, kv, kv, 0)
        with pytest.raises(ValueError, match="layer\\(s\\) \\[1\\]"):
            engine.reserve(row, 4)
        query = torch.zeros(4, Q_HEADS, HEAD_DIM, dtype=dtype, device=device)
        with pytest.raises(ValueError, match="4 queries but only 3 tokens"):
            engine.attention(query, [row], [0, 4], 0)
        with pytest.raises(ValueError, match="query_starts needs"):
            engine.attention(query, [row], [0], 0)
        # Indices are taken exactly, never rounded.
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\), got 1.7"):
            engine.attention(query[:3], [row], [0, 3], 1.7)
        with pytest.raises(TypeError, match=r"rows: each entry must be an int, got float 0.9"):
            engine.attention(query[:3], [0.9], [0, 3], 0)
        with pytest.raises(TypeError, match=r"rows: each entry must be an int, got bool True"):
            engine.attention(query[:3], [True], [0, 3], 0)
        with pytest.raises(TypeError, match=r"query_starts must hold integers, got a torch.float32 tensor"):
            engine.attention(query[:3], [row], torch.tensor([0.0, 3.0]), 0)
        engine.append(row, kv, kv, 1)
        assert engine.num_tokens(row) == 3
        engine.free_sequence(row)
        with pytest.raises(ValueError, match="not a live sequence"):
            engine.num_tokens(row)


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_some_layers_wrote_is_dropped_back(device):
    """drop_unfinished takes back the tokens some layers wrote and others did not (a forward that
    failed part-way), with the pages reserved for them; then the step writes again and attends
    exactly. With every layer even it changes nothing."""
    dtype = _dtype(device)
    with _engine(_policy(dtype, host_pages=8), device) as engine:
        g = _generator("drop_unfinished")
        row = engine.new_sequence()
        kv = [torch.randn(30, KV_HEADS, HEAD_DIM, generator=g).to(dtype).to(device) for _ in range(2 * LAYERS)]
        for layer in range(LAYERS):  # 20 tokens in every layer: two pages, the second open
            engine.append(row, kv[2 * layer][:20], kv[2 * layer + 1][:20], layer)
        assert engine.drop_unfinished(row) == 0
        engine.append(row, kv[0][20:], kv[1][20:], 0)  # layer 0 writes 10 more, layer 1 does not
        assert engine.pager.num_pages(row) == 2  # 30 tokens: still two pages of 16
        assert engine.drop_unfinished(row) == 10
        assert [engine.num_tokens(row, layer) for layer in range(LAYERS)] == [20, 20]
        assert engine.pager.num_pages(row) == 2
        # Past a page boundary the reserved page goes back too.
        long = torch.randn(20, KV_HEADS, HEAD_DIM, generator=g).to(dtype).to(device)
        engine.append(row, long, long, 0)
        assert engine.pager.num_pages(row) == 3
        assert engine.drop_unfinished(row) == 20 and engine.pager.num_pages(row) == 2
        engine.pager.check_invariants()
        for layer in range(LAYERS):  # the step again, in every layer this time
            engine.append(row, kv[2 * layer][20:], kv[2 * layer + 1][20:], layer)
        query = torch.randn(10, Q_HEADS, HEAD_DIM, generator=g).to(dtype).to(device)
        for layer in range(LAYERS):
            got = engine.attention(query, [row], [0, 10], layer)
            k, v = kv[2 * layer], kv[2 * layer + 1]
            want, _ = reference.attention(query.cpu().double(), k.cpu().double(), v.cpu().double(), causal_offset=20)
            torch.testing.assert_close(got.cpu().double(), want, **_tolerance(dtype))
        with pytest.raises(ValueError, match="a gpu quota of 1000 bytes is less than one page"):
            engine.set_quota(0, gpu=1000)


def test_a_host_tier_too_small_to_write_back_is_named(tmp_path):
    """One host slot behind the frames: a fault on the page in it cannot evict a frame (the page
    it would write back needs the slot the faulted page keeps), and the error says so instead of
    blaming open or pinned pages."""
    policy = _policy(torch.float32, host_pages=1, disk_pages=16, zero_copy=False, prefetch=False,
                     disk_path=str(tmp_path))
    with _engine(policy, "cpu") as engine:
        row = engine.new_sequence()
        query = torch.zeros(1, Q_HEADS, HEAD_DIM)
        kv = torch.zeros(1, KV_HEADS, HEAD_DIM)
        with pytest.raises(RuntimeError, match=r"written back to the host tier, which has no room for it "
                                               r"\(0 of 1 host slots free"):
            for _ in range(40 * PAGE_SIZE):
                for layer in range(LAYERS):
                    engine.append(row, kv, kv, layer)
                    engine.attention(query, [row], [0, 1], layer)


# ---- exact attention over contexts larger than the GPU ----

# name: (host pages, disk pages); the context is ten times the GPU frames (first) or ten times
# the GPU frames plus host slots (second), the rest on disk.
# Each tier has a spare page per GPU frame: servicing a page keeps its lower copy, so evicting a
# frame in exchange may need a free slot below.
TIERS = {"host": (11 * GPU_PAGES, 0), "host+disk": (GPU_PAGES, 10 * 2 * GPU_PAGES + 2 * GPU_PAGES)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiers", list(TIERS))
@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("write_policy", ["write_back", "write_through"])
def test_decode_and_prefill_are_exact_over_a_context_ten_times_the_budget(device, tiers, zero_copy, write_policy):
    dtype = _dtype(device)
    host_pages, disk_pages = TIERS[tiers]
    policy = _policy(dtype, host_pages, disk_pages, zero_copy=zero_copy, write_policy=write_policy)
    g = _generator("engine", device, tiers, zero_copy, write_policy)
    with _engine(policy, device, max_sequences=2, max_pages=96) as engine:
        model = Model(engine, g)
        rows = [engine.new_sequence(tenant=7), engine.new_sequence()]
        resident = GPU_PAGES + (GPU_PAGES if disk_pages else 0)
        total_pages = 10 * resident
        length = total_pages // 2 * PAGE_SIZE - PAGE_SIZE // 2  # each row ends inside a page
        # Steps of 13 tokens start inside partly written pages and spill into new ones.
        model.fill(rows, length, 13)
        where = _tiers(engine, rows[0]) + _tiers(engine, rows[1])
        assert len(where) == total_pages
        assert where.count(Tier.GPU) <= GPU_PAGES
        if disk_pages:
            assert where.count(Tier.DISK) >= total_pages - GPU_PAGES - host_pages
        engine.pager.check_invariants()

        model.step(rows, [1, 1])  # decode
        # Prefill/extend chunks: 20 and 30 tokens spill out of partly written pages.
        model.step(rows, [20, 1])
        model.step(rows, [1, 30])
        model.step(rows, [1, 1], window=3 * PAGE_SIZE, sinks=4)
        engine.pager.check_invariants()

        stats = engine.stats()
        assert stats["attention_calls"] == 4 * LAYERS
        if zero_copy and not disk_pages:  # every page is readable in place
            assert stats["faults_seen"] == 0 and stats["fault_batches"] == 0
        else:
            assert stats["faults_seen"] > 0 and stats["fault_batches"] >= 2
            assert stats["fault_services"] > 0 and stats["fault_service_seconds"] > 0
            assert stats["faults_serviced"] > 0 and stats["service_calls"] >= stats["fault_batches"]
        if disk_pages:
            assert stats["pages_moved"]["disk_to_gpu"] > 0
        if write_policy == "write_through":
            assert stats["write_throughs"] > 0


def _check_seals(engine, model, row):
    """A page is sealed exactly when it is full and every layer has written it; under
    write_through a sealed page's host copy then holds every layer's tokens, and an open page has
    no copy anywhere but its frame."""
    written = engine.num_tokens(row)
    for page in range(engine.pager.num_pages(row)):
        info = engine.pager.page_info(row, page)
        full = (page + 1) * PAGE_SIZE <= written
        assert info["sealed"] == full, (row, page, written, info)
        assert info["host_valid"] == full, (row, page, written, info)
        if full:
            expected = model.ref_pool[row * engine.max_pages + page]
            assert torch.equal(engine.host_pool[info["host_slot"]], expected), (row, page)
        else:
            assert info["tier"] == Tier.GPU and info["disk_slot"] == -1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_copy", [False, True])
def test_write_through_steps_off_page_boundaries_are_exact(device, zero_copy):
    """Multi-token steps that start inside a partly written page and spill into new pages, under
    write_through: the partly written page stays open while the layers write it, each page is
    sealed (and copied to the host, once) only when every layer has written its last token, and
    attention at every layer equals the reference."""
    dtype = _dtype(device)
    # Host slots for every page, so no host copy is ever dropped; six GPU frames for ten pages.
    policy = _policy(dtype, host_pages=4 * GPU_PAGES, zero_copy=zero_copy, write_policy="write_through")
    with _engine(policy, device, max_sequences=2) as engine:
        model = Model(engine, _generator("write-through steps", device, zero_copy))
        rows = [engine.new_sequence(), engine.new_sequence()]
        steps = [[5, 3], [20, 2 * PAGE_SIZE + 1], [PAGE_SIZE - 1, 9], [1, 1], [2 * PAGE_SIZE + 7, 13], [1, 1]]
        spills = 0  # multi-token entries that start inside a page and end in a later one
        for queries in steps:
            for r, q in zip(rows, queries):
                at = engine.num_tokens(r)
                spills += q > 1 and at % PAGE_SIZE != 0 and (at + q - 1) // PAGE_SIZE > at // PAGE_SIZE
            starts = [0, queries[0], sum(queries)]
            for layer in range(LAYERS):
                for r, q in zip(rows, queries):
                    model.append(r, q, layer)
                for r in rows:
                    _check_seals(engine, model, r)
                query = model._randn(starts[-1], Q_HEADS, HEAD_DIM)
                out, lse = engine.attention(query.to(device), rows, starts, layer, return_lse=True)
                model.check(query, rows, starts, layer, out, lse)
            engine.pager.check_invariants()
        assert spills == 5
        lengths = [engine.num_tokens(r) for r in rows]
        assert lengths == [sum(q[0] for q in steps), sum(q[1] for q in steps)]
        stats = engine.stats()
        # Every full page was written through exactly once, and nothing else was.
        assert stats["write_throughs"] == sum(n // PAGE_SIZE for n in lengths)
        assert sum(engine.pager.num_pages(r) for r in rows) > GPU_PAGES  # some pages left the GPU
        if not zero_copy:
            assert stats["faults_seen"] > 0

        # A sequence freed in the middle of a spilling step gives back its open pages' frames.
        model.append(rows[0], 2 * PAGE_SIZE, 0)
        infos = [engine.pager.page_info(rows[0], p) for p in range(engine.pager.num_pages(rows[0]))]
        assert sum(not i["sealed"] for i in infos) == 3  # the partly written page and two new ones
        held = sum(i["frame"] >= 0 for i in infos)
        free = engine.pager.free_frames()
        engine.free_sequence(rows[0])
        engine.pager.check_invariants()
        assert engine.pager.free_frames() == free + held
        model.step([rows[1]], [PAGE_SIZE + 3])
        _check_seals(engine, model, rows[1])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_copy_reads_host_pages_without_faults(device):
    """Everything on the GPU or the host with zero-copy: exact, and no fault at all."""
    dtype = _dtype(device)
    with _engine(_policy(dtype, host_pages=10 * GPU_PAGES, zero_copy=True), device, max_sequences=1) as engine:
        model = Model(engine, _generator("zero-copy", device))
        row = engine.new_sequence()
        model.fill([row], 9 * GPU_PAGES * PAGE_SIZE + 5, PAGE_SIZE)
        assert _tiers(engine, row).count(Tier.HOST) >= 8 * GPU_PAGES
        model.step([row], [1])
        model.step([row], [9])
        stats = engine.stats()
        assert stats["faults_seen"] == 0 and stats["fault_batches"] == 0 and stats["faults_serviced"] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_copy", [False, True])
def test_forbid_raises_naming_the_faulted_pages(device, zero_copy):
    dtype = _dtype(device)
    policy = _policy(dtype, host_pages=GPU_PAGES, disk_pages=8 * GPU_PAGES, zero_copy=zero_copy, fault_mode="forbid")
    with _engine(policy, device, max_sequences=1) as engine:
        model = Model(engine, _generator("forbid", device, zero_copy))
        row = engine.new_sequence()
        model.fill([row], 6 * GPU_PAGES * PAGE_SIZE, PAGE_SIZE)
        model.append(row, 1, 0)
        query = torch.zeros(1, Q_HEADS, HEAD_DIM, dtype=dtype, device=device)
        with pytest.raises(FaultError, match=r"fault_mode='forbid': \(row 0, page 0\)"):
            engine.attention(query, [row], [0, 1], 0)
        model.append(row, 1, 1)
        assert engine.stats()["faults_seen"] > 0 and engine.stats()["fault_batches"] == 0
        # A window that keeps every seen page on the GPU does not fault.
        model.step([row], [1], window=PAGE_SIZE)


@pytest.mark.parametrize("device", DEVICES)
def test_free_sequence_returns_its_pages(device):
    dtype = _dtype(device)
    with _engine(_policy(dtype, host_pages=2 * GPU_PAGES), device) as engine:
        model = Model(engine, _generator("free", device))
        a, b = engine.new_sequence(), engine.new_sequence()
        model.fill([a, b], 5 * PAGE_SIZE + 3, 13)
        engine.free_sequence(a)
        assert bool((engine.page_table[a].cpu() == paged_kv.UNMAPPED).all())
        assert engine.pager.free_frames() + engine.pager.free_host_slots() >= 6
        model.step([b], [1])
        c = engine.new_sequence()
        model.fill([c], 2 * PAGE_SIZE, PAGE_SIZE)
        model.step([b, c], [3, 1])
        engine.pager.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_span_replacement_is_exact_and_ranks_by_attention(device):
    """Under Policy(replacement="span") attention stays exact over a context ten times the GPU
    frames, each step's last layer hands the pages' attention mass to the pager, and the GPU
    keeps the sink and window pages."""
    dtype = _dtype(device)
    policy = _policy(dtype, host_pages=128, replacement="span", span_sink_pages=1, span_window_pages=2)
    with _engine(policy, device) as engine:
        assert engine.pager.replacement == "span"
        model = Model(engine, _generator("span", device))
        row = engine.new_sequence()
        model.fill([row], 10 * GPU_PAGES * PAGE_SIZE, 2 * PAGE_SIZE)
        assert float(engine.pager.attention_scores(row).sum()) == 0.0
        model.step([row], [1])
        # the pager ranks one step behind: a step's mass is handed over by the next step, or at
        # once by flush_telemetry()
        assert float(engine.pager.attention_scores(row).sum()) == 0.0
        engine.flush_telemetry()
        assert float(engine.pager.attention_scores(row).sum()) > 0.0
        for _ in range(2):
            model.step([row], [1])
        engine.flush_telemetry()
        scores = engine.pager.attention_scores(row)
        engine.flush_telemetry()  # nothing more to hand over
        assert torch.equal(engine.pager.attention_scores(row), scores)
        n = engine.pager.num_pages(row)
        assert scores.shape == (n,)
        # Kept pages (the sink, the 2-page window) gather nothing; every other page was read, and a
        # score is the share of steps a page drew its share on (random weights spread attention
        # evenly, so most pages draw it, though not necessarily every one).
        assert float(scores[0]) == 0.0 and bool((scores[n - 2:] == 0).all())
        assert bool(((scores >= 0) & (scores <= 1)).all()) and float((scores[1: n - 2] > 0).float().mean()) > 0.5
        tiers = _tiers(engine, row)
        assert tiers[0] == Tier.GPU and tiers[-1] == Tier.GPU and tiers[-2] == Tier.GPU
        engine.pager.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("to", ["host", "disk"])
def test_suspend_and_resume_move_pages_and_keep_attention_exact(device, to, tmp_path):
    """suspend() sends a sequence's sealed pages down a tier (the open tail page stays) and frees
    their frames; attention right after is exact (faulting them back); resume() brings them up
    again, newest first, as far as the frames allow."""
    dtype = _dtype(device)
    policy = _policy(dtype, host_pages=64, disk_pages=64, disk_path=str(tmp_path), zero_copy=False)
    with _engine(policy, device) as engine:
        model = Model(engine, _generator("suspend", device, to))
        a, b = engine.new_sequence(), engine.new_sequence()
        model.fill([a], 3 * PAGE_SIZE + 5, PAGE_SIZE)  # 3 sealed pages and an open one
        tiers = _tiers(engine, a)
        assert tiers == [Tier.GPU] * 4
        assert engine.suspend(a, to) == 3
        want = Tier.HOST if to == "host" else Tier.DISK
        assert _tiers(engine, a) == [want] * 3 + [Tier.GPU]
        assert engine.pager.free_frames() >= 3
        model.fill([b], 2 * PAGE_SIZE, PAGE_SIZE)  # another sequence takes frames meanwhile
        model.step([a], [1])  # exact after the switch (checked against the reference)
        engine.suspend(a, to)
        assert engine.resume(a, "host") == (3 if to == "disk" else 0)
        moved = engine.resume(a)
        assert moved >= 1 and _tiers(engine, a)[-1] == Tier.GPU
        gpu = [t == Tier.GPU for t in _tiers(engine, a)]
        assert gpu == sorted(gpu)  # newest pages first: GPU pages form the tail
        model.step([a, b], [1, 1])
        engine.pager.check_invariants()


# ---- batch slots ----

@pytest.mark.parametrize("device", DEVICES)
def test_bind_switches_sessions_without_moving_bytes(device):
    """bind() puts a row in a batch slot (batch_rows holds it) and moves no KV byte; a step over
    the bound slots (rows=None) is exact, and rebinding a slot switches the session."""
    with _engine(_policy(_dtype(device), host_pages=16), device, max_sequences=3) as engine:
        model = Model(engine, _generator("bind", device))
        a, b, c = (engine.new_sequence() for _ in range(3))
        model.fill([a, b, c], 2 * PAGE_SIZE + 3, PAGE_SIZE)
        moved = dict(engine.pager.stats()["bytes_moved"])
        engine.bind(1, b)
        engine.bind(0, a)
        assert engine.bound() == [a, b]
        assert engine.batch_rows.tolist() == [a, b, -1]
        assert engine.pager.stats()["bytes_moved"] == moved
        model.step(engine.bound(), [1, 1])
        query = torch.randn(2, Q_HEADS, HEAD_DIM, generator=model.g).to(engine.dtype).to(engine.device)
        torch.testing.assert_close(engine.attention(query, None, [0, 1, 2], 0),
                                   engine.attention(query, [a, b], [0, 1, 2], 0), rtol=0, atol=0)
        engine.bind(0, c)  # the switch: slot 0 now serves c
        assert engine.bound() == [c, b] and engine.batch_rows.tolist() == [c, b, -1]
        model.step(engine.bound(), [1, 1])
        assert engine.unbind(0) == c and engine.unbind(0) is None
        assert engine.bound() == [b] and engine.batch_rows.tolist() == [-1, b, -1]
        engine.free_sequence(b)  # a freed sequence leaves its slot
        assert engine.bound() == [] and engine.batch_rows.tolist() == [-1, -1, -1]
        engine.pager.check_invariants()


def test_bind_errors():
    with _engine(_policy(torch.float32), "cpu", max_sequences=3) as engine:
        a, b = engine.new_sequence(), engine.new_sequence()
        with pytest.raises(ValueError, match=r"batch slot must be an int in \[0, 3\), got 3"):
            engine.bind(3, a)
        with pytest.raises(ValueError, match=r"batch slot must be an int in \[0, 3\), got True"):
            engine.unbind(True)
        with pytest.raises(ValueError, match="is not a live sequence row"):
            engine.bind(0, b + 1)
        query = torch.zeros(1, Q_HEADS, HEAD_DIM)
        with pytest.raises(ValueError, match="rows=None reads the bound batch slots, but none is bound"):
            engine.attention(query, None, [0, 1], 0)
        engine.bind(0, a)
        with pytest.raises(ValueError, match=f"sequence {a} is already bound to batch slot 0; unbind it there first"):
            engine.bind(1, a)
        engine.bind(0, a)  # binding it again where it is changes nothing
        assert engine.bound() == [a]
    with pytest.raises(ValueError, match="max_batch must be a positive int, got 0"):
        Engine(_policy(torch.float32), num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
               dtype=torch.float32, device="cpu", max_sequences=2, max_pages=4, max_batch=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero_copy", "copies"])
def test_prefetch_brings_a_bound_session_within_reach(device, zero_copy, tmp_path):
    """A session suspended to disk and bound again: prefetch() reads its pages into host slots
    (and, without zero-copy, copies the newest into free frames), so its steps fault only what
    the frames cannot hold; with zero-copy the steady state faults nothing."""
    policy = _policy(_dtype(device), host_pages=16, disk_pages=16, disk_path=str(tmp_path),
                     zero_copy=zero_copy, prefetch=False)
    with _engine(policy, device) as engine:
        model = Model(engine, _generator("prefetch", device, zero_copy))
        a = engine.new_sequence()
        model.fill([a], 4 * PAGE_SIZE + 2, PAGE_SIZE)  # 4 sealed pages and an open one
        assert engine.suspend(a, "disk") == 4
        engine.bind(0, a)
        moved = engine.prefetch()
        assert moved["disk_to_host"] == 4
        want = Tier.HOST if zero_copy else Tier.GPU
        assert _tiers(engine, a)[-2] == want  # the newest sealed page is nearest
        assert moved["host_to_gpu"] == (0 if zero_copy else 4)  # 5 free frames: all 4 pages fit
        faults = engine.stats()["faults_seen"]
        model.step(engine.bound(), [1])
        if zero_copy:
            assert engine.stats()["faults_seen"] == faults  # everything read in place
        assert engine.prefetch() == {"disk_to_host": 0, "host_to_gpu": 0}
        engine.pager.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_steady_decode_with_prefetch_services_no_faults(device, tmp_path):
    """Policy.prefetch: after each step the engine prefetches that step's sequences. With
    zero-copy and a context on host and GPU, after the first step no step services a fault,
    although the context is three times the GPU frames and half of it starts on disk."""
    policy = _policy(_dtype(device), host_pages=24, disk_pages=24, disk_path=str(tmp_path))
    assert policy.prefetch and policy.zero_copy
    with _engine(policy, device) as engine:
        model = Model(engine, _generator("steady", device))
        a = engine.new_sequence()
        model.fill([a], 3 * GPU_PAGES * PAGE_SIZE, PAGE_SIZE)
        sealed = engine.pager.num_pages(a) - 1
        engine.pager.demote([(a, p) for p in range(sealed // 2)], Tier.DISK)
        engine.bind(0, a)
        model.step(engine.bound(), [1])  # faults the disk pages in (or the prefetch after it)
        services = engine.stats()["fault_services"]
        for _ in range(2 * PAGE_SIZE):  # crosses two page boundaries: new pages evict old ones
            model.step(engine.bound(), [1])
        assert engine.stats()["fault_services"] == services
        assert Tier.DISK not in _tiers(engine, a)
        engine.pager.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_fork_then_both_grow_exactly(device):
    """A fork shares the parent's full pages and copies its partly written one; each then takes
    its own tokens, through page boundaries and a suspend of the parent, and both stay exact."""
    with _engine(_policy(_dtype(device), host_pages=24), device) as engine:
        model = Model(engine, _generator("fork", device))
        a = engine.new_sequence()
        model.fill([a], 3 * PAGE_SIZE + 5, PAGE_SIZE)
        b = engine.fork(a)
        pages = engine.max_pages
        model.ref_pool[b * pages:(b + 1) * pages] = model.ref_pool[a * pages:(a + 1) * pages]
        assert engine.num_tokens(b) == engine.num_tokens(a)
        assert [engine.pager.page_info(b, p)["sharers"] for p in range(4)] == [2, 2, 2, 1]
        for i in range(PAGE_SIZE + 4):
            model.step([a, b], [1, 1])
            if i == 3:
                engine.suspend(a, "host")  # the shared pages leave the GPU for both
        with pytest.raises(ValueError, match="is in the middle of a step"):
            model.append(a, 1, 0)
            engine.fork(a)
        engine.pager.check_invariants()


def test_suspend_and_resume_errors():
    with _engine(_policy(torch.float32, host_pages=8), "cpu") as engine:
        row = engine.new_sequence()
        with pytest.raises(ValueError, match="Engine.suspend: tier must be one of 'host', 'disk', got 'gpu'"):
            engine.suspend(row, "gpu")
        with pytest.raises(ValueError, match="Engine.resume: tier must be one of 'gpu', 'host', got 'disk'"):
            engine.resume(row, "disk")
        with pytest.raises(ValueError, match="not a live sequence"):
            engine.suspend(row + 1)
        assert engine.suspend(row) == 0 and engine.resume(row) == 0
