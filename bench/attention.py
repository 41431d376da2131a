"""paged_kv.attention against its peers on the same inputs, beside ceilings measured in this run.

Cases (bf16, 32 query heads, 8 KV heads, head_dim 128, a one-layer pool, every page in a random
frame):
  decode     batch 1 at 32K, 128K and 1M tokens; batch 32 at 8K tokens each; pages of 256 and 16
  zero_copy  batch 1 at 128K with every page in pinned host memory (tier 1, read through
             `host_pool`); pages of 256 and 16
  prefill    causal, batch 1, 8K and 32K tokens (every token a query), pages of 256
Kernels: `paged_kv` (paged_kv.ops.attention), `sdpa_dense` (scaled_dot_product_attention over
contiguous K/V), `copy_then_sdpa` (zero-copy cases: pinned K/V copied to the GPU, then SDPA),
`flex_paged` (FlexAttention through PagedAttention's block mask, compiled, pages of 128) and
`flashinfer_*` (FlashInfer paged decode and prefill) where `import flashinfer` works.
Every row is checked against dense SDPA's output. A case's candidates are then timed in
interleaved rounds (each once per round, the median of its calls; 5 rounds on a GPU): a row's
time is the median over rounds, and a ratio to a peer the median of the rounds' ratios, with the
lowest and highest in `time_ratio_range_vs`. Run from the repository root:

    python bench/attention.py [--quick] [--out DIR] [--device auto|cpu|cuda] [--cases REGEX] [--rounds N]
"""
from __future__ import annotations

import contextlib
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import paged_kv
from bench import ceilings
from bench.harness import bench_args, bench_device, format_table, free_memory, gbps, time_fn, write_results

NUM_Q_HEADS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
DTYPE = torch.bfloat16
ELEMENT_BYTES = 2
LAYER = 0
FLEX_PAGE_SIZE = 128
# The check against dense SDPA's output: an element fails when |out - ref| > TOL * (1 + |ref|)
# (bf16 has 8 significant bits: one ulp of a value in [4, 8) is 0.031, so a bare 5e-2 would flag
# two honest roundings of a large value); the whole output fails when ||out - ref|| / ||ref||
# > TOL, which catches a wrong result whose values are all small (long decode averages).
TOL = 5e-2
PAGE_INDEPENDENT = {"sdpa_dense", "copy_then_sdpa", "flex_paged"}  # compared with every page size
K = 1024

FORMULAS = {
    "decode_bytes": "KV bytes read = 2 (K, V) * batch * kv_len * num_kv_heads * head_dim * 2 B",
    "decode_flops": "4 * batch * num_q_heads * kv_len * head_dim (QK^T and PV, 2 FLOPs per multiply-add)",
    "prefill_bytes": "2 B * (2 * batch * N * num_q_heads * head_dim (Q, O) + 2 * batch * N * num_kv_heads * head_dim (K, V))",
    "prefill_flops": "2 * 2 * batch * N * N / 2 * num_q_heads * head_dim (causal: half the N x N scores; QK^T and PV)",
    "gbps": "bytes / time, 10^9 bytes per second",
    "tflops": "flops / time, 10^12 FLOPs per second",
    "roofline_us": "max(bytes / memory ceiling, flops / matmul ceiling); bound names the larger term",
    "time_ratio": "paged_kv time / peer time on the same case (<= 1: paged_kv at least as fast): the "
                  "median over rounds of the two times taken in the same round",
    "time_us": "the median over rounds of each round's median call time; p10_us and p90_us the "
               "medians over rounds of each round's percentiles, min_us the fastest call of all",
}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "decode", "zero_copy" or "prefill"
    batch: int
    kv_len: int  # K/V tokens of each sequence
    page_sizes: tuple[int, ...]

    @property
    def query_len(self) -> int:
        return self.kv_len if self.kind == "prefill" else 1

    @property
    def tier(self) -> int:
        return 1 if self.kind == "zero_copy" else 0


FULL_CASES = (
    Case("decode_b1_32k", "decode", 1, 32 * K, (256, 16)),
    Case("decode_b1_128k", "decode", 1, 128 * K, (256, 16)),
    Case("decode_b1_1m", "decode", 1, K * K, (256, 16)),
    Case("decode_b32_8k", "decode", 32, 8 * K, (256, 16)),
    Case("zero_copy_b1_128k", "zero_copy", 1, 128 * K, (256, 16)),
    Case("prefill_b1_8k", "prefill", 1, 8 * K, (256,)),
    Case("prefill_b1_32k", "prefill", 1, 32 * K, (256,)),
)
# Lengths that are not multiples of the page size, so the last page is partial.
QUICK_CASES = (
    Case("decode_b1_1000", "decode", 1, 1000, (256, 16)),
    Case("decode_b4_300", "decode", 4, 300, (16,)),
    Case("zero_copy_b1_1000", "zero_copy", 1, 1000, (256, 16)),
    Case("prefill_b1_200", "prefill", 1, 200, (256, 16)),
)


