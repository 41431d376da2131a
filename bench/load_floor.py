"""The load floor of decode: how fast the decode kernel's access pattern alone reads K and V.

For the decode cases of bench/attention.py (bf16, 8 KV heads, head_dim 128, pages of 256 tokens,
or of --page-size tokens, in a random frame order), times in one run, each with the L2 flushed
before every call:
  sdpa_dense      F.scaled_dot_product_attention over contiguous K/V (the bar of issue 3)
  paged_kv        paged_kv.ops.attention (the whole op: lookups, tile math, split merge)
  load_per_warp   the load-only kernel of bench/load_floor.cu in the decode kernel's grid and
                  pattern (per-warp pipelines of 16-token tiles, the same split count)
  load_block_64   the same bytes read by 4-warp blocks sharing 64-token tiles, 2 per SM (pages
                  of at least 64 tokens)
  load_head_warps the same bytes read by one 8-warp block per SM whose warp w reads KV head w of
                  the block's pages, so the eight heads' runs of a frame are read together
                  (3-stage pipelines per warp, a block per sequence and split)
and the HBM read ceiling. `--shapes` instead times load_per_warp alone at each block shape of
SHAPES (warps a block, stages, blocks a multiprocessor, the last capped by padding the dynamic
shared memory), for pages of 256 and of 16 in random frames, beside SDPA and paged_kv, in
interleaved rounds; it writes load_floor_shapes.json. At the decode kernel's two shapes it also
times load_per_warp with a claimed tail, the last TAIL_SHARE / 64 of each column's tiles claimed
two at a time once a warp's static tiles are done: by the warps of the column's own blocks
(load_claimed_tail, as the decode kernel does where each warp has 32 tiles or more), or from one
pool of every column's tail that any warp of the grid claims from (load_pooled_tail: the
multiprocessors that stream fastest read more of it, which is what handing keys across columns
could give, before the merge it needs); and load_head_warps at the shapes of HEAD_WARP_SHAPES
(blocks of eight, four or two KV heads), at those of a warp a head also with the merge that
such a split grid needs: partial states stored, then merged in one round trip by a merge
kernel after the grid (load_head_warps_merge_kernel; load_per_warp_merge_kernel for the decode
kernel's own shapes where they split; launched plainly, so the gap between two kernels is in
it, where the decode kernel's merge starts early), or by the last block of each column where
there are at most MERGE_MAX_SPLITS splits (load_head_warps_merged). `--placement extent` places the frames as
bench/attention.py's frame_order does (runs of consecutive pages in 2 MiB of consecutive frames)
instead of randomly. The load-only kernels are compiled with NVRTC through CuPy, so the
script needs CuPy and a CUDA GPU. Writes bench/results/load_floor.json (pages of 256) or
load_floor_page<N>.json, with the suffix _extent under --placement extent.

    python bench/load_floor.py [--cases REGEX] [--page-size N] [--placement P] [--out DIR]
    python bench/load_floor.py --shapes [--cases REGEX] [--rounds N] [--out DIR]
"""
from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import paged_kv

from bench import attention as A
from bench import ceilings
from bench.harness import bench_args, format_table, free_memory, gbps, time_cuda, write_results

KERNEL_SOURCE = Path(__file__).resolve().parent / "load_floor.cu"
CASES = [c for c in A.FULL_CASES if c.kind == "decode" and c.tier == 0]
PAGE_SIZE = 256  # the default; --page-size picks another
WIDE_MAX_TOKENS = 128 * 1024  # as kWideDecodeMaxTokens in csrc/cuda/attention.cu
DECODE_STAGES = 2  # as DecodeKeysAsMConfig and WideDecodeKeysAsMConfig at head_dim 128
# (warps a block, stages, blocks a multiprocessor) for --shapes; (4, 2, 2) is the decode kernel's
# pattern at 1M tokens and batch 32, (12, 2, 1) its wide block's.
SHAPES = ((4, 2, 2), (4, 2, 3), (4, 2, 1), (4, 3, 1), (4, 3, 2), (2, 2, 2), (3, 2, 2), (6, 2, 2),
          (2, 2, 3), (2, 4, 2), (8, 2, 1), (12, 2, 1))
