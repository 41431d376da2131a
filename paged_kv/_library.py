"""Loads the compiled library paged_kv._C (which registers torch.ops.paged_kv.*).

If it is missing or does not load, `import paged_kv` still works and says exactly why; the ops
then raise that reason when called.
"""

from __future__ import annotations

import importlib

_C = None
LOAD_ERROR: str | None = None

try:
    import torch  # noqa: F401  (torch must be loaded before the library that links against it)

    _C = importlib.import_module("paged_kv._C")
except Exception as exc:  # ImportError, or an OSError from a missing shared library
    LOAD_ERROR = (
        f"paged_kv's compiled library (paged_kv._C) could not be loaded: {type(exc).__name__}: {exc}. "
        "Build it with `pip install --no-build-isolation -e .` in the repository "
        "(see README.md), against the torch you run with."
    )


def require_library() -> None:
    """Raises RuntimeError with the load failure when the compiled library is missing."""
    if _C is None:
        raise RuntimeError(LOAD_ERROR)


def build_info() -> dict:
    """What the library was built with: {'cuda': bool, 'cuda_runtime_compiled', 'cuda_arch_list',
    'wgmma_prefill': whether the Hopper (sm_90a) prefill kernel is in it}."""
    require_library()
    return dict(_C.build_info())
