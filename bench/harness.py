"""Shared benchmark harness: timers, device description, results JSON and command-line flags.

Every benchmark script times with `time_fn`, describes the machine with `device_info`, and
writes one JSON file with `write_results`, so all results share one layout (see README.md).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"  # git-ignored, so quick runs never replace GPU results
OUT_DIR_ENV = "PAGED_KV_BENCH_OUT"

MiB = 1 << 20
GiB = 1 << 30
FALLBACK_CACHE_BYTES = 64 * MiB

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def summarize_us(samples_us: list[float]) -> dict:
    """Median, p10, p90 and min of per-call times in microseconds."""
    if not samples_us:
        raise ValueError("summarize_us: no samples")
    ordered = sorted(samples_us)

    def percentile(q: float) -> float:
        # Linear interpolation between closest ranks (numpy's default method).
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {
        "median_us": percentile(0.5),
        "p10_us": percentile(0.1),
        "p90_us": percentile(0.9),
        "min_us": ordered[0],
        "repeat": len(ordered),
    }


def gbps(num_bytes: float, time_us: float) -> float:
    """Bytes over microseconds, in GB/s (10^9 bytes per second)."""
    return num_bytes / (time_us * 1e3) if time_us > 0 else float("inf")


_cuda_flush_buffers: dict[int, torch.Tensor] = {}


def free_memory() -> None:
    """Collects garbage and hands cached CUDA blocks back, so that the next case sizes itself
    against free memory (cached blocks count as used in mem_get_info)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def l2_cache_bytes(device_index: int | None = None) -> int:
    """The GPU's L2 size in bytes, or 64 MiB where the driver does not report it."""
    index = torch.cuda.current_device() if device_index is None else device_index
    size = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0)
    return int(size) if size else FALLBACK_CACHE_BYTES


def _cuda_flush_buffer() -> torch.Tensor:
    index = torch.cuda.current_device()
    if index not in _cuda_flush_buffers:
        # Twice the L2, so writing it leaves none of the measured data cached.
        _cuda_flush_buffers[index] = torch.empty(
            2 * l2_cache_bytes(index), dtype=torch.uint8, device=f"cuda:{index}"
        )
    return _cuda_flush_buffers[index]


def _flush_l2(flush: torch.Tensor) -> None:
    # Writing the buffer evicts the measured data; reading it back then writes those dirty lines
    # back to HBM before the timed call, which would otherwise pay for them (on an H200, 10 us of
    # SDPA's 137 at 128K-token decode). The L2 is left holding clean lines, as for the ceilings.
    flush.zero_()
    flush.view(torch.int64).sum()


# A GPU spin queued before each start event (torch.cuda._sleep, in clock cycles; about 100 us
# at Hopper's clocks): the host enqueues the call while the GPU spins, so a host-side delay (a
# Python call's overhead, a compile worker taking the CPU) is timed only if it outlasts the spin.
# Without it, one run's median of a 41 us decode call read 51 us (p90 85 us) on an H200.
SPIN_CYCLES = 200_000


def time_cuda(
    fn: Callable[[], Any], warmup: int = 10, repeat: int = 100, cold_l2: bool = False
) -> dict:
    """Time `fn` on the current CUDA stream with a pair of events around each call.

    With `cold_l2`, a buffer twice the L2 size is written and then read before each call,
    between the previous end event and the next start event, so the flush is never timed.
    Before each start event the GPU spins for SPIN_CYCLES. Returns `summarize_us` of the
    per-call times.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda: CUDA is not available; use time_cpu")
    flush = _cuda_flush_buffer() if cold_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for start, end in zip(starts, ends):
        if flush is not None:
            _flush_l2(flush)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize_us([start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends)])


def cpu_last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache from sysfs, or 64 MiB where it is not readable."""
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": MiB, "G": GiB}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best or FALLBACK_CACHE_BYTES


_cpu_flush_buffer: list[torch.Tensor] = []


def time_cpu(
    fn: Callable[[], Any], warmup: int = 3, repeat: int = 20, cold_l2: bool = False
) -> dict:
    """Time `fn` with time.perf_counter around each call.

    With `cold_l2` (named as for the GPU; here the last-level cache is the one flushed), a buffer twice the CPU's last-level cache is written before each call,
    outside the timed region. Returns `summarize_us` of the per-call times.
    """
    if cold_l2 and not _cpu_flush_buffer:
        _cpu_flush_buffer.append(torch.empty(2 * cpu_last_level_cache_bytes(), dtype=torch.uint8))
    for _ in range(warmup):
        fn()
    samples_us = []
    for _ in range(repeat):
        if cold_l2:
            _cpu_flush_buffer[0].zero_()
        start = time.perf_counter()
        fn()
        samples_us.append((time.perf_counter() - start) * 1e6)
    return summarize_us(samples_us)


