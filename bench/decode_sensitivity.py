"""How paged_kv's decode time over dense SDPA's moves with frame placement and with batch size.

Two sweeps beside issue 3's decode bar (bf16, 32 query heads, 8 KV heads, head_dim 128, a
one-layer pool, pages of 16 and 256, the L2 flushed before each call):
  placement  batch 1 at 1M tokens and batch 32 at 8K, every page in a random frame (the bar's
             placement) and in `extent` placement (runs of consecutive pages filling 2 MiB of
             consecutive frames, the runs in random order): the same bytes and the same kernel,
             only the number of 2 MiB regions the reads fall in changes
  batch      batches of 32 to 256 at 1 GiB of K/V or more (random frames), with FlashInfer's
             tensor-core decode over the same frames where `import flashinfer` works
Each case's candidates are timed in interleaved rounds (every candidate once per round, the
median of `--repeat` calls, each round starting one candidate further on); a ratio is paged_kv's
time over SDPA's in the same round, and a row gives the median, lowest and highest over the
rounds. Needs a CUDA GPU. Writes bench/results/decode_sensitivity.json.

    python bench/decode_sensitivity.py [--sweeps placement,batch] [--rounds N] [--out DIR]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import attention as A
from bench.harness import bench_args, format_table, free_memory, resolve_device, write_results

K = A.K
PAGE_SIZES = (256, 16)
PLACEMENT_CASES = tuple(c for c in A.FULL_CASES if c.name in ("decode_b1_1m", "decode_b32_8k"))
BATCH_CASES = tuple(A.Case(f"decode_b{b}_{t}k", "decode", b, t * K, PAGE_SIZES)
                    for b, t in ((32, 8), (48, 8), (64, 4), (128, 2), (256, 1)))
SWEEPS = ("placement", "batch")


def candidates(case: A.Case, dense: A.Dense, placements: tuple[str, ...], flashinfer: A.FlashInfer | None,
               device: torch.device, keep: list) -> dict[str, A.Candidate]:
    """SDPA, then paged_kv (and FlashInfer) for each page size and placement, checked once."""
    reference = A.sdpa_to_op_layout(A.sdpa_candidate(case, dense).call(), case)
    found = {"sdpa_dense": A.sdpa_candidate(case, dense)}
    for page_size in case.page_sizes:
        for placement in placements:
            paged = A.build_paged(case, dense, page_size, device, seed=page_size, placement=placement)
            keep.append(paged)
            found[f"paged_kv/{page_size}/{placement}"] = A.paged_kv_candidate(case, dense, paged, device)
            if flashinfer is not None and flashinfer.reason is None and placement == "random":
                cache = paged.pool[:, A.LAYER]  # [F, 2, H, P, D]: FlashInfer's HND layout
                found[f"flashinfer_decode_tc_hnd/{page_size}/{placement}"] = flashinfer.decode(
                    case, dense, paged, cache, "HND", tensor_cores=True)
    for name, candidate in found.items():
        check = A.compare(candidate.to_op_layout(candidate.call()), reference)
        if not check["correct"]:
            raise RuntimeError(f"{case.name} {name}: output differs from dense SDPA ({check})")
    return found


def sweep_case(case: A.Case, sweep: str, placements: tuple[str, ...], rounds: int, repeat: int,
               flashinfer: A.FlashInfer | None, device: torch.device) -> list[dict]:
    print(f"{sweep}: {case.name}", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    dense = A.make_dense(case, device)
    keep: list = []
    found = candidates(case, dense, placements, flashinfer, device, keep)
    entries = {name: A.Entry({}, candidate) for name, candidate in found.items()}
    A.time_rounds(list(entries.values()), device, A.Timing(5, repeat, rounds), cold_l2=True)
    times = A.round_times(entries, f"decode_sensitivity {sweep}: {case.name}")
    rows = []
    for name, samples in times.items():
        kernel, _, rest = name.partition("/")
        page_size, _, placement = rest.partition("/")
        ratio, low, high = A.paired_ratio(samples, times["sdpa_dense"])
        rows.append({"sweep": sweep, "case": case.name, "kernel": kernel,
                     "page_size": int(page_size) if page_size else None, "placement": placement or None,
                     "time_us": statistics.median(samples), "bytes": A.case_bytes(case),
                     "vs_sdpa": ratio, "vs_sdpa_low": low, "vs_sdpa_high": high, "rounds": rounds})
    del keep, found, entries, dense
    free_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_args("paged_kv decode over dense SDPA by frame placement and by batch size.")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, of {SWEEPS}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per candidate and round")
    args = parser.parse_args(argv)
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    if not sweeps or set(sweeps) - set(SWEEPS):
        parser.error(f"--sweeps: expected names from {SWEEPS}, got {args.sweeps!r}")
    if args.rounds < 1 or args.repeat < 1:
        parser.error("--rounds and --repeat must be at least 1")
    if args.quick or resolve_device(args.device).type != "cuda":
        parser.error("decode_sensitivity times CUDA kernels at full size: it needs a CUDA GPU and no --quick")
    missing = A.paged_kv_unavailable(torch.device("cuda"))
    if missing:
        raise SystemExit(f"decode_sensitivity: {missing}")
    device = torch.device("cuda")
    flashinfer = A.FlashInfer(device)
    rows: list[dict] = []
    if "placement" in sweeps:
        for case in PLACEMENT_CASES:
            rows += sweep_case(case, "placement", A.PLACEMENTS, args.rounds, args.repeat, None, device)
    if "batch" in sweeps:
        for case in BATCH_CASES:
            rows += sweep_case(case, "batch", ("random",), args.rounds, args.repeat, flashinfer, device)
    print(format_table(rows, ["sweep", "case", "kernel", "page_size", "placement", "time_us",
                              "vs_sdpa", "vs_sdpa_low", "vs_sdpa_high"]))
    extra = {"config": {"num_q_heads": A.NUM_Q_HEADS, "num_kv_heads": A.NUM_KV_HEADS,
                        "head_dim": A.HEAD_DIM, "dtype": "bfloat16", "num_layers": 1,
                        "extent_bytes": A.EXTENT_BYTES, "cold_l2": True, "repeat": args.repeat},
             "flashinfer": {"skipped": flashinfer.reason} if flashinfer.reason else {"version": flashinfer.version}}
    path = write_results("decode_sensitivity", {}, rows, args.out, extra, device=device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