@dataclass(frozen=True)
class Timing:
    warmup: int
    repeat: int  # timed calls per candidate and round
    rounds: int = 1  # interleaved rounds: each of a case's candidates is timed once per round


# ---------------------------------------------------------------------------------------------
# Work and rooflines
# ---------------------------------------------------------------------------------------------


def case_bytes(case: Case) -> int:
    kv = 2 * case.batch * case.kv_len * NUM_KV_HEADS * HEAD_DIM * ELEMENT_BYTES
    if case.kind == "prefill":
        return kv + 2 * case.batch * case.query_len * NUM_Q_HEADS * HEAD_DIM * ELEMENT_BYTES
    return kv


def case_flops(case: Case) -> int:
    if case.kind == "prefill":
        n = case.kv_len
        return 2 * 2 * case.batch * n * n * NUM_Q_HEADS * HEAD_DIM // 2
    return 4 * case.batch * NUM_Q_HEADS * case.kv_len * HEAD_DIM


def memory_ceiling_name(device: torch.device, tier: int) -> str:
    """The ceiling a kernel's bytes are compared with: where its K/V live."""
    if device.type != "cuda":
        return "host_memcpy"
    return "h2d_pinned" if tier == 1 else "hbm_read"


def ceiling_rate(ceilings_: dict, name: str) -> float | None:
    """GB/s of a memory ceiling or TFLOP/s of the matmul ceiling; None if it was not measured."""
    entry = ceilings_.get(name, {})
    return entry.get("tflops") if name == "matmul" else entry.get("gbps")


def roofline(bytes_: int, flops: int, ceilings_: dict, memory_ceiling: str) -> dict:
    bandwidth, rate = ceiling_rate(ceilings_, memory_ceiling), ceiling_rate(ceilings_, "matmul")
    memory_us = bytes_ / (bandwidth * 1e3) if bandwidth else None
    compute_us = flops / (rate * 1e6) if rate else None
    out: dict = {"memory_ceiling": memory_ceiling, "memory_ceiling_gbps": bandwidth,
                 "compute_ceiling": "matmul", "compute_ceiling_tflops": rate,
                 "memory_time_us": memory_us, "compute_time_us": compute_us}
    known = {k: v for k, v in (("memory", memory_us), ("compute", compute_us)) if v is not None}
    if known:
        out["bound"] = max(known, key=known.get)
        out["roofline_us"] = known[out["bound"]]
    return out


def case_summary(case: Case, device: torch.device, ceilings_: dict) -> dict:
    kind = "prefill" if case.kind == "prefill" else "decode"
    return {
        "kind": case.kind, "batch": case.batch, "kv_len": case.kv_len, "query_len": case.query_len,
        "page_sizes": list(case.page_sizes), "tier": case.tier,
        "bytes": case_bytes(case), "bytes_formula": FORMULAS[f"{kind}_bytes"],
        "flops": case_flops(case), "flops_formula": FORMULAS[f"{kind}_flops"],
        **roofline(case_bytes(case), case_flops(case), ceilings_, memory_ceiling_name(device, case.tier)),
    }


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


def measure_matmul(n: int, device: torch.device, timing: Timing) -> dict:
    """Dense bf16 matmul rate of an n x n x n product: the tensor-core ceiling for prefill."""
    a = torch.randn(n, n, dtype=DTYPE, device=device)
    b = torch.randn(n, n, dtype=DTYPE, device=device)
    c = torch.empty(n, n, dtype=DTYPE, device=device)
    stats = time_fn(lambda: torch.mm(a, b, out=c), device, warmup=timing.warmup, repeat=timing.repeat)
    flops = 2 * n ** 3
    return {"flops": flops, **stats, "tflops": flops / (stats["median_us"] * 1e6),
            "method": f"torch.mm of two {n} x {n} bf16 matrices", "n": n}


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, dict]:
    sizes = ceilings.QUICK if quick else ceilings.FULL
    on_gpu = device.type == "cuda"
    result: dict[str, dict] = {}
    if on_gpu:
        result["hbm_read"] = ceilings.guarded(
            "hbm_read", lambda: ceilings.measure_hbm_read(sizes.hbm_bytes, sizes.repeat))
        result["h2d_pinned"] = ceilings.guarded(
            "h2d_pinned", lambda: ceilings.measure_h2d_pinned(sizes.copy_bytes, sizes.repeat))
    else:
        reason = "no CUDA device visible" if not torch.cuda.is_available() else "run on the CPU"
        result["hbm_read"] = {"skipped": f"needs a GPU ({reason})"}
        result["h2d_pinned"] = {"skipped": f"needs a GPU ({reason})"}
        result["host_memcpy"] = ceilings.guarded(
            "host_memcpy", lambda: ceilings.measure_host_memcpy(sizes.host_bytes, sizes.slow_repeat))
    n = (2048 if quick else 8192) if on_gpu else (512 if quick else 2048)
    result["matmul"] = ceilings.guarded(
        "matmul", lambda: measure_matmul(n, device, Timing(3, 20 if on_gpu else 5)))
    return result