def time_fn(
    fn: Callable[[], Any],
    device: str | torch.device,
    warmup: int | None = None,
    repeat: int | None = None,
    cold_l2: bool = False,
) -> dict:
    """Time `fn` with CUDA events on a CUDA device, else with perf_counter."""
    timer = time_cuda if torch.device(device).type == "cuda" else time_cpu
    kwargs: dict = {"cold_l2": cold_l2}
    if warmup is not None:
        kwargs["warmup"] = warmup
    if repeat is not None:
        kwargs["repeat"] = repeat
    return timer(fn, **kwargs)


# ---------------------------------------------------------------------------------------------
# Device description
# ---------------------------------------------------------------------------------------------


def resolve_device(choice: str = "auto") -> torch.device:
    """`auto` picks CUDA when a GPU is visible, else the CPU; `cuda` without a GPU is an error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    return torch.device(choice)


def bench_device(args) -> torch.device:
    """The device of a benchmark's parsed `bench_args`: a `--quick` run stays on the CPU unless
    `--device` names one, else `resolve_device`."""
    return resolve_device("cpu" if args.quick and args.device == "auto" else args.device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver version, e.g. '570.124.06', or None where it cannot be read."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def paged_kv_info() -> dict:
    """Version and build details of paged_kv, or the reason it could not be imported."""
    try:
        import paged_kv  # noqa: PLC0415 - optional; the harness must work without it
    except Exception as exc:  # a missing or broken build must never stop a benchmark
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"}
    info: dict = {"importable": True, "version": getattr(paged_kv, "__version__", None)}
    build = getattr(paged_kv, "build_info", None)
    try:
        info["build"] = build() if callable(build) else build
        json.dumps(info["build"])
    except Exception as exc:
        info["build"] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


def device_info(device: str | torch.device | None = None) -> dict:
    """Describe the machine a benchmark ran on (no hostname)."""
    dev = resolve_device("auto") if device is None else torch.device(device)
    info: dict = {
        "device_type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton  # noqa: PLC0415

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessor_count=props.multi_processor_count,
            l2_cache_bytes=l2_cache_bytes(index),
            total_memory_bytes=props.total_memory,
            driver=nvidia_driver_version(),
        )
    else:
        info.update(
            device_name=info["cpu"],
            multiprocessor_count=os.cpu_count(),
            l2_cache_bytes=None,
            last_level_cache_bytes=cpu_last_level_cache_bytes(),
            total_memory_bytes=_host_memory_bytes(),
            driver=None,
        )
    info["paged_kv"] = paged_kv_info()
    return info


def _host_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _json_ready(value: Any, where: str) -> Any:
    """A copy of `value` that json.dump accepts, or a ValueError naming the bad entry."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not valid JSON; record None or an error instead")
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy or torch scalar
        return _json_ready(value.item(), where)
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
        return {key: _json_ready(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where}: {type(value).__name__} {value!r} is not JSON-serialisable")


def results_dir(out_dir: str | os.PathLike | None = None, quick: bool = False) -> Path:
    """Where results go: `out_dir`, else $PAGED_KV_BENCH_OUT, else bench/results[/quick]."""
    if out_dir is not None:
        return Path(out_dir)
    if os.environ.get(OUT_DIR_ENV):
        return Path(os.environ[OUT_DIR_ENV])
    return QUICK_RESULTS_DIR if quick else RESULTS_DIR


def write_results(
    name: str,
    ceilings: dict,
    rows: list[dict],
    out_dir: str | os.PathLike | None = None,
    extra: dict | None = None,
    *,
    quick: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Write `<out_dir>/<name>.json` with the machine, software versions, ceilings and rows.

    `device` selects which device `device_info` describes (default: CUDA if present).
    Raises ValueError, naming the entry, for rows that are not dicts or values JSON cannot hold.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise ValueError(f"write_results: name must be a plain file stem, got {name!r}")
    if not isinstance(ceilings, dict):
        raise ValueError(f"write_results: ceilings must be a dict, got {type(ceilings).__name__}")
    if not isinstance(rows, list):
        raise ValueError(f"write_results: rows must be a list of dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"write_results: rows[{i}] must be a dict, got {type(row).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"write_results: extra must be a dict, got {type(extra).__name__}")

    info = device_info(device)
    payload = {
        "device": info["device_name"],
        "torch": info["torch"],
        "cuda": info["cuda"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(quick),
        "ceilings": _json_ready(ceilings, "ceilings"),
        "rows": _json_ready(rows, "rows"),
        "device_info": _json_ready(info, "device_info"),
    }
    if extra:
        clashes = set(extra) & set(payload)
        if clashes:
            raise ValueError(f"write_results: extra may not replace {sorted(clashes)}")
        payload.update(_json_ready(extra, "extra"))

    directory = results_dir(out_dir, quick)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    partial = path.with_suffix(".json.partial")  # rename at the end: never a half-written file
    partial.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    partial.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Command line and printing
# ---------------------------------------------------------------------------------------------


def bench_args(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark shares; scripts add their own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, runs on a CPU in seconds; results go to bench/results/quick/")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"folder for the results JSON (default: ${OUT_DIR_ENV} or bench/results/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: cuda when a GPU is visible)")
    return parser


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of `columns` from `rows`; floats get 4 significant digits."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    table = [columns] + [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
