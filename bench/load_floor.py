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
and the HBM read ceiling. The load-only kernels are compiled with NVRTC through CuPy, so the
script needs CuPy and a CUDA GPU. Writes bench/results/load_floor.json (pages of 256) or
load_floor_page<N>.json.

    python bench/load_floor.py [--cases REGEX] [--page-size N] [--out DIR]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import paged_kv

from bench import attention as A
from bench import ceilings
from bench.harness import bench_args, format_table, gbps, time_cuda, write_results

KERNEL_SOURCE = Path(__file__).resolve().parent / "load_floor.cu"
CASES = [c for c in A.FULL_CASES if c.kind == "decode" and c.tier == 0 and c.kv_len < 1 << 20]
PAGE_SIZE = 256  # the default; --page-size picks another
WIDE_MAX_TOKENS = 128 * 1024  # as kWideDecodeMaxTokens in csrc/cuda/attention.cu
DECODE_STAGES = 2  # as DecodeKeysAsMConfig and WideDecodeKeysAsMConfig at head_dim 128


class LoadKernels:
    """The NVRTC-compiled kernels of load_floor.cu, launched on torch's current stream."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise SystemExit(f"load_floor needs CuPy to compile its kernels ({exc})") from exc
        self.cupy = cupy
        self.names = {("per_warp", 12, 2): "per_warp<12, 2>", ("per_warp", 4, 2): "per_warp<4, 2>",
                      ("block_tiles", 64, 3): "block_tiles<64, 3>"}
        self.module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("-std=c++17",),
                                     name_expressions=list(self.names.values()))
        self.result = torch.zeros(1, dtype=torch.int32, device="cuda")

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
                 per_sm: int):
        kernel = self.module.get_function(self.names[(kind, a, b)])
        threads = a * 32 if kind == "per_warp" else 128
        tile_bytes = (16 if kind == "per_warp" else a) * A.HEAD_DIM * 2
        smem = (a if kind == "per_warp" else 1) * b * 2 * tile_bytes
        kernel.max_dynamic_shared_size_bytes = smem
        pool, frames = paged.pool, paged.page_table
        if pool.shape[1] != 1 or not pool.is_contiguous() or not frames.is_contiguous():
            raise ValueError("load_floor expects a contiguous one-layer pool and page table")
        args = (np.uint64(pool.data_ptr()), np.uint64(frames.data_ptr()), np.int64(pool.stride(0)),
                np.int32(A.NUM_KV_HEADS), np.int32(paged.page_size), np.int32(A.HEAD_DIM),
                np.int32(case.kv_len), np.int32(frames.shape[1]), np.int32(splits),
                np.uint64(self.result.data_ptr()))
        grid = case.batch * A.NUM_KV_HEADS * splits
        stream = self.torch_stream()
        details = {"grid": grid, "threads": threads, "smem_bytes": smem, "splits": splits,
                   "blocks_per_sm_intended": per_sm}

        def call() -> None:
            with stream:
                kernel((grid,), (threads,), args, shared_mem=smem)

        return call, details


def decode_grid(case: A.Case, num_sms: int) -> tuple[int, int, int]:
    """(warps per block, blocks per SM, splits) as the decode kernel plans them (plan_with)."""
    columns = case.batch * A.NUM_KV_HEADS
    wide = case.kv_len <= WIDE_MAX_TOKENS and columns < num_sms
    # 12 warps of 2 stages fill one multiprocessor's shared memory; 4-warp blocks fit three, but
    # splits are planned for two (kDecodeBlocksPerSmPlanned).
    warps, per_sm = (12, 1) if wide else (4, 2)
    wave = num_sms * per_sm
    splits = 1 if columns >= wave else wave // columns
    return warps, per_sm, max(1, min(splits, case.kv_len // 512))


def run_case(case: A.Case, kernels: LoadKernels, hbm_gbps: float, num_sms: int,
             page_size: int = PAGE_SIZE) -> list[dict]:
    torch.manual_seed(0)
    dense = A.make_dense(case, torch.device("cuda"))
    paged = A.build_paged(case, dense, page_size, torch.device("cuda"), seed=1)
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
    for name, (call, details) in loads.items():
        call()
        torch.cuda.synchronize()
        timed[name] = (time_cuda(call, warmup=10, repeat=100, cold_l2=True), details)
    sdpa_us = timed["sdpa_dense"][0]["median_us"]
    rows = []
    for name, (timing, details) in timed.items():
        rate = gbps(case_bytes, timing["median_us"])
        rows.append({"case": case.name, "kernel": name, "page_size": None if name == "sdpa_dense" else page_size,
                     "bytes": case_bytes, "time_us": timing["median_us"], "p10_us": timing["p10_us"],
                     "p90_us": timing["p90_us"], "gbps": rate, "fraction_of_hbm_read": rate / hbm_gbps,
                     "vs_sdpa": timing["median_us"] / sdpa_us, **details})
    del paged, dense, candidates
    A.free_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--cases", metavar="REGEX", default=None, help="run only matching cases")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, choices=paged_kv.PAGE_SIZES,
                        help="tokens per page (default %(default)s)")
    args = parser.parse_args(argv)
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
    for case in cases:
        rows += run_case(case, kernels, hbm["gbps"], num_sms, args.page_size)
    print(format_table(rows, ["case", "kernel", "time_us", "gbps", "fraction_of_hbm_read", "vs_sdpa",
                              "grid", "splits"]))
    name = "load_floor" if args.page_size == PAGE_SIZE else f"load_floor_page{args.page_size}"
    path = write_results(name, {"hbm_read": hbm}, rows, args.out,
                         {"page_size": args.page_size, "kernel_source": KERNEL_SOURCE.name})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