# ---------------------------------------------------------------------------------------------
# Inputs: contiguous K/V for SDPA, the same K/V in a paged pool for the paged kernels
# ---------------------------------------------------------------------------------------------


@dataclass
class Dense:
    query: torch.Tensor  # [N, Hq, D], the op's layout (N = batch for decode, tokens for prefill)
    key: torch.Tensor  # [B, Hkv, T, D], SDPA's layout
    value: torch.Tensor
    sdpa_query: torch.Tensor  # [B, Hq, Q, D]


def make_dense(case: Case, device: torch.device) -> Dense:
    if case.kind == "prefill" and case.batch != 1:
        raise ValueError("prefill cases are batch 1 (query = every token)")
    shape = (case.batch, NUM_KV_HEADS, case.kv_len, HEAD_DIM)
    key = torch.randn(shape, dtype=DTYPE, device=device)
    value = torch.randn(shape, dtype=DTYPE, device=device)
    n = case.batch * case.query_len
    query = torch.randn(n, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    if case.kind == "prefill":
        sdpa_query = query.transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, N, D]
    else:
        sdpa_query = query.unsqueeze(2)  # [B, Hq, 1, D]
    return Dense(query, key, value, sdpa_query)


def sdpa_to_op_layout(out: torch.Tensor, case: Case) -> torch.Tensor:
    """[B, Hq, Q, D] -> [N, Hq, D]."""
    return out[0].transpose(0, 1) if case.kind == "prefill" else out[:, :, 0]