SHAPE_PAGE_SIZES = (256, 16)
BLOCK_RESERVED_SMEM = 1024  # shared memory the GPU reserves for each resident block
WARP_TILE_BYTES = 16 * A.HEAD_DIM * 2  # K or V of one KV head's 16-token tile (load_per_warp)
TAIL_SHARE = 8  # as kTailShare in csrc/cuda/attention_device.cuh: 8 / 64 of a column's tiles
TAIL_SHAPES = ((4, 2, 2), (12, 2, 1))  # the decode kernel's shapes, where --shapes times the tails
TAIL_KERNELS = {"per_warp_claims": "load_claimed_tail", "per_warp_pooled": "load_pooled_tail"}
# (warps a block, stages, KV heads a block, blocks a multiprocessor) of load_head_warps in
# --shapes, splits planned as for the decode kernel's blocks: all eight heads of a page in one
# block a multiprocessor (as in the default run), or four in 4-warp blocks, three or two a
# multiprocessor (the decode kernel's warps a multiprocessor), or in a 12-warp block, or two
# heads in 4-warp blocks.
HEAD_WARP_SHAPES = ((8, 3, 8, 1), (8, 2, 8, 1), (4, 2, 4, 3), (4, 2, 4, 2), (12, 2, 4, 1), (4, 2, 2, 3))
# The shapes of HEAD_WARP_SHAPES with a warp a head, which --shapes also times with the split
# merge (MERGE_KINDS).
MERGED_SHAPES = tuple(shape for shape in HEAD_WARP_SHAPES if shape[0] == shape[2])
QUERY_ROWS = A.NUM_Q_HEADS // A.NUM_KV_HEADS  # query heads a KV head: the rows of its state
MERGE_MAX_SPLITS = 8  # as kMergeMaxSplits in load_floor.cu: the splits one merge round trip holds
MERGE_KERNEL_WARPS = 8  # as kMergeWarps in load_floor.cu: merge_states_kernel's warps a row
# merge_states_kernel's instances, by the splits a warp holds: a launch takes the smallest that
# holds its splits (at most 8 x 32).
MERGE_KERNEL_PER_WARP = (1, 8, 32)
MERGE_KERNEL_MAX_SPLITS = MERGE_KERNEL_WARPS * MERGE_KERNEL_PER_WARP[-1]
HEAD_KINDS = ("head_warps", "head_warps_merged", "head_warps_stored")
# Kinds that store split states and merge them: in the kernel (head_warps_merged), or by the
# merge kernel after the grid (the others).
MERGE_KINDS = {"head_warps_merged": "load_head_warps_merged",
               "head_warps_stored": "load_head_warps_merge_kernel",
               "per_warp_stored": "load_per_warp_merge_kernel"}
PER_WARP_KINDS = ("per_warp", "per_warp_stored", *HEAD_KINDS, *TAIL_KERNELS)


def kernel_names() -> dict[tuple, str]:
    """The kernels of load_floor.cu that the script launches: (kind, shape...) -> the template
    instance's name (NVRTC name expression)."""
    names = {("per_warp", 12, 2): "per_warp<12, 2>", ("per_warp", 4, 2): "per_warp<4, 2>",
             ("block_tiles", 64, 3): "block_tiles<64, 3>"}
    names.update({("head_warps", w, st, g): f"head_warps<{w}, {st}, {g}>" for w, st, g, _ in HEAD_WARP_SHAPES})
    for w, st, g, _ in MERGED_SHAPES:
        names[("head_warps_merged", w, st, g)] = f"head_warps_merged<{w}, {st}, {g}, {QUERY_ROWS}, true>"
        names[("head_warps_stored", w, st, g)] = f"head_warps_merged<{w}, {st}, {g}, {QUERY_ROWS}, false>"
    names.update({("per_warp_stored", w, st): f"per_warp_stored<{w}, {st}, {QUERY_ROWS}>" for w, st, _ in TAIL_SHAPES})
    names.update({("merge_states", n): f"merge_states_kernel<{n}>" for n in MERGE_KERNEL_PER_WARP})
    names.update({("per_warp", w, st): f"per_warp<{w}, {st}>" for w, st, _ in SHAPES})
    for warps, stages, _ in TAIL_SHAPES:
        names[("per_warp_claims", warps, stages)] = f"per_warp_claims<{warps}, {stages}, false>"
        names[("per_warp_pooled", warps, stages)] = f"per_warp_claims<{warps}, {stages}, true>"
    return names


