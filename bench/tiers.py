"""The pager's moves between tiers, beside ceilings measured in this run.

Rows (one layer of a Llama-3-8B-like model: 8 KV heads, head_dim 128, bf16, pages of 256 tokens,
so one page is 1 MiB):
  page_in_host      Pager.service() of N sealed pages demoted to host slots (host -> GPU)
  write_back_host   Pager.demote(HOST) of N sealed pages never written below (GPU -> host)
  page_in_disk      Pager.service() of N pages demoted to the disk store (disk -> GPU)
  decode_zero_copy  Engine.attention, one query over a long context, 10% of pages in GPU frames
                    and 90% in host slots read in place by the kernel
  decode_faults     the same with zero_copy off: the host pages fault and are serviced
  metadata          pager metadata + device page table + fault queue over the KV bytes managed
Run from the repository root:

    python bench/tiers.py [--quick] [--out DIR] [--device auto|cpu|cuda] [--disk-dir DIR]
"""
from __future__ import annotations

import mmap
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import paged_kv
from bench import ceilings
from bench.harness import (GiB, MiB, bench_args, bench_device, format_table, free_memory, gbps,
                           summarize_us, time_fn, write_results)
from paged_kv import Engine, Policy, Tier

NUM_LAYERS, NUM_KV_HEADS, NUM_Q_HEADS, HEAD_DIM, PAGE_SIZE = 1, 8, 32, 128, 256
DTYPE = torch.bfloat16
PAGE_BYTES = NUM_LAYERS * 2 * NUM_KV_HEADS * PAGE_SIZE * HEAD_DIM * 2  # 1 MiB
GPU_SHARE = 0.10  # decode: share of the context's pages in GPU frames

BARS = {  # (bar, how the row's `fraction` is held to it)
    "page_in_host": (0.90, "fraction of ceiling >= bar"),
    "write_back_host": (0.90, "fraction of ceiling >= bar"),
    "page_in_disk": (0.85, "fraction of ceiling >= bar"),
    "decode_zero_copy": (1.15, "time ratio <= bar"),
    "decode_faults": (1.15, "time ratio <= bar"),
    "metadata": (0.001, "metadata ratio < bar"),
}

FORMULAS = {
    "bytes (page_in_*, write_back_host)": "N * page_bytes (payload only; disk slot headers left out)",
    "page_bytes": "num_layers * 2 (K, V) * num_kv_heads * page_size * head_dim * 2 B",
    "gbps": "bytes / median time, 10^9 bytes per second",
    "fraction (moves)": "row gbps / same-run ceiling gbps",
    "decode bytes": "host-tier bytes the call must read: pages in host slots * page_bytes (zero_copy), "
                    "or host -> GPU bytes the pager moved per call (faults)",
    "fraction (decode)": "time / (bytes / h2d_pinned rate): the time ratio against copying the host "
                         "pages at the pinned-copy rate",
    "fraction (metadata)": "(pager.bytes_of_metadata() + page-table bytes + fault-queue bytes) / "
                           "(pages managed * page_bytes)",
    "host_memcpy_one_way": "CPU runs: half the host_memcpy rate (which counts read + write bytes), "
                           "since a page move counts its bytes once",
}


@dataclass(frozen=True)
class Sizes:
    move_pages: int  # N for the host moves
    disk_pages: int  # N for the disk page-in
    decode_tokens: int
    repeat: int
    disk_repeat: int
    decode_repeat: int


FULL = Sizes(move_pages=1024, disk_pages=1024, decode_tokens=1 << 20, repeat=10, disk_repeat=3,
             decode_repeat=10)
QUICK = Sizes(move_pages=32, disk_pages=16, decode_tokens=16 * PAGE_SIZE, repeat=5, disk_repeat=3,
              decode_repeat=5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_with_setup(setup: Callable[[], None], op: Callable[[], None], device: torch.device,
                    repeat: int, warmup: int = 1) -> dict:
    """Time `op` with perf_counter, running `setup` (untimed) before every call. The pager's
    calls return with their moves complete or queued ahead of the current stream, so a wall
    clock around one call and a device synchronisation is its time."""
    samples = []
    for i in range(warmup + repeat):
        setup()
        sync(device)
        start = time.perf_counter()
        op()
        sync(device)
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e6)
    return summarize_us(samples)


def moved(pager, direction: str) -> int:
    return pager.stats()["bytes_moved"][direction]


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


