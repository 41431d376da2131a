"""Measure the hardware ceilings that every paged_kv figure is compared with, in the same run.

Each `measure_*` function returns one entry: `bytes`, `median_us` (with p10/p90/min) and `gbps`,
plus how it was measured; an item that cannot run here returns `{"skipped": reason}` and one that
failed returns `{"error": message}`. Run from the repository root:

    python bench/ceilings.py [--quick] [--out DIR] [--device auto|cpu|cuda]
    python -m bench.ceilings --quick
"""
from __future__ import annotations

import mmap
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.harness import (
    GiB,
    MiB,
    bench_args,
    bench_device,
    format_table,
    free_memory,
    gbps,
    summarize_us,
    time_cpu,
    time_cuda,
    write_results,
)

try:
    import triton
    import triton.language as tl
except Exception:  # triton is optional: the HBM read ceiling falls back to torch.sum
    triton = None

CEILING_NAMES = (
    "hbm_read",
    "hbm_copy",
    "h2d_pinned",
    "h2d_pinned_512k",
    "h2d_pageable",
    "d2h_pinned",
    "host_memcpy",
    "disk_odirect_read",
)
GPU_CEILINGS = CEILING_NAMES[:6]
DISK_BYTES_ENV = "PAGED_KV_BENCH_DISK_BYTES"
DISK_DIR_ENV = "PAGED_KV_BENCH_DISK_DIR"
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


@dataclass(frozen=True)
class Sizes:
    hbm_bytes: int
    copy_bytes: int
    chunked_total_bytes: int
    host_bytes: int
    disk_bytes: int
    repeat: int
    slow_repeat: int  # for copies that take a tenth of a second each
    disk_passes: int


FULL = Sizes(hbm_bytes=4 * GiB, copy_bytes=1 * GiB, chunked_total_bytes=256 * MiB,
             host_bytes=1 * GiB, disk_bytes=8 * GiB, repeat=30, slow_repeat=8, disk_passes=3)
QUICK = Sizes(hbm_bytes=256 * MiB, copy_bytes=64 * MiB, chunked_total_bytes=16 * MiB,
              host_bytes=64 * MiB, disk_bytes=64 * MiB, repeat=10, slow_repeat=5, disk_passes=3)


def _entry(num_bytes: int, timing: dict, **details) -> dict:
    return {"bytes": num_bytes, **timing, "gbps": gbps(num_bytes, timing["median_us"]), **details}


# ---------------------------------------------------------------------------------------------
# GPU memory
# ---------------------------------------------------------------------------------------------

READ_BLOCK_WORDS = 16384  # int32 words per Triton program: 64 KiB, 16 loads of 16 B per thread

if triton is not None:

    @triton.jit
    def _read_reduce_kernel(words_ptr, partial_ptr, BLOCK: tl.constexpr):
        # Each program reads BLOCK words and writes one, so the traffic is reads alone.
        program = tl.program_id(0).to(tl.int64)
        words = tl.load(words_ptr + program * BLOCK + tl.arange(0, BLOCK))
        tl.store(partial_ptr + program, tl.sum(words, axis=0))


