"""Builds paged_kv._C: a CUDA extension when torch has CUDA and nvcc is found, else CPU only.

No GPU is needed at build time. Environment:
  TORCH_CUDA_ARCH_LIST   extra architectures; Hopper (9.0a: 9.0 with wgmma) is always built
  PAGED_KV_CPU_ONLY=1    build the CPU extension even where CUDA is available
  MAX_JOBS               parallel compile jobs (ninja)
"""

import glob
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
# 9.0a is Hopper with its architecture-specific instructions (wgmma), which the prefill kernel
# uses; its code runs on every 9.0 GPU, so a plain 9.0 beside it is dropped.
DEFAULT_ARCHES = ["9.0a"]


def _locate_cuda_home():
    """torch guesses CUDA_HOME as the folder above `nvcc` on the PATH, which is wrong when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc). Ask nvcc where it really lives and set
    CUDA_HOME before torch.utils.cpp_extension reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", probe], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError):
            return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            home = os.path.dirname(line.split("=", 1)[1].strip())
            if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
                os.environ["CUDA_HOME"] = home
            return


def _cuda_wanted():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("PAGED_KV_CPU_ONLY") == "1":
        return False, "PAGED_KV_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA compiler (nvcc) found"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def _arch_list():
    """Hopper plus whatever TORCH_CUDA_ARCH_LIST asks for (or, when it is unset, the visible
    GPU's own architecture), set explicitly so torch never probes for a GPU."""
    import torch

    arches = list(DEFAULT_ARCHES)
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";").split(";")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        wanted.append(f"{major}.{minor}")
    for a in wanted:
        if a and a not in arches and f"{a}a" not in arches:
            arches.append(a)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arches)
    return arches


def _nvidia_wheel_dirs():
    """include/ and lib/ folders of the installed nvidia-* CUDA wheels (nvidia/cu13, nvidia/cu12,
    or per-library folders), which hold headers and libraries a trimmed toolkit lacks."""
    includes, libs = [], []
    for entry in sys.path:
        base = pathlib.Path(entry) / "nvidia"
        if not base.is_dir():
            continue
        for sub in sorted(base.iterdir()):
            if (sub / "include").is_dir():
                includes.append(str(sub / "include"))
            if (sub / "lib").is_dir():
                libs.append(str(sub / "lib"))
    return includes, libs


def _cudart_link_dir(cuda_home, wheel_libs):
    """The toolkit may lack the unversioned libcudart.so that `-lcudart` needs. Then point a link
    in build/ at the wheel's versioned library and return that folder."""
    for d in ("lib64", "lib", "lib/x64", "targets/x86_64-linux/lib"):
        if (pathlib.Path(cuda_home) / d / "libcudart.so").exists():
            return None
    for lib_dir in wheel_libs:
        candidates = sorted(glob.glob(os.path.join(lib_dir, "libcudart.so.*")))
        if candidates:
            link_dir = ROOT / "build" / "cudart_link"
            link_dir.mkdir(parents=True, exist_ok=True)
            link = link_dir / "libcudart.so"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(candidates[0])
            return str(link_dir)
    raise RuntimeError(
        f"paged_kv: no libcudart.so in {cuda_home} nor in an installed nvidia-cuda-runtime wheel"
    )


def _extension():
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    use_cuda, reason = _cuda_wanted()
    print(f"paged_kv: building {'CUDA' if use_cuda else 'CPU-only'} extension ({reason})")
    sources = ["csrc/ops_schema.cpp", "csrc/no_backward.cpp", "csrc/python_module.cpp"]
    for layer in ("cpu", "store", "engine"):  # torch-side C++ of every layer (DESIGN.md)
        sources += sorted(glob.glob(f"csrc/{layer}/*.cpp"))
    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function"]
    include_dirs = [str(ROOT / "csrc")]
    if not use_cuda:
        return CppExtension(
            "paged_kv._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )

    arches = _arch_list()
    print(f"paged_kv: CUDA architectures {';'.join(arches)}")
    wheel_includes, wheel_libs = _nvidia_wheel_dirs()
    library_dirs = []
    link_dir = _cudart_link_dir(CUDA_HOME, wheel_libs)
    if link_dir:
        library_dirs.append(link_dir)
    defines = ["-DPKV_WITH_CUDA", f'-DPKV_CUDA_ARCH_LIST="{";".join(arches)}"']
    if "9.0a" in arches:
        defines.append("-DPKV_HAS_SM90A")  # the wgmma prefill kernel is built
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "paged_kv._C",
        sources,
        # The toolkit's own headers come first; the wheels fill what it lacks (cusparse.h, ...).
        include_dirs=include_dirs + [os.path.join(CUDA_HOME, "include")] + wheel_includes,
        library_dirs=library_dirs,
        extra_compile_args={
            "cxx": cxx_flags + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
    )


def main():
    _locate_cuda_home()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["paged_kv", "paged_kv.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