def _odirect_read_ranges(path: str, buffers: list[mmap.mmap], num_bytes: int) -> float:
    """Read the first `num_bytes` of the file with O_DIRECT, one thread per buffer, each thread
    reading buffer-sized chunks of its own contiguous range (queue depth = len(buffers));
    returns seconds."""
    chunk = len(buffers[0])
    chunks = num_bytes // chunk
    per_thread = -(-chunks // len(buffers))

    def read_range(index: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            first = index * per_thread
            for c in range(first, min(chunks, first + per_thread)):
                done = os.preadv(fd, [buffers[index]], c * chunk)  # releases the GIL
                if done != chunk:
                    raise OSError(f"short read at {c * chunk}: {done} of {chunk}")
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(buffers)) as pool:
        list(pool.map(read_range, range(len(buffers))))
    return time.perf_counter() - start


def odirect_read(path: str, repeat: int = 3, chunk_bytes: int = 8 * MiB, readers: int = 1) -> dict:
    """Read an existing file (the store's slot file) with O_DIRECT in large aligned chunks, at
    queue depth 1 (as ceilings.disk_odirect_read does with its own file) and, when `readers` > 1,
    with that many concurrent readers (the store's I/O threads); the faster is the ceiling."""
    size = os.path.getsize(path)
    chunk = min(chunk_bytes, size // 4096 * 4096)
    if chunk <= 0:
        raise OSError(f"{path} is smaller than one 4096-byte block")
    num_bytes = size // chunk * chunk
    depths = sorted({1, max(1, readers)})
    results = {}
    for depth in depths:
        buffers = [mmap.mmap(-1, chunk) for _ in range(depth)]  # page aligned, as O_DIRECT needs
        try:
            samples = [_odirect_read_ranges(path, buffers, num_bytes) * 1e6 for _ in range(repeat)]
        finally:
            for buffer in buffers:
                buffer.close()
        timing = summarize_us(samples)
        results[depth] = {**timing, "gbps": gbps(num_bytes, timing["median_us"])}
    best = max(depths, key=lambda d: results[d]["gbps"])
    return {"bytes": num_bytes, **results[best],
            "method": f"O_DIRECT preadv of {chunk} byte chunks of the store's slot file, queue depth "
                      f"{best} (the faster of depths {', '.join(map(str, depths))})",
            "by_queue_depth": {str(d): results[d]["gbps"] for d in depths},
            "path": path}


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, dict]:
    sizes = ceilings.QUICK if quick else ceilings.FULL
    result: dict[str, dict] = {}
    if device.type == "cuda":
        result["h2d_pinned"] = ceilings.guarded(
            "h2d_pinned", lambda: ceilings.measure_h2d_pinned(sizes.copy_bytes, sizes.repeat))
        result["d2h_pinned"] = ceilings.guarded(
            "d2h_pinned", lambda: ceilings.measure_d2h_pinned(sizes.copy_bytes, sizes.repeat))
    else:
        memcpy = ceilings.guarded(
            "host_memcpy", lambda: ceilings.measure_host_memcpy(sizes.host_bytes, sizes.slow_repeat))
        result["host_memcpy"] = memcpy
        if "gbps" in memcpy:
            result["host_memcpy_one_way"] = {**memcpy, "gbps": memcpy["gbps"] / 2,
                                             "note": "half the read + write rate"}
        else:
            result["host_memcpy_one_way"] = memcpy
    return result


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def finish(row: dict, ceiling_name: str | None, ceiling: dict | None) -> dict:
    """Add ceiling, fraction, bar and met to a row with `gbps` (moves) or `fraction` set."""
    bar, rule = BARS[row["name"]]
    row["bar"], row["bar_rule"] = bar, rule
    if ceiling_name is not None:
        row["ceiling"] = ceiling_name
        row["ceiling_gbps"] = (ceiling or {}).get("gbps")
        if row["ceiling_gbps"] is None:
            row["skipped"] = f"ceiling {ceiling_name} not measured: {ceiling}"
            row["met"] = None
            return row
    if "fraction" not in row:
        row["fraction"] = row["gbps"] / row["ceiling_gbps"]
    if rule.startswith("fraction of ceiling"):
        row["met"] = row["fraction"] >= bar
    elif rule.startswith("time ratio"):
        row["met"] = row["fraction"] <= bar
    else:
        row["met"] = row["fraction"] < bar
    return row


def move_row(name: str, n: int, timing: dict, moved_bytes: int, calls: int) -> dict:
    num_bytes = n * PAGE_BYTES
    expected = num_bytes * calls
    if moved_bytes != expected:  # the pager must really have moved every page, every call
        raise RuntimeError(f"{name}: the pager moved {moved_bytes} bytes in {calls} calls, "
                           f"expected {expected}")
    return {"name": name, "pages": n, "page_bytes": PAGE_BYTES, "bytes": num_bytes,
            "time_us": timing["median_us"], "p10_us": timing["p10_us"], "p90_us": timing["p90_us"],
            "min_us": timing["min_us"], "repeat": timing["repeat"],
            "gbps": gbps(num_bytes, timing["median_us"])}


def new_pools(frames: int, slots: int, device: torch.device):
    pool = paged_kv.new_pool(frames, NUM_LAYERS, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, DTYPE, device).zero_()
    host = torch.zeros((slots, *pool.shape[1:]), dtype=DTYPE, pin_memory=device.type == "cuda")
    return pool, host


def sealed_sequence(pager, n: int) -> list[tuple[int, int]]:
    row = pager.add_sequence()
    pager.append_pages(row, n)
    pager.seal(row, n - 1)
    return [(row, p) for p in range(n)]


def run_page_in_host(device: torch.device, n: int, repeat: int) -> dict:
    pool, host = new_pools(n, n, device)
    pager = paged_kv.Pager(pool, host, max_sequences=1, max_pages=n)
    pages = sealed_sequence(pager, n)
    pager.demote(pages, Tier.HOST)  # the one write-back; later demotes only give up frames
    pager.reset_stats()
    warmup = 1
    timing = time_with_setup(lambda: pager.demote(pages, Tier.HOST), lambda: pager.service(pages),
                             device, repeat, warmup)
    return move_row("page_in_host", n, timing, moved(pager, "host_to_gpu"), warmup + repeat)


def run_write_back_host(device: torch.device, n: int, repeat: int) -> dict:
    pool, host = new_pools(n, n, device)
    pager = paged_kv.Pager(pool, host, max_sequences=1, max_pages=n)
    pages: list = []

    def fresh() -> None:
        # Sealed pages are written below at most once, so each call needs pages never written.
        nonlocal pages
        if pages:
            pager.remove_sequence(pages[0][0])
        pages = sealed_sequence(pager, n)

    warmup = 1
    timing = time_with_setup(fresh, lambda: pager.demote(pages, Tier.HOST), device, repeat, warmup)
    return move_row("write_back_host", n, timing, moved(pager, "gpu_to_host"), warmup + repeat)


def disk_folder(choice: str | None) -> Path:
    """`choice`, else the first default folder not held in memory (O_DIRECT needs a device)."""
    if choice:
        return Path(choice)
    for folder in ceilings.default_disk_dirs():
        if folder.is_dir() and ceilings.filesystem_type(folder) not in ceilings.MEMORY_FILESYSTEMS:
            return folder
    return Path(tempfile.gettempdir())


def run_page_in_disk(device: torch.device, n: int, repeat: int, folder: Path,
                     ceiling_repeat: int) -> tuple[dict, dict]:
    from paged_kv.store import DiskStore

    work = tempfile.mkdtemp(prefix="paged_kv_tiers_", dir=folder)
    try:
        store = DiskStore(work, n, PAGE_BYTES)
        if not store.direct_io:
            reason = f"the store in {work} cannot use O_DIRECT ({store.direct_io_reason})"
            return {"name": "page_in_disk", "skipped": reason}, {"skipped": reason}
        # Demoting to disk passes through host slots, so the host tier holds N as well.
        pool, host = new_pools(n, n, device)
        pager = paged_kv.Pager(pool, host, max_sequences=1, max_pages=n, disk_store=store)
        pages = sealed_sequence(pager, n)
        pager.demote(pages, Tier.DISK)
        pager.reset_stats()
        warmup = 1
        timing = time_with_setup(lambda: pager.demote(pages, Tier.DISK), lambda: pager.service(pages),
                                 device, repeat, warmup)
        row = move_row("page_in_disk", n, timing, moved(pager, "disk_to_gpu"), warmup + repeat)
        row.update(io_threads=store.io_threads, folder=str(folder),
                   filesystem=ceilings.filesystem_type(folder))
        ceiling = odirect_read(store.path, ceiling_repeat, readers=store.io_threads)
        del pager, store
        return row, ceiling
    finally:
        free_memory()
        shutil.rmtree(work, ignore_errors=True)


def host_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def decode_tokens_that_fit(device: torch.device, tokens: int) -> int:
    """`tokens`, halved until the host slots (every page, pinned) and the GPU frames fit with
    room to spare."""
    kv_per_token = PAGE_BYTES // PAGE_SIZE
    while tokens > 16 * PAGE_SIZE:
        kv = tokens * kv_per_token
        host_ok = host_available_bytes() >= 2 * kv + 2 * GiB or device.type == "cpu" and tokens <= 1 << 16
        gpu_ok = device.type != "cuda" or torch.cuda.mem_get_info()[0] >= GPU_SHARE * kv + kv // 8 + 2 * GiB
        if host_ok and gpu_ok:
            break
        tokens //= 2
    return tokens


def tiers_of(engine, row: int, pages: int) -> torch.Tensor:
    ptes = engine.pager.page_table()[row, :pages].to(torch.int64) & 0xFFFFFFFF
    return ptes >> 30


def run_decode(device: torch.device, tokens: int, zero_copy: bool, repeat: int,
               ceiling_gbps: float | None, ceiling_name: str) -> tuple[dict, dict | None]:
    pages = tokens // PAGE_SIZE
    gpu_pages = max(2, round(GPU_SHARE * pages))
    policy = Policy(page_size=PAGE_SIZE, gpu_budget=gpu_pages * PAGE_BYTES,
                    host_budget=pages * PAGE_BYTES, zero_copy=zero_copy)
    name = "decode_zero_copy" if zero_copy else "decode_faults"
    engine = Engine(policy, num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                    dtype=DTYPE, device=device, max_sequences=1, max_pages=pages)
    try:
        row = engine.new_sequence()
        # A step's pages stay open (unevictable) until written, so a step must fit the frames.
        chunk = min(tokens, 64 * 1024, max(1, engine.num_frames - 1) * PAGE_SIZE)
        g = torch.Generator(device=device).manual_seed(0)
        for start in range(0, tokens, chunk):  # pages fill oldest first and spill to host (LRU)
            n = min(chunk, tokens - start)
            k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
            v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
            engine.append(row, k, v, 0)
            del k, v
        query = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, generator=g, device=device, dtype=DTYPE)

        def call():
            engine.attention(query, [row], [0, 1], 0)

        call()  # the first call writes back the GPU pages that a fault service evicts
        sync(device)
        on_host = int((tiers_of(engine, row, pages) == Tier.HOST).sum())
        before = moved(engine.pager, "host_to_gpu")
        stats_before = engine.stats()
        timing = time_fn(call, device, warmup=1, repeat=repeat)
        stats_after = engine.stats()
        calls = 1 + repeat
        if zero_copy:
            num_bytes = on_host * PAGE_BYTES
            if moved(engine.pager, "host_to_gpu") != before:
                raise RuntimeError(f"{name}: pages were moved although the kernel reads host slots")
        else:
            num_bytes = (moved(engine.pager, "host_to_gpu") - before) // calls
        result = {"name": name, "tokens": tokens, "pages": pages, "gpu_frames": engine.num_frames,
                  "host_pages_at_start": on_host, "bytes": num_bytes,
                  "time_us": timing["median_us"], "p10_us": timing["p10_us"],
                  "p90_us": timing["p90_us"], "min_us": timing["min_us"], "repeat": timing["repeat"],
                  "gbps": gbps(num_bytes, timing["median_us"]), "ceiling": ceiling_name,
                  "ceiling_gbps": ceiling_gbps}
        if ceiling_gbps:
            result["ideal_us"] = num_bytes / (ceiling_gbps * 1e3)
            result["fraction"] = timing["median_us"] / result["ideal_us"]
        if not zero_copy:
            result["fault_batches_per_call"] = stats_after["fault_batches"] / (calls + 1)
            # Where a call's host time goes: the engine's whole fault service (moves, reruns
            # over each batch, merge) and, inside it, the pager's calls (which queue copies into
            # frames without waiting for them); and what was written back.
            def per_call(key, sub=None):
                a, b = stats_after[key], stats_before[key]
                if sub is not None:
                    a, b = a[sub], b[sub]
                return (a - b) / calls
            result["fault_service_ms_per_call"] = per_call("fault_service_seconds") * 1e3
            result["pager_service_ms_per_call"] = per_call("service_seconds") * 1e3
            result["gpu_to_host_bytes_per_call"] = per_call("bytes_moved", "gpu_to_host")
        meta = None
        if zero_copy:
            capacity = pages + 1  # the fault queue Engine.attention allocates for this batch
            parts = {"pager": engine.pager.bytes_of_metadata(),
                     "page_table": engine.page_table.numel() * engine.page_table.element_size(),
                     "fault_queue": capacity * 2 * 4 + 4}
            kv = pages * PAGE_BYTES
            meta = {"name": "metadata", "bytes": sum(parts.values()), "parts": parts,
                    "kv_bytes": kv, "pages": pages, "fraction": sum(parts.values()) / kv}
        return result, meta
    finally:
        engine.close()
        free_memory()


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    """ceilings.guarded for a row, which keeps its name when it fails."""
    return {"name": name, **ceilings.guarded(name, fn)}