def pages_of(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, pages, H, P, D] (a view, or a zero-padded copy when T % P != 0)."""
    b, h, t, d = x.shape
    pages = -(-t // page_size)
    if pages * page_size != t:
        x = F.pad(x, (0, 0, 0, pages * page_size - t))
    return x.view(b, h, pages, page_size, d).transpose(1, 2)


@dataclass
class Paged:
    pool: torch.Tensor  # [F, 1, 2, Hkv, P, D] GPU frames (one unused frame for zero-copy)
    host_pool: torch.Tensor | None  # pinned [S, 1, 2, Hkv, P, D] host slots (zero-copy)
    page_table: torch.Tensor  # int32 [B, pages]
    frames: torch.Tensor  # int64 [B, pages]: frame (or slot) of each logical page
    sequences: torch.Tensor
    query_starts: torch.Tensor
    kv_lens: torch.Tensor
    page_size: int

    @property
    def pages_per_sequence(self) -> int:
        return self.frames.shape[1]


# A GPU maps its memory in 2 MiB pages; `extent` placement keeps runs of consecutive pages in one.
EXTENT_BYTES = 2 << 20
PLACEMENTS = ("random", "extent")


def frame_order(num_pages: int, frame_bytes: int, placement: str, generator: torch.Generator) -> torch.Tensor:
    """The frame of each of `num_pages` logical pages (sequence after sequence): `random`, a random
    permutation; `extent`, runs of consecutive pages filling EXTENT_BYTES of consecutive frames,
    the runs in a random order."""
    if placement == "random":
        return torch.randperm(num_pages, generator=generator)
    if placement != "extent":
        raise ValueError(f"placement {placement!r}: expected one of {PLACEMENTS}")
    per_run = max(1, EXTENT_BYTES // frame_bytes)
    runs = -(-num_pages // per_run)
    start = torch.randperm(runs, generator=generator).repeat_interleave(per_run)[:num_pages] * per_run
    frames = start + torch.arange(num_pages) % per_run
    # A partial last run leaves holes past num_pages; ranking closes them and keeps the order.
    return torch.argsort(torch.argsort(frames))


def build_paged(case: Case, dense: Dense, page_size: int, device: torch.device, seed: int,
                placement: str = "random") -> Paged:
    """The dense K/V written into a pool whose frames are placed by `placement` (frame_order);
    with tier 1, every page lives in a pinned host slot instead and the GPU pool holds one unused
    frame."""
    b = case.batch
    pages = -(-case.kv_len // page_size)
    generator = torch.Generator().manual_seed(seed)
    frame_bytes = 2 * NUM_KV_HEADS * page_size * HEAD_DIM * ELEMENT_BYTES  # one layer
    frames = frame_order(b * pages, frame_bytes, placement, generator).view(b, pages).to(device)
    pool = paged_kv.new_pool(b * pages, 1, NUM_KV_HEADS, page_size, HEAD_DIM, DTYPE, device)
    pool[frames, LAYER, 0] = pages_of(dense.key, page_size)  # index_put: [B, pages, H, P, D]
    pool[frames, LAYER, 1] = pages_of(dense.value, page_size)
    host_pool = None
    if case.tier == 1:
        host_pool = torch.empty(pool.shape, dtype=DTYPE, pin_memory=True).copy_(pool)
        pool = paged_kv.new_pool(1, 1, NUM_KV_HEADS, page_size, HEAD_DIM, DTYPE, device).zero_()
    page_table = paged_kv.new_page_table(b, pages, device)
    # A PTE is its tier's bits OR the index, so make_pte(tier, 0) supplies the tier bits.
    page_table.copy_(frames.to(torch.int32) | paged_kv.make_pte(case.tier, 0))
    assert int(page_table[0, 0]) == paged_kv.make_pte(case.tier, int(frames[0, 0]))
    q = case.query_len
    return Paged(
        pool=pool, host_pool=host_pool, page_table=page_table, frames=frames,
        sequences=torch.arange(b, dtype=torch.int32, device=device),
        query_starts=torch.arange(b + 1, dtype=torch.int32, device=device) * q,
        kv_lens=torch.full((b,), case.kv_len, dtype=torch.int32, device=device),
        page_size=page_size,
    )


# ---------------------------------------------------------------------------------------------
# Kernels under test
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    kernel: str
    call: Callable[[], Any]  # the timed call
    to_op_layout: Callable[[Any], torch.Tensor]  # its result as [N, Hq, D], for the check
    page_size: int | None = None
    tier: int = 0  # where the K/V it reads live: 0 GPU memory, 1 pinned host memory
    details: dict = field(default_factory=dict)
    context: Callable[[], Any] = contextlib.nullcontext  # entered around the timing


def paged_kv_unavailable(device: torch.device) -> str | None:
    """Why paged_kv.attention cannot run on `device` in this build, or None."""
    if paged_kv.LIBRARY_ERROR:
        return paged_kv.LIBRARY_ERROR
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("paged_kv::attention", key):
            return f"this build of paged_kv has no {key} kernel for paged_kv::attention"
    except RuntimeError as exc:  # the op's schema itself is missing (an older build)
        return f"paged_kv::attention is not registered in this build ({exc})"
    return None


def paged_kv_candidate(case: Case, dense: Dense, paged: Paged, device: torch.device) -> Candidate:
    args = (dense.query, paged.pool, paged.page_table, paged.sequences, paged.query_starts,
            paged.kv_lens, LAYER, case.query_len)

    def call():
        return paged_kv.ops.attention(*args, host_pool=paged.host_pool)

    # CUDA ops wait for their kernel to check inputs unless checks are deferred; the timed calls
    # defer them (errors are raised at the end of the block), as a serving loop would.
    context = paged_kv.deferred_checks if device.type == "cuda" else contextlib.nullcontext
    details = {"sync_checks_while_timed": False} if device.type == "cuda" else {}
    return Candidate("paged_kv", call, lambda out: out, paged.page_size, case.tier, details, context)


def sdpa_candidate(case: Case, dense: Dense) -> Candidate:
    causal = case.kind == "prefill"

    def call():
        return F.scaled_dot_product_attention(dense.sdpa_query, dense.key, dense.value,
                                              is_causal=causal, enable_gqa=True)

    return Candidate("sdpa_dense", call, lambda out: sdpa_to_op_layout(out, case),
                     details={"is_causal": causal, "enable_gqa": True})


def copy_then_sdpa_candidate(case: Case, dense: Dense) -> Candidate:
    """The plain alternative to zero-copy: copy K/V from pinned memory, then dense SDPA."""
    host_key = torch.empty(dense.key.shape, dtype=DTYPE, pin_memory=True).copy_(dense.key)
    host_value = torch.empty(dense.value.shape, dtype=DTYPE, pin_memory=True).copy_(dense.value)
    key, value = torch.empty_like(dense.key), torch.empty_like(dense.value)

    def call():
        key.copy_(host_key, non_blocking=True)
        value.copy_(host_value, non_blocking=True)
        return F.scaled_dot_product_attention(dense.sdpa_query, key, value, enable_gqa=True)

    return Candidate("copy_then_sdpa", call, lambda out: sdpa_to_op_layout(out, case), tier=1,
                     details={"method": "two pinned copy_ calls, then SDPA"})


# ---------------------------------------------------------------------------------------------
# Peers: FlexAttention and FlashInfer
# ---------------------------------------------------------------------------------------------


class Flex:
    """FlexAttention paged decode: K/V in PagedAttention's [1, H, pages * P, D] caches, the
    logical block mask mapped to physical pages by PagedAttention.convert_logical_block_mask,
    flex_attention compiled once per shape; no score_mod (the mask_mod bounds each kv_len)."""

    def __init__(self, device: torch.device):
        self.reason: str | None = None
        self.compiled = None
        if device.type != "cuda":
            self.reason = "FlexAttention is measured on CUDA only (compiled Triton kernels)"
            return
        try:
            import torch._dynamo
            from torch.nn.attention.experimental._paged_attention import PagedAttention
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except Exception as exc:
            self.reason = f"FlexAttention paged attention is not importable: {type(exc).__name__}: {exc}"
            return
        self.PagedAttention, self.create_block_mask = PagedAttention, create_block_mask
        # Each case compiles anew (its own shapes and mask_mod); past the recompile limit,
        # dynamo would fall back to eager flex_attention and time that instead.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))
        self.compiled = torch.compile(flex_attention, dynamic=False)

    def candidate(self, case: Case, dense: Dense, device: torch.device, seed: int) -> Candidate:
        p, b = FLEX_PAGE_SIZE, case.batch
        pages = -(-case.kv_len // p)
        num_pages = b * pages
        generator = torch.Generator().manual_seed(seed)
        physical = torch.randperm(num_pages, generator=generator).view(b, pages).to(device)
        paged = self.PagedAttention(num_pages, p, b, device=str(device))
        paged.page_table[:, :pages] = physical
        logical = torch.arange(pages, device=device).expand(b, pages)
        paged.physical_to_logical.scatter_(1, physical, logical)
        paged.capacity.fill_(pages * p)
        paged.empty_pages = []
        caches = []
        for x in (dense.key, dense.value):
            cache = torch.zeros(1, NUM_KV_HEADS, num_pages * p, HEAD_DIM, dtype=DTYPE, device=device)
            cache[0].view(NUM_KV_HEADS, num_pages, p, HEAD_DIM)[:, physical] = (
                pages_of(x, p).permute(2, 0, 1, 3, 4))
            caches.append(cache)
        kv_len = torch.full((b,), case.kv_len, dtype=torch.int64, device=device)

        def within_length(batch, head, q_idx, kv_idx):
            return kv_idx < kv_len[batch]

        logical_mask = self.create_block_mask(within_length, b, None, 1, pages * p,
                                              device=device, BLOCK_SIZE=p)
        # The converted mask_mod maps physical to logical positions and then applies
        # within_length, so partial pages stay bounded without the optional kv_len argument.
        block_mask = paged.convert_logical_block_mask(logical_mask)
        query = dense.sdpa_query.contiguous()
        k_cache, v_cache = caches

        def call():
            return self.compiled(query, k_cache, v_cache, block_mask=block_mask, enable_gqa=True)

        return Candidate("flex_paged", call, lambda out: sdpa_to_op_layout(out, case), p,
                         details={"compiled": "torch.compile(flex_attention, dynamic=False)",
                                  "block_mask": "PagedAttention.convert_logical_block_mask"})


class FlashInfer:
    """FlashInfer 0.2.x paged decode (BatchDecodeWithPagedKVCacheWrapper, CUDA cores and tensor
    cores) and causal prefill (BatchPrefillWithPagedKVCacheWrapper, fa2 and fa3 backends), over
    the same frames as paged_kv: HND reads paged_kv's pool itself ([F, 2, H, P, D] is its HND
    layout), NHD a transposed copy. plan() runs once per case, outside the timing."""

    WORKSPACE_BYTES = 256 << 20

    def __init__(self, device: torch.device):
        self.reason: str | None = None
        self.version = None
        if device.type != "cuda":
            self.reason = "FlashInfer runs on CUDA only"
            return
        try:
            import flashinfer
        except Exception as exc:
            self.reason = f"import flashinfer failed: {type(exc).__name__}: {exc}"
            return
        self.module = flashinfer
        self.version = getattr(flashinfer, "__version__", None)
        self.workspace = torch.zeros(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)

    def _csr(self, paged: Paged, case: Case):
        b, pages, p = case.batch, paged.pages_per_sequence, paged.page_size
        device = paged.frames.device
        indptr = torch.arange(b + 1, dtype=torch.int32, device=device) * pages
        indices = paged.frames.reshape(-1).to(torch.int32)
        last_page_len = torch.full((b,), case.kv_len - (pages - 1) * p, dtype=torch.int32, device=device)
        return indptr, indices, last_page_len

    def decode(self, case: Case, dense: Dense, paged: Paged, cache: torch.Tensor, layout: str,
               tensor_cores: bool) -> Candidate:
        wrapper = self.module.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, kv_layout=layout, use_tensor_cores=tensor_cores)
        wrapper.plan(*self._csr(paged, case), NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, paged.page_size,
                     q_data_type=DTYPE, kv_data_type=DTYPE)
        name = f"flashinfer_decode{'_tc' if tensor_cores else ''}_{layout.lower()}"
        return Candidate(name, lambda: wrapper.run(dense.query, cache), lambda out: out, paged.page_size,
                         details={"kv_layout": layout, "use_tensor_cores": tensor_cores})

    def prefill(self, case: Case, dense: Dense, paged: Paged, cache: torch.Tensor, layout: str,
                backend: str) -> Candidate:
        wrapper = self.module.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, kv_layout=layout, backend=backend)
        qo_indptr = paged.query_starts
        wrapper.plan(qo_indptr, *self._csr(paged, case), NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM,
                     paged.page_size, causal=True, q_data_type=DTYPE, kv_data_type=DTYPE)
        name = f"flashinfer_prefill_{backend}_{layout.lower()}"
        return Candidate(name, lambda: wrapper.run(dense.query, cache), lambda out: out, paged.page_size,
                         details={"kv_layout": layout, "backend": backend, "causal": True})


# ---------------------------------------------------------------------------------------------
# Measuring one candidate
# ---------------------------------------------------------------------------------------------


def compare(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = out.float() - reference.float()
    max_abs = float(diff.abs().max())
    rel = float(diff.norm() / reference.float().norm().clamp_min(1e-30))
    if not (math.isfinite(max_abs) and math.isfinite(rel)):
        return {"max_abs_diff": None, "rel_l2_diff": None, "correct": False,
                "check": "output holds NaN or infinity"}
    outside = int((diff.abs() > TOL * (1 + reference.float().abs())).sum())
    correct = outside == 0 and rel <= TOL
    return {"max_abs_diff": max_abs, "rel_l2_diff": rel, "elements_outside_tolerance": outside,
            "correct": correct}


def base_row(case: Case, kernel: str, page_size: int | None) -> dict:
    return {"case": case.name, "kind": case.kind, "kernel": kernel, "page_size": page_size,
            "batch": case.batch, "kv_len": case.kv_len, "query_len": case.query_len}


@dataclass
class Entry:
    """One candidate of a case: its row, and its timing in each round."""
    row: dict
    candidate: Candidate | None  # None when it failed or is skipped
    rounds: list[dict] = field(default_factory=list)


def prepare(case: Case, make: Callable[[], Candidate], reference: torch.Tensor, kernel: str,
            page_size: int | None) -> Entry:
    """Build one candidate and check its output; a failure becomes an `error` in the row."""
    row = base_row(case, kernel, page_size)
    print(f"  {case.name} {kernel} page {page_size} ...", file=sys.stderr, flush=True)
    try:
        candidate = make()
        row.update(kernel=candidate.kernel, page_size=candidate.page_size, **candidate.details)
        row.update(compare(candidate.to_op_layout(candidate.call()), reference))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        free_memory()
        return Entry(row, None)
    return Entry(row, candidate)


def time_rounds(entries: list[Entry], device: torch.device, timing: Timing, cold_l2: bool) -> None:
    """Time every candidate once per round: a drift of the machine's speed during the case
    (clocks, temperature, a neighbour's load) then reaches every candidate alike, and each round
    gives a ratio of times taken seconds apart."""
    for r in range(timing.rounds):
        # Each round starts one candidate further on, so none always follows the same one.
        start = r % len(entries) if entries else 0
        for entry in entries[start:] + entries[:start]:
            if entry.candidate is None:
                continue
            try:
                with entry.candidate.context():
                    entry.rounds.append(time_fn(entry.candidate.call, device, warmup=timing.warmup,
                                                repeat=timing.repeat, cold_l2=cold_l2))
            except Exception as exc:
                entry.row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                entry.candidate = None


def finish(entry: Entry, case: Case, device: torch.device, ceilings_: dict, cold_l2: bool) -> dict:
    """The row of a timed candidate: the median over rounds of each round's median call time, the
    work, and the fraction of the same-run ceiling."""
    row = entry.row
    if entry.candidate is None or not entry.rounds:
        return row
    tier = entry.candidate.tier
    medians = [stats["median_us"] for stats in entry.rounds]
    time_us = statistics.median(medians)
    bytes_, flops = case_bytes(case), case_flops(case)
    memory_ceiling = memory_ceiling_name(device, tier)
    ceiling = "matmul" if case.kind == "prefill" else memory_ceiling
    rate = ceiling_rate(ceilings_, ceiling)
    row.update(
        time_us=time_us, round_times_us=medians, rounds=len(medians),
        p10_us=statistics.median(stats["p10_us"] for stats in entry.rounds),
        p90_us=statistics.median(stats["p90_us"] for stats in entry.rounds),
        min_us=min(stats["min_us"] for stats in entry.rounds), repeat=entry.rounds[0]["repeat"],
        cold_l2=cold_l2, bytes=bytes_, flops=flops, gbps=gbps(bytes_, time_us),
        tflops=flops / (time_us * 1e6), ceiling=ceiling,
    )
    achieved = row["tflops"] if ceiling == "matmul" else row["gbps"]
    row["fraction_of_ceiling"] = achieved / rate if rate else None
    line = roofline(bytes_, flops, ceilings_, memory_ceiling)
    row["roofline_us"] = line.get("roofline_us")
    row["bound"] = line.get("bound")
    return row


def round_times(entries: dict, what: str) -> dict:
    """Each entry's median call time in every round, by the entries' keys; a failed or skipped
    timing raises, naming every such entry (`what` says whose), rather than leave a round out."""
    failed = [f"{key}: {entry.row.get('error', 'not timed')}" for key, entry in entries.items()
              if "error" in entry.row or entry.candidate is None]
    if failed:
        raise RuntimeError(f"{what}: " + "; ".join(failed))
    return {key: [stats["median_us"] for stats in entry.rounds] for key, entry in entries.items()}


def paired_ratio(mine: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """The median, lowest and highest over rounds of one time over another taken in the same round."""
    ratios = [a / b for a, b in zip(mine, theirs, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def time_ratio(row: dict, peer: dict) -> tuple[float, float, float]:
    """row's time over peer's, with the lowest and highest: from the ratios of the rounds when both
    were timed in the same rounds (their median), else from the two times."""
    mine, theirs = row.get("round_times_us"), peer.get("round_times_us")
    if mine and theirs and len(mine) == len(theirs):
        return paired_ratio(mine, theirs)
    ratio = row["time_us"] / peer["time_us"]
    return ratio, ratio, ratio


def add_ratios(rows: list[dict]) -> None:
    """Correct paged_kv rows get their time over each correct peer's time on the same case."""
    for row in rows:
        if row["kernel"] != "paged_kv" or "time_us" not in row or not row.get("correct"):
            continue
        ratios, ranges = {}, {}
        for peer in rows:
            same_pages = peer["kernel"] in PAGE_INDEPENDENT or peer["page_size"] == row["page_size"]
            if (peer["kernel"] != "paged_kv" and peer["case"] == row["case"] and same_pages
                    and "time_us" in peer and peer.get("correct")):
                ratio, low, high = time_ratio(row, peer)
                ratios[peer["kernel"]], ranges[peer["kernel"]] = ratio, [low, high]
        row["time_ratio_vs"] = ratios
        row["time_ratio_range_vs"] = ranges
        if ratios:
            best = max(ratios, key=ratios.get)  # the fastest peer gives the largest ratio
            row["best_peer"], row["time_ratio_vs_best_peer"] = best, ratios[best]


# ---------------------------------------------------------------------------------------------
# All cases
# ---------------------------------------------------------------------------------------------


def run_case(case: Case, index: int, device: torch.device, ceilings_: dict, timing: Timing,
             cold_l2: bool, flex: Flex, flashinfer: FlashInfer) -> list[dict]:
    """Every candidate of the case built and checked, then timed in interleaved rounds."""
    print(f"case {case.name}", file=sys.stderr, flush=True)
    if case.tier == 1 and device.type != "cuda":
        return [{**base_row(case, "paged_kv", page),
                 "skipped": "zero-copy needs a CUDA device (a GPU kernel reading pinned host memory)"}
                for page in case.page_sizes]
    torch.manual_seed(index)
    dense = make_dense(case, device)
    reference = sdpa_to_op_layout(sdpa_candidate(case, dense).call(), case).clone()
    cold = cold_l2 and case.kind != "prefill"
    entries: list[Entry] = []

    def add(make, kernel, page_size=None):
        entries.append(prepare(case, make, reference, kernel, page_size))

    add(lambda: sdpa_candidate(case, dense), "sdpa_dense")
    if case.tier == 1:
        add(lambda: copy_then_sdpa_candidate(case, dense), "copy_then_sdpa")
    if case.kind == "decode" and flex.compiled is not None:
        add(lambda: flex.candidate(case, dense, device, seed=index), "flex_paged", FLEX_PAGE_SIZE)
    missing = paged_kv_unavailable(device)
    for page_size in case.page_sizes:
        paged = build_paged(case, dense, page_size, device, seed=100 * index + page_size)
        if missing:
            entries.append(Entry({**base_row(case, "paged_kv", page_size), "skipped": missing}, None))
        else:
            add(lambda: paged_kv_candidate(case, dense, paged, device), "paged_kv", page_size)
        if flashinfer.reason is None and case.tier == 0:
            add_flashinfer(case, dense, paged, flashinfer, add)
    time_rounds(entries, device, timing, cold)
    rows = [finish(entry, case, device, ceilings_, cold) for entry in entries]
    add_ratios(rows)
    del entries, dense, reference
    free_memory()
    return rows


def add_flashinfer(case: Case, dense: Dense, paged: Paged, flashinfer: FlashInfer, add) -> None:
    p = paged.page_size
    for layout in ("HND", "NHD"):
        pool_layer = paged.pool[:, LAYER]  # [F, 2, H, P, D]: FlashInfer's HND layout
        cache = pool_layer if layout == "HND" else pool_layer.transpose(2, 3).contiguous()
        if case.kind == "prefill":
            for backend in ("fa2", "fa3"):
                add(lambda: flashinfer.prefill(case, dense, paged, cache, layout, backend),
                    f"flashinfer_prefill_{backend}_{layout.lower()}", p)
        else:
            for tensor_cores in (False, True):
                name = f"flashinfer_decode{'_tc' if tensor_cores else ''}_{layout.lower()}"
                add(lambda: flashinfer.decode(case, dense, paged, cache, layout, tensor_cores), name, p)


def failures_of(rows: list[dict]) -> list[str]:
    """paged_kv rows that errored or disagree with dense SDPA."""
    failed = []
    for row in rows:
        if row["kernel"] != "paged_kv" or "skipped" in row:
            continue
        if "error" in row:
            failed.append(f"{row['case']} page {row['page_size']}: {row['error']}")
        elif not row.get("correct"):
            failed.append(f"{row['case']} page {row['page_size']}: output differs from dense SDPA "
                          f"(max abs {row.get('max_abs_diff')}, relative L2 {row.get('rel_l2_diff')}, "
                          f"{row.get('elements_outside_tolerance')} elements beyond {TOL} * (1 + |ref|))")
    return failed


def display_rows(rows: list[dict]) -> list[dict]:
    shown = []
    for row in rows:
        status = "ok" if row.get("correct") else ("WRONG" if "correct" in row else "")
        if "skipped" in row:
            status = f"skipped: {row['skipped']}"
        elif "error" in row:
            status = f"error: {row['error'][:120]}"
        ratios = row.get("time_ratio_vs", {})
        low, high = row.get("time_ratio_range_vs", {}).get("sdpa_dense", (None, None))
        shown.append({**row, "vs_sdpa": ratios.get("sdpa_dense"), "vs_sdpa_low": low, "vs_sdpa_high": high,
                      "vs_best_peer": row.get("time_ratio_vs_best_peer"), "status": status})
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = bench_args("paged_kv.attention against dense SDPA, FlexAttention and FlashInfer, "
                        "beside HBM, PCIe and matmul ceilings measured in this run.")
    parser.add_argument("--cases", metavar="REGEX", default=None,
                        help="run only the cases whose name matches (e.g. 'decode_b1|prefill')")
    parser.add_argument("--skip-peers", default="", metavar="LIST",
                        help="comma-separated peers to leave out: flex, flashinfer")
    parser.add_argument("--warm-l2", action="store_true",
                        help="time decode without flushing the L2 before each call")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per case (default: 5 on a GPU, else 1)")
    parser.add_argument("--name", default="attention",
                        help="results file stem (default: attention), e.g. for a run of some --cases")
    args = parser.parse_args(argv)
    # --quick alone stays on the CPU; --quick --device cuda is a fast smoke test on the GPU.
    device = bench_device(args)
    skip = {name.strip() for name in args.skip_peers.split(",") if name.strip()}
    unknown = skip - {"flex", "flashinfer"}
    if unknown:
        parser.error(f"--skip-peers: unknown peers {sorted(unknown)} (known: flex, flashinfer)")
    cases = [c for c in (QUICK_CASES if args.quick else FULL_CASES)
             if args.cases is None or re.search(args.cases, c.name)]
    if not cases:
        parser.error(f"--cases {args.cases!r} matches no case")
    on_gpu = device.type == "cuda"
    rounds = args.rounds if args.rounds is not None else 5 if on_gpu and not args.quick else 1
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    timing = Timing(3, 20, rounds) if args.quick and on_gpu else Timing(1, 5, rounds) if not on_gpu \
        else Timing(10, 100, rounds)
    prefill_timing = Timing(3, 30, rounds) if on_gpu and not args.quick else timing

    ceilings_ = measure_ceilings(device, args.quick)
    flex = Flex(device)
    if "flex" in skip:
        flex.compiled, flex.reason = None, "left out with --skip-peers"
    flashinfer = FlashInfer(device)
    if "flashinfer" in skip:
        flashinfer.reason = "left out with --skip-peers"
    rows: list[dict] = []
    for index, case in enumerate(cases):
        case_timing = prefill_timing if case.kind == "prefill" else timing
        rows += run_case(case, index, device, ceilings_, case_timing, not args.warm_l2, flex, flashinfer)

    print(format_table(display_rows(rows), ["case", "kernel", "page_size", "time_us", "gbps", "tflops",
                                            "ceiling", "fraction_of_ceiling", "max_abs_diff", "vs_sdpa",
                                            "vs_sdpa_low", "vs_sdpa_high", "vs_best_peer", "status"]))
    failures = failures_of(rows)
    extra = {
        "config": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                   "dtype": "bfloat16", "num_layers": 1, "page_placement": "random permutation of frames",
                   "cold_l2_decode": not args.warm_l2,
                   "l2_flush": "before each decode call, outside the timing: a buffer twice the L2 "
                               "written, then read, so the L2 holds none of the case's data and "
                               "no dirty lines",
                   "check": f"|out - sdpa| <= {TOL} * (1 + |sdpa|) everywhere and "
                            f"||out - sdpa|| / ||sdpa|| <= {TOL}",
                   "timing": asdict(timing),
                   "prefill_timing": asdict(prefill_timing)},
        "formulas": FORMULAS,
        "cases": {case.name: case_summary(case, device, ceilings_) for case in cases},
        "peers": {
            "flex_paged": {"skipped": flex.reason} if flex.reason else {"page_size": FLEX_PAGE_SIZE},
            "flashinfer": {"skipped": flashinfer.reason} if flashinfer.reason else {"version": flashinfer.version},
            "paged_kv": {"skipped": paged_kv_unavailable(device)} if paged_kv_unavailable(device) else {},
        },
        "failures": failures,
    }
    path = write_results(args.name, ceilings_, rows, out_dir=args.out, quick=args.quick, device=device,
                         extra=extra)
    print(f"wrote {path}")
    if failures:
        print("FAILED: paged_kv.attention is wrong or failed on these cases:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