class LoadKernels:
    """The NVRTC-compiled kernels of load_floor.cu, launched on torch's current stream."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise SystemExit(f"load_floor needs CuPy to compile its kernels ({exc})") from exc
        self.cupy = cupy
        self.names = kernel_names()
        self.module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",),
                                     name_expressions=list(self.names.values()))
        self.result = torch.zeros(1, dtype=torch.int32, device="cuda")
        self.buffers: list[torch.Tensor] = []  # claim counters and merge states, kept as the kernels
        self.merges: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []  # see check_merges
        self.smem_limits: dict[str, int] = {}  # the dynamic shared memory each function allows

    def check_merges(self) -> None:
        """Raises unless every merging kernel launched so far merged every column (its output,
        NaN before, finite) and, merging in the kernel, left its counters at zero for the next
        launch."""
        for name, out, counters in self.merges:
            if not torch.isfinite(out).all() or (counters is not None and counters.any()):
                raise RuntimeError(f"{name}: a column was not merged, or its counter not reset")

    def torch_stream(self):
        """torch's current stream as a CuPy stream (Stream.from_external where CuPy has it)."""
        current = torch.cuda.current_stream()
        from_external = getattr(self.cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            try:
                return from_external(current)
            except (TypeError, AttributeError):  # a torch stream without __cuda_stream__
                pass
        return self.cupy.cuda.ExternalStream(current.cuda_stream)

    def launcher(self, kind: str, a: int, b: int, paged: A.Paged, case: A.Case, splits: int,
                 per_sm: int, smem_floor: int = 0, group: int = A.NUM_KV_HEADS):
        """The call of one kernel over the case; `smem_floor` pads its dynamic shared memory (so
        fewer blocks fit on a multiprocessor); `group` is head_warps' KV heads a block."""
        key = (kind, a, b, group) if kind in HEAD_KINDS else (kind, a, b)
        if key not in self.names:
            raise ValueError(f"load_floor.cu has no kernel {key} compiled")
        kernel = self.module.get_function(self.names[key])
        per_warp_rings = kind in PER_WARP_KINDS
        threads = a * 32 if per_warp_rings else 128
        tile_bytes = (16 if per_warp_rings else a) * A.HEAD_DIM * 2
        smem = max(smem_floor, (a if per_warp_rings else 1) * b * 2 * tile_bytes)
        if kind in ("head_warps_merged", "head_warps_stored") and a != group:
            raise ValueError(f"{kind}<{a}, {b}, {group}>: one warp a KV head")
        if kind in MERGE_KINDS and kind != "head_warps_merged" and splits > MERGE_KERNEL_MAX_SPLITS:
            raise ValueError(f"merge_states_kernel merges at most {MERGE_KERNEL_MAX_SPLITS} splits "
                             f"(got {splits})")
        if kind == "head_warps_merged" and splits > MERGE_MAX_SPLITS:
            raise ValueError(f"head_warps_merged merges at most {MERGE_MAX_SPLITS} splits in the "
                             f"kernel (got {splits})")
        if kind in HEAD_KINDS and (a % group or A.NUM_KV_HEADS % group):
            raise ValueError(f"head_warps<{a}, {b}, {group}>: the warps must be a multiple of the "
                             f"group, and the group divide {A.NUM_KV_HEADS} KV heads")
        # The attribute belongs to the function, which launches of other paddings share: it only
        # grows.
        name = self.names[key]
        self.smem_limits[name] = max(self.smem_limits.get(name, 0), smem)
        kernel.max_dynamic_shared_size_bytes = self.smem_limits[name]
        pool, frames = paged.pool, paged.page_table
        if pool.shape[1] != 1 or not pool.is_contiguous() or not frames.is_contiguous():
            raise ValueError("load_floor expects a contiguous one-layer pool and page table")
        args = (np.uint64(pool.data_ptr()), np.uint64(frames.data_ptr()), np.int64(pool.stride(0)),
                np.int32(A.NUM_KV_HEADS), np.int32(paged.page_size), np.int32(A.HEAD_DIM),
                np.int32(case.kv_len), np.int32(frames.shape[1]), np.int32(splits))
        heads_per_block = group if kind in HEAD_KINDS else 1
        grid = case.batch * splits * (A.NUM_KV_HEADS // heads_per_block)
        details = {"grid": grid, "threads": threads, "smem_bytes": smem, "splits": splits,
                   "blocks_per_sm_intended": per_sm}
        if kind in TAIL_KERNELS:
            # Zeroed claim counters (one per column, or the first for the pool), which every
            # launch leaves at zero again; kept as long as the kernels.
            counters = torch.zeros(case.batch * A.NUM_KV_HEADS, dtype=torch.int32, device="cuda")
            self.buffers.append(counters)
            args += (np.int32(TAIL_SHARE), np.uint64(counters.data_ptr()))
            details["tail_share"] = TAIL_SHARE
        merge = None
        if kind in MERGE_KINDS:
            # Each split's states of every query head and the merged bf16 output (NaN until
            # merged); head_warps_merged also takes a zeroed counter per (sequence, head group),
            # which every launch leaves at zero again.
            rows = case.batch * A.NUM_Q_HEADS
            states = torch.empty(splits * rows * (A.HEAD_DIM + 1), dtype=torch.float32, device="cuda")
            partial_out, partial_lse = states.data_ptr(), states.data_ptr() + splits * rows * A.HEAD_DIM * 4
            out = torch.full((rows * A.HEAD_DIM,), float("nan"), dtype=torch.bfloat16, device="cuda")
            counters = None
            args += (np.uint64(partial_out), np.uint64(partial_lse))
            if kind == "head_warps_merged":
                counters = torch.zeros(case.batch * A.NUM_KV_HEADS // group, dtype=torch.int32, device="cuda")
                args += (np.uint64(counters.data_ptr()), np.uint64(out.data_ptr()))
            elif kind == "head_warps_stored":
                args += (np.uint64(0), np.uint64(0))  # the in-kernel merge's, unused
            self.buffers += [states, out] + ([counters] if counters is not None else [])
            self.merges.append((f"{self.names[key]} over {case.name}", out, counters))
            if kind != "head_warps_merged":
                per_warp = next(n for n in MERGE_KERNEL_PER_WARP if n * MERGE_KERNEL_WARPS >= splits)
                merge = (self.module.get_function(self.names[("merge_states", per_warp)]), rows,
                         (np.uint64(partial_out), np.uint64(partial_lse), np.int32(splits),
                          np.int64(rows), np.uint64(out.data_ptr())))
        args += (np.uint64(self.result.data_ptr()),)
        stream = self.torch_stream()

        def call() -> None:
            with stream:
                kernel((grid,), (threads,), args, shared_mem=smem)
                if merge is not None:
                    merge[0]((merge[1],), (MERGE_KERNEL_WARPS * 32,), merge[2])

        return call, details


def decode_grid(case: A.Case, num_sms: int) -> tuple[int, int, int]:
    """(warps per block, blocks per SM, splits) as the decode kernel plans them (plan_with)."""
    columns = case.batch * A.NUM_KV_HEADS
    wide = case.kv_len <= WIDE_MAX_TOKENS and columns < num_sms
    # 12 warps of 2 stages fill one multiprocessor's shared memory; 4-warp blocks fit three, but
    # splits are planned for two (kDecodeBlocksPerSmPlanned).
    warps, per_sm = (12, 1) if wide else (4, 2)
    return warps, per_sm, planned_splits(case, num_sms, per_sm)


def planned_splits(case: A.Case, num_sms: int, per_sm: int, heads_per_block: int = 1) -> int:
    """Key splits of each sequence, as plan_with plans them for `per_sm` blocks a multiprocessor
    of `heads_per_block` KV heads: enough to fill one wave, none of fewer than 512 tokens."""
    columns = case.batch * A.NUM_KV_HEADS // heads_per_block
    wave = num_sms * per_sm
    splits = 1 if columns >= wave else wave // columns
    return max(1, min(splits, case.kv_len // 512))


def shape_launch(case: A.Case, warps: int, stages: int, per_sm: int, num_sms: int,
                 smem_per_sm: int, smem_per_block: int,
                 heads_per_block: int = 1) -> tuple[int, int] | None:
    """(splits, dynamic shared memory) for load_per_warp (or load_head_warps, with
    `heads_per_block`) at `per_sm` blocks a multiprocessor: splits as the decode kernel plans
    them for that many, the shared memory padded so that one block more does not fit; None where
    `per_sm` blocks of the shape do not fit."""
    need = warps * stages * 2 * WARP_TILE_BYTES
    smem = max(need, smem_per_sm // (per_sm + 1) - BLOCK_RESERVED_SMEM + 1)
    if smem > smem_per_block or per_sm * (smem + BLOCK_RESERVED_SMEM) > smem_per_sm:
        return None
    return planned_splits(case, num_sms, per_sm, heads_per_block), smem


def head_warps_splits(case: A.Case, num_sms: int) -> int:
    """Splits of each sequence for load_head_warps of every KV head: one block per
    multiprocessor, at least 512 tokens a split."""
    return planned_splits(case, num_sms, 1, A.NUM_KV_HEADS)


def run_case(case: A.Case, kernels: LoadKernels, hbm_gbps: float, num_sms: int,
             page_size: int = PAGE_SIZE, placement: str = "random") -> list[dict]:
    torch.manual_seed(0)
    dense = A.make_dense(case, torch.device("cuda"))
    paged = A.build_paged(case, dense, page_size, torch.device("cuda"), seed=1, placement=placement)
    case_bytes = A.case_bytes(case)
    candidates = {"sdpa_dense": (A.sdpa_candidate(case, dense), {}),
                  "paged_kv": (A.paged_kv_candidate(case, dense, paged, torch.device("cuda")), {})}
    warps, per_sm, splits = decode_grid(case, num_sms)
    timed = {}
    for name, (candidate, details) in candidates.items():
        with candidate.context():
            timed[name] = (time_cuda(candidate.call, warmup=10, repeat=100, cold_l2=True), details)
    block_splits = max(1, 2 * num_sms // (case.batch * A.NUM_KV_HEADS))
    loads = {"load_per_warp": kernels.launcher("per_warp", warps, DECODE_STAGES, paged, case, splits,
                                               per_sm)}
    if page_size % 64 == 0:  # 64-token tiles within one page
        loads["load_block_64"] = kernels.launcher("block_tiles", 64, 3, paged, case, block_splits, 2)
    loads["load_head_warps"] = kernels.launcher("head_warps", 8, 3, paged, case,
                                                head_warps_splits(case, num_sms), 1)
    for name, (call, details) in loads.items():
        call()
        torch.cuda.synchronize()
        timed[name] = (time_cuda(call, warmup=10, repeat=100, cold_l2=True), details)
    sdpa_us = timed["sdpa_dense"][0]["median_us"]
    rows = []
    for name, (timing, details) in timed.items():
        rate = gbps(case_bytes, timing["median_us"])
        rows.append({"case": case.name, "kernel": name, "page_size": None if name == "sdpa_dense" else page_size,
                     "placement": None if name == "sdpa_dense" else placement,
                     "bytes": case_bytes, "time_us": timing["median_us"], "p10_us": timing["p10_us"],
                     "p90_us": timing["p90_us"], "gbps": rate, "fraction_of_hbm_read": rate / hbm_gbps,
                     "vs_sdpa": timing["median_us"] / sdpa_us, **details})
    del paged, dense, candidates
    free_memory()
    return rows


def run_shapes(case: A.Case, kernels: LoadKernels, hbm_gbps: float, rounds: int) -> list[dict]:
    """SDPA, paged_kv and load_per_warp at every shape of SHAPES (and at TAIL_SHAPES with claimed
    tails too, and with their split merge where they split), and load_head_warps at
    HEAD_WARP_SHAPES (and at MERGED_SHAPES with the split merge too: by the merge kernel, and in
    the kernel where the splits are at most MERGE_MAX_SPLITS), pages of 256 and 16 in random frames,
    timed in `rounds` interleaved rounds; a ratio is over SDPA's time in the same round."""
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    torch.manual_seed(0)
    dense = A.make_dense(case, device)
    found = {("sdpa_dense", None, None): (A.sdpa_candidate(case, dense), {})}
    keep = []
    for page_size in SHAPE_PAGE_SIZES:
        paged = A.build_paged(case, dense, page_size, device, seed=1)
        keep.append(paged)
        found[("paged_kv", page_size, None)] = (A.paged_kv_candidate(case, dense, paged, device), {})
        for warps, stages, per_sm in SHAPES:
            launch = shape_launch(case, warps, stages, per_sm, props.multi_processor_count,
                                  props.shared_memory_per_multiprocessor, props.shared_memory_per_block_optin)
            if launch is None:
                continue
            splits, smem = launch
            kinds = ("per_warp",)
            if (warps, stages, per_sm) in TAIL_SHAPES:
                # the decode kernel's shapes: its claimed tail, and where it splits, its merge
                kinds += (*TAIL_KERNELS, *(("per_warp_stored",) if splits > 1 else ()))
            for kind in kinds:
                name = {**TAIL_KERNELS, **MERGE_KINDS}.get(kind, "load_per_warp")
                call, details = kernels.launcher(kind, warps, stages, paged, case, splits, per_sm, smem)
                call()
                found[(name, page_size, (warps, stages, per_sm))] = (A.Candidate(name, call, None), details)
        for warps, stages, group, per_sm in HEAD_WARP_SHAPES:
            launch = shape_launch(case, warps, stages, per_sm, props.multi_processor_count,
                                  props.shared_memory_per_multiprocessor,
                                  props.shared_memory_per_block_optin, group)
            if launch is None:
                continue
            splits, smem = launch
            kinds = ("head_warps",)
            if (warps, stages, group, per_sm) in MERGED_SHAPES:
                kinds += ("head_warps_stored",) + (("head_warps_merged",) if splits <= MERGE_MAX_SPLITS else ())
            for kind in kinds:
                name = MERGE_KINDS.get(kind, "load_" + kind)
                call, details = kernels.launcher(kind, warps, stages, paged, case, splits, per_sm,
                                                 smem, group)
                call()
                details["heads_per_block"] = group
                found[(name, page_size, (warps, stages, per_sm, group))] = (
                    A.Candidate(name, call, None), details)
    torch.cuda.synchronize()
    kernels.check_merges()
    entries = {key: A.Entry({}, candidate) for key, (candidate, _) in found.items()}
    A.time_rounds(list(entries.values()), device, A.Timing(10, 100, rounds), cold_l2=True)
    times = A.round_times(entries, f"load_floor --shapes: {case.name}")
    sdpa = times[("sdpa_dense", None, None)]
    rows = []
    for (kernel, page_size, shape), samples in times.items():
        ratio, low, high = A.paired_ratio(samples, sdpa)
        time_us = statistics.median(samples)
        row = {"case": case.name, "kernel": kernel, "page_size": page_size, "bytes": A.case_bytes(case),
               "time_us": time_us, "fraction_of_hbm_read": gbps(A.case_bytes(case), time_us) / hbm_gbps,
               "vs_sdpa": ratio, "vs_sdpa_low": low, "vs_sdpa_high": high, "rounds": rounds,
               **found[(kernel, page_size, shape)][1]}
        if shape is not None:
            row.update(warps=shape[0], stages=shape[1], blocks_per_sm=shape[2])
        rows.append(row)
    del keep, found, entries, dense
    free_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--cases", metavar="REGEX", default=None, help="run only matching cases")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, choices=paged_kv.PAGE_SIZES,
                        help="tokens per page (default %(default)s)")
    parser.add_argument("--placement", default="random", choices=A.PLACEMENTS,
                        help="frame placement (bench/attention.py frame_order; default %(default)s)")
    parser.add_argument("--shapes", action="store_true",
                        help="time load_per_warp at every block shape of SHAPES instead, with "
                             "claimed tails at the decode kernel's shapes, and load_head_warps at "
                             "HEAD_WARP_SHAPES (pages of 256 and 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of --shapes (default 3)")
    args = parser.parse_args(argv)
    if args.rounds is not None and not args.shapes:
        parser.error("--rounds is for --shapes (the other runs time each kernel once)")
    args.rounds = 3 if args.rounds is None else args.rounds
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.shapes and (args.page_size != PAGE_SIZE or args.placement != "random"):
        parser.error("--shapes times pages of 256 and 16 in random frames: no --page-size or --placement")
    if args.quick or args.device == "cpu":
        parser.error("load_floor times CUDA kernels at full size: it needs a CUDA GPU and no --quick")
    if not torch.cuda.is_available():
        raise SystemExit("load_floor needs a CUDA GPU")
    cases = [c for c in CASES if args.cases is None or re.search(args.cases, c.name)]
    if not cases:
        parser.error(f"--cases {args.cases!r} matches no case")
    missing = A.paged_kv_unavailable(torch.device("cuda"))
    if missing:
        raise SystemExit(missing)
    kernels = LoadKernels()
    hbm = ceilings.measure_hbm_read()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    if args.shapes:
        for case in cases:
            rows += run_shapes(case, kernels, hbm["gbps"], args.rounds)
        print(format_table(rows, ["case", "kernel", "page_size", "warps", "stages", "blocks_per_sm",
                                  "heads_per_block", "time_us", "vs_sdpa", "vs_sdpa_low", "vs_sdpa_high", "splits"]))
        path = write_results("load_floor_shapes", {"hbm_read": hbm}, rows, args.out,
                             {"placement": "random", "kernel_source": KERNEL_SOURCE.name,
                              "shapes": [list(shape) for shape in SHAPES],
                              "head_warp_shapes": [list(shape) for shape in HEAD_WARP_SHAPES],
                              "merged_shapes": [list(shape) for shape in MERGED_SHAPES]})
        print(f"wrote {path}")
        return 0
    for case in cases:
        rows += run_case(case, kernels, hbm["gbps"], num_sms, args.page_size, args.placement)
    print(format_table(rows, ["case", "kernel", "time_us", "gbps", "fraction_of_hbm_read", "vs_sdpa",
                              "grid", "splits"]))
    name = "load_floor" if args.page_size == PAGE_SIZE else f"load_floor_page{args.page_size}"
    if args.placement != "random":
        name += f"_{args.placement}"
    path = write_results(name, {"hbm_read": hbm}, rows, args.out,
                         {"page_size": args.page_size, "placement": args.placement,
                          "kernel_source": KERNEL_SOURCE.name})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