def main(argv: list[str] | None = None) -> int:
    parser = bench_args("Pager moves between GPU, host and disk against same-run ceilings.")
    parser.add_argument("--disk-dir", default=os.environ.get(ceilings.DISK_DIR_ENV),
                        help="folder for the disk store (default: the first non-memory temp folder)")
    args = parser.parse_args(argv)
    # --quick alone stays on the CPU; --quick --device cuda is a fast smoke test on the GPU.
    device = bench_device(args)
    sizes = QUICK if args.quick else FULL
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())

    ceils = measure_ceilings(device, args.quick)
    h2d = "h2d_pinned" if on_gpu else "host_memcpy_one_way"
    d2h = "d2h_pinned" if on_gpu else "host_memcpy_one_way"
    rows: list[dict] = []

    row = guarded("page_in_host", lambda: run_page_in_host(device, sizes.move_pages, sizes.repeat))
    rows.append(row if "error" in row else finish(row, h2d, ceils.get(h2d)))
    row = guarded("write_back_host", lambda: run_write_back_host(device, sizes.move_pages, sizes.repeat))
    rows.append(row if "error" in row else finish(row, d2h, ceils.get(d2h)))

    disk: dict = {}

    def disk_case() -> dict:
        result, ceiling = run_page_in_disk(device, sizes.disk_pages, sizes.disk_repeat,
                                           disk_folder(args.disk_dir), 3)
        disk["ceiling"] = ceiling
        return result

    row = guarded("page_in_disk", disk_case)
    ceils["disk_odirect_read_store"] = disk.get("ceiling", {"error": row.get("error", "not measured")})
    if "error" not in row and "skipped" not in row:
        row = finish(row, "disk_odirect_read_store", ceils["disk_odirect_read_store"])
    rows.append(row)

    tokens = decode_tokens_that_fit(device, sizes.decode_tokens)
    rate = ceils.get(h2d, {}).get("gbps")
    meta: dict = {}
    for zero_copy in (True, False):
        name = "decode_zero_copy" if zero_copy else "decode_faults"

        def decode_case(zero_copy=zero_copy) -> dict:
            result, metadata = run_decode(device, tokens, zero_copy, sizes.decode_repeat, rate, h2d)
            if metadata:
                meta["row"] = metadata
            return result

        row = guarded(name, decode_case)
        if "error" not in row:
            if rate is None:
                row["skipped"] = f"ceiling {h2d} not measured: {ceils.get(h2d)}"
            else:
                row = finish(row, None, None)
        rows.append(row)
    if "row" in meta:
        rows.append(finish(meta["row"], None, None))
    else:
        rows.append({"name": "metadata", "error": "the zero-copy decode engine was not built"})

    failures = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    below_bar = [r["name"] for r in rows if r.get("met") is False]
    print(format_table(rows, ["name", "bytes", "time_us", "gbps", "ceiling", "ceiling_gbps",
                              "fraction", "bar", "met"]))
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['name']}: {r.get('skipped') or r.get('error')}")
    path = write_results(
        "tiers", ceils, rows, out_dir=args.out, quick=args.quick, device=device,
        extra={"sizes": asdict(sizes), "decode_tokens": tokens, "page_bytes": PAGE_BYTES,
               "bars": {k: {"bar": b, "rule": r} for k, (b, r) in BARS.items()},
               "formulas": FORMULAS, "failures": failures, "below_bar": below_bar},
    )
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