def _hbm_buffer_bytes(target: int, granule: int) -> int:
    """`target`, or a quarter of free GPU memory when that is smaller, rounded down to `granule`."""
    free, _ = torch.cuda.mem_get_info()
    size = min(target, free // 4) // granule * granule
    if size <= 0:
        raise RuntimeError(f"not enough free GPU memory ({free} bytes) for a read buffer")
    return size


def measure_hbm_read(num_bytes: int = 4 * GiB, repeat: int = 30, method: str = "auto") -> dict:
    """HBM read bandwidth from a read-only kernel (Triton when present, else torch.sum).

    The fallback sums an int64 view: summing int32 into int64 runs at a sixth of the bandwidth
    on an H200 (770 against 4,580 GB/s), so it would understate the ceiling.
    """
    size = _hbm_buffer_bytes(num_bytes, READ_BLOCK_WORDS * 4)
    words = torch.ones(size // 4, dtype=torch.int32, device="cuda")
    programs = words.numel() // READ_BLOCK_WORDS
    details: dict = {"requested_bytes": num_bytes}

    wide_words = words.view(torch.int64)
    torch_timing = time_cuda(lambda: torch.sum(wide_words), warmup=3, repeat=repeat)
    entry = _entry(size, torch_timing, method="torch.sum over an int64 view")
    if method in ("auto", "triton") and triton is not None:
        partial = torch.empty(programs, dtype=torch.int32, device="cuda")

        def triton_read() -> None:
            _read_reduce_kernel[(programs,)](words, partial, BLOCK=READ_BLOCK_WORDS, num_warps=8)

        try:
            triton_read()
            total = int(partial.sum(dtype=torch.int64))
            if total != words.numel():  # every word is 1, so the sum counts the words read
                raise RuntimeError(f"read kernel summed {total}, expected {words.numel()}")
            timing = time_cuda(triton_read, warmup=3, repeat=repeat)
            details["torch_sum_gbps"] = entry["gbps"]
            entry = _entry(size, timing, method="triton read-reduce kernel",
                           write_bytes=programs * 4)
        except Exception as exc:  # an unsupported Triton must not cost us the ceiling
            details["triton_error"] = f"{type(exc).__name__}: {exc}"
    elif triton is None:
        details["triton_error"] = "triton is not importable"
    del words, wide_words
    free_memory()
    return {**entry, **details}


def measure_hbm_copy(num_bytes: int = 4 * GiB, repeat: int = 30) -> dict:
    """Device-to-device copy of half the buffer into the other half; reads plus writes counted."""
    size = _hbm_buffer_bytes(num_bytes, 2 * MiB)
    buffer = torch.ones(size, dtype=torch.uint8, device="cuda")
    source, destination = buffer[: size // 2], buffer[size // 2 :]
    timing = time_cuda(lambda: destination.copy_(source), warmup=3, repeat=repeat)
    del buffer, source, destination
    free_memory()
    return _entry(size, timing, method="tensor.copy_ on the GPU", note="read + write bytes counted")


# ---------------------------------------------------------------------------------------------
# Host <-> GPU
# ---------------------------------------------------------------------------------------------


def _host_buffer(num_bytes: int, pinned: bool) -> torch.Tensor:
    # Filled, so every page is resident before timing starts.
    return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pinned).fill_(1)


def measure_h2d_pinned(num_bytes: int = 1 * GiB, repeat: int = 30) -> dict:
    """One large copy from pinned host memory to the GPU."""
    host = _host_buffer(num_bytes, pinned=True)
    gpu = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    timing = time_cuda(lambda: gpu.copy_(host, non_blocking=True), warmup=2, repeat=repeat)
    del gpu
    free_memory()
    return _entry(num_bytes, timing, method="one copy_ from pinned memory")


def measure_h2d_pinned_chunks(total_bytes: int = 256 * MiB, chunk_bytes: int = 512 * 1024,
                              repeat: int = 30) -> dict:
    """Pinned host to GPU as many `chunk_bytes` copies issued one after another."""
    count = total_bytes // chunk_bytes
    host = _host_buffer(count * chunk_bytes, pinned=True).view(count, chunk_bytes)
    gpu = torch.empty(count, chunk_bytes, dtype=torch.uint8, device="cuda")
    pairs = list(zip(gpu.unbind(0), host.unbind(0)))  # views made once, outside the timed loop

    def copy_chunks() -> None:
        for destination, source in pairs:
            destination.copy_(source, non_blocking=True)

    timing = time_cuda(copy_chunks, warmup=2, repeat=repeat)
    del pairs, gpu
    free_memory()
    return _entry(count * chunk_bytes, timing, method=f"{count} copy_ calls of {chunk_bytes} bytes",
                  chunk_bytes=chunk_bytes)


def measure_h2d_pageable(num_bytes: int = 1 * GiB, repeat: int = 8) -> dict:
    """One large copy from ordinary (pageable) host memory to the GPU; the driver stages it."""
    host = _host_buffer(num_bytes, pinned=False)
    gpu = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    timing = time_cuda(lambda: gpu.copy_(host), warmup=1, repeat=repeat)
    del gpu
    free_memory()
    return _entry(num_bytes, timing, method="one copy_ from pageable memory")


def measure_d2h_pinned(num_bytes: int = 1 * GiB, repeat: int = 30) -> dict:
    """One large copy from the GPU into pinned host memory."""
    host = _host_buffer(num_bytes, pinned=True)
    gpu = torch.ones(num_bytes, dtype=torch.uint8, device="cuda")
    timing = time_cuda(lambda: host.copy_(gpu, non_blocking=True), warmup=2, repeat=repeat)
    del gpu
    free_memory()
    return _entry(num_bytes, timing, method="one copy_ into pinned memory")


def measure_host_memcpy(num_bytes: int = 1 * GiB, repeat: int = 10) -> dict:
    """Host memory bandwidth: a torch copy between two host buffers, reads plus writes counted."""
    source = _host_buffer(num_bytes, pinned=False)
    destination = torch.empty_like(source).fill_(0)
    timing = time_cpu(lambda: destination.copy_(source), warmup=2, repeat=repeat)
    return _entry(2 * num_bytes, timing, method=f"tensor.copy_ on the CPU, {torch.get_num_threads()} threads",
                  note="read + write bytes counted")


# ---------------------------------------------------------------------------------------------
# Disk
# ---------------------------------------------------------------------------------------------


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    target, best, best_type = os.path.realpath(path), "", None
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fields[2]
    except OSError:
        return None
    return best_type


def _direct_io_pass(path: str, buffer: mmap.mmap, num_bytes: int, write: bool) -> float:
    """Write or read the whole file with O_DIRECT in buffer-sized chunks; returns seconds."""
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT
    fd = os.open(path, flags)
    try:
        chunk = len(buffer)
        start = time.perf_counter()
        for offset in range(0, num_bytes, chunk):
            done = os.pwritev(fd, [buffer], offset) if write else os.preadv(fd, [buffer], offset)
            if done != chunk:
                raise OSError(f"short {'write' if write else 'read'} at {offset}: {done} of {chunk}")
        if write:
            os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _disk_odirect_read_in(directory: Path, num_bytes: int, chunk_bytes: int, passes: int) -> dict:
    fs_type = filesystem_type(directory)
    if fs_type in MEMORY_FILESYSTEMS:
        raise OSError(f"{fs_type} keeps files in memory, so it cannot measure a disk")
    free = shutil.disk_usage(directory).free
    if free < num_bytes + 256 * MiB:
        raise OSError(f"only {free} bytes free, {num_bytes} needed")
    fd, path = tempfile.mkstemp(prefix="paged_kv_odirect_", suffix=".bin", dir=directory)
    os.close(fd)
    buffer = mmap.mmap(-1, chunk_bytes)  # anonymous mappings are page aligned, as O_DIRECT needs
    try:
        buffer.write(os.urandom(chunk_bytes))
        write_seconds = _direct_io_pass(path, buffer, num_bytes, write=True)
        read_us = [_direct_io_pass(path, buffer, num_bytes, write=False) * 1e6 for _ in range(passes)]
    finally:
        buffer.close()
        os.unlink(path)
    return _entry(
        num_bytes, summarize_us(read_us),
        method=f"O_DIRECT preadv of {chunk_bytes} byte chunks, one at a time (queue depth 1)",
        note="O_DIRECT bypasses the page cache, so this is the device, not cached memory",
        chunk_bytes=chunk_bytes, directory=str(directory), filesystem=fs_type,
        write_gbps=gbps(num_bytes, write_seconds * 1e6),
    )


def default_disk_dirs() -> list[Path]:
    return [Path(tempfile.gettempdir()), Path("/var/tmp"), Path.home(), Path.cwd()]


def measure_disk_odirect_read(num_bytes: int = 8 * GiB, disk_dir: str | os.PathLike | None = None,
                              chunk_bytes: int = 8 * MiB, passes: int = 3) -> dict:
    """Read a freshly written file with O_DIRECT; tries `disk_dir`, then the default folders."""
    if not hasattr(os, "O_DIRECT"):
        return {"skipped": "this platform has no O_DIRECT"}
    num_bytes = max(chunk_bytes, num_bytes // chunk_bytes * chunk_bytes)
    candidates = ([Path(disk_dir)] if disk_dir else []) + default_disk_dirs()
    refusals: list[str] = []
    for directory in dict.fromkeys(path.resolve() for path in candidates):  # ordered, unique
        if not directory.is_dir():
            continue
        try:
            entry = _disk_odirect_read_in(directory, num_bytes, chunk_bytes, passes)
        except OSError as exc:  # EINVAL: the filesystem refuses O_DIRECT
            refusals.append(f"{directory}: {exc}")
            continue
        return {**entry, "refused_folders": refusals} if refusals else entry
    return {"error": "no folder allowed an O_DIRECT read: " + "; ".join(refusals), "bytes": num_bytes}


# ---------------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------------


def guarded(name: str, measure: Callable[[], dict]) -> dict:
    """`measure()`, announced on stderr; a failure becomes {"error": ...} (the benchmarks' ceilings
    all go through this, so that one failed item never loses a run)."""
    print(f"measuring {name} ...", file=sys.stderr, flush=True)
    try:
        return measure()
    except Exception as exc:  # one failed item must not lose the others
        free_memory()
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_all(device: str | torch.device = "cpu", quick: bool = False,
                disk_bytes: int | None = None, disk_dir: str | None = None) -> dict[str, dict]:
    """Every ceiling in CEILING_NAMES; GPU items are skipped, with the reason, off the GPU."""
    sizes = QUICK if quick else FULL
    on_gpu = torch.device(device).type == "cuda"
    gpu_items: dict[str, Callable[[], dict]] = {
        "hbm_read": lambda: measure_hbm_read(sizes.hbm_bytes, sizes.repeat),
        "hbm_copy": lambda: measure_hbm_copy(sizes.hbm_bytes, sizes.repeat),
        "h2d_pinned": lambda: measure_h2d_pinned(sizes.copy_bytes, sizes.repeat),
        "h2d_pinned_512k": lambda: measure_h2d_pinned_chunks(sizes.chunked_total_bytes, 512 * 1024, sizes.repeat),
        "h2d_pageable": lambda: measure_h2d_pageable(sizes.copy_bytes, sizes.slow_repeat),
        "d2h_pinned": lambda: measure_d2h_pinned(sizes.copy_bytes, sizes.repeat),
    }
    results: dict[str, dict] = {}
    for name, measure in gpu_items.items():
        if on_gpu:
            results[name] = guarded(name, measure)
        else:
            reason = "no CUDA device visible" if not torch.cuda.is_available() else "run on the CPU"
            results[name] = {"skipped": f"needs a GPU ({reason})"}
    results["host_memcpy"] = guarded(
        "host_memcpy", lambda: measure_host_memcpy(sizes.host_bytes, sizes.slow_repeat))
    results["disk_odirect_read"] = guarded(
        "disk_odirect_read",
        lambda: measure_disk_odirect_read(disk_bytes or sizes.disk_bytes, disk_dir, passes=sizes.disk_passes))
    assert tuple(results) == CEILING_NAMES
    return results


def parse_bytes(text: str) -> int:
    """'8GiB', '512MiB', '64M', '1G' or a plain number of bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"not a size: {text!r} (try 8GiB, 512MiB or a number of bytes)")
    scale = 1 << (10 * " KMGT".index(found.group(2).upper() or " "))
    return int(float(found.group(1)) * scale)


def summary_rows(ceilings: dict[str, dict]) -> list[dict]:
    """One row per ceiling for the results file and the printed table."""
    rows = []
    for name, entry in ceilings.items():
        status = entry.get("method", "")
        if "skipped" in entry:
            status = f"skipped: {entry['skipped']}"
        elif "error" in entry:
            status = f"error: {entry['error']}"
        rows.append({"name": name, "bytes": entry.get("bytes"), "median_us": entry.get("median_us"),
                     "gbps": entry.get("gbps"), "status": status})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_args("Measure HBM, PCIe, host memory and disk ceilings in this run.")
    parser.add_argument("--disk-bytes", type=parse_bytes, default=os.environ.get(DISK_BYTES_ENV),
                        help=f"size of the O_DIRECT test file (default 8GiB, 64MiB with --quick; ${DISK_BYTES_ENV})")
    parser.add_argument("--disk-dir", default=os.environ.get(DISK_DIR_ENV),
                        help=f"folder for the O_DIRECT test file (default: the temp folder; ${DISK_DIR_ENV})")
    args = parser.parse_args(argv)
    disk_bytes = parse_bytes(args.disk_bytes) if isinstance(args.disk_bytes, str) else args.disk_bytes
    # --quick alone stays on the CPU; --quick --device cuda is a fast smoke test of the GPU items.
    device = bench_device(args)

    ceilings = measure_all(device, quick=args.quick, disk_bytes=disk_bytes, disk_dir=args.disk_dir)
    rows = summary_rows(ceilings)
    print(format_table(rows, ["name", "bytes", "median_us", "gbps", "status"]))
    sizes = asdict(QUICK if args.quick else FULL)
    path = write_results("ceilings", ceilings, rows, out_dir=args.out, quick=args.quick, device=device,
                         extra={"sizes": sizes})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
