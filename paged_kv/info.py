"""`python -m paged_kv info`: what was built, what this machine has, and the versions."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys

import torch

from paged_kv import _library


def cufile_wheel_paths() -> list[str]:
    """libcufile files of installed nvidia-* wheels (nvidia/cu13/lib, nvidia/cufile/lib, ...)."""
    paths = []
    for entry in sys.path:
        paths += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libcufile.so*")))
    return paths


def cufile_status() -> str:
    """Whether libcufile (GPUDirect Storage) can be loaded, and from where."""
    if _library._C is not None:
        # The shim the disk tier uses: loading and every entry point it needs.
        return _library._C.cufile_library_status(cufile_wheel_paths())
    candidates = ["libcufile.so.0", "libcufile.so"] + cufile_wheel_paths()
    found = ctypes.util.find_library("cufile")
    if found:
        candidates.insert(0, found)
    errors = []
    for name in candidates:
        try:
            ctypes.CDLL(name)
            return f"present ({name})"
        except OSError as exc:
            errors.append(str(exc))
    return "absent (" + (errors[0] if errors else "libcufile not found") + ")"


def collect() -> dict:
    info = {
        "paged_kv": __import__("paged_kv").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    if _library.LOAD_ERROR:
        info["library"] = _library.LOAD_ERROR
    else:
        build = _library.build_info()
        info["library"] = "CUDA build" if build["cuda"] else "CPU-only build"
        if build["cuda"]:
            v = build["cuda_runtime_compiled"]
            info["compiled_cuda_runtime"] = f"{v // 1000}.{(v % 1000) // 10}"
            info["cuda_arch_list"] = build["cuda_arch_list"]
            info["prefill_kernel"] = (
                "wgmma on compute capability 9.0, mma.sync elsewhere" if build["wgmma_prefill"]
                else "mma.sync (no sm_90a build)")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = (
            f"{props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.multi_processor_count} multiprocessors, {props.total_memory / 2**30:.1f} GiB"
        )
    else:
        info["gpu"] = "none visible"
    info["cufile"] = cufile_status()
    return info


def main() -> int:
    for key, value in collect().items():
        print(f"{key:>22}: {value}")
    return 0
