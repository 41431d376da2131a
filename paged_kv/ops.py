"""Typed wrappers of the paged_kv ops, each with its fake (meta) kernel beside it.

The fake kernels let the ops run under torch.compile(fullgraph=True) and torch.library.opcheck.
Shapes use these names: T tokens, H KV heads, D head_dim, F frames, L layers, P page_size.
"""

from __future__ import annotations

import contextlib

import torch

from paged_kv import _library

_LIB_LOADED = _library._C is not None


def append_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    sequences: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
) -> None:
    """Write K and V of a batch of tokens into `layer` of their pages, in place.

    Args:
        key, value: [T, H, D], the pool's dtype and device, contiguous along D (any other strides).
        pool: [F, L, 2, H, P, D] frame pool, written in place.
        page_table: int32 [max_sequences, max_pages]; each token's page must be a tier-0 frame.
        sequences: int32 [T], the page-table row of each token.
        positions: int32 [T], each token's position in its sequence (page = position // P).
        layer: which layer of the pages to write.

    Raises RuntimeError naming the token when a sequence, position or PTE is out of range or
    the page is not in a GPU frame; no bad PTE is ever dereferenced.
    """
    _library.require_library()
    torch.ops.paged_kv.append_kv.default(key, value, pool, page_table, sequences, positions, layer)


def gather_kv(
    pool: torch.Tensor, page_table: torch.Tensor, sequence: int, pages: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read whole logical pages of one sequence out of `layer` into contiguous K and V.

    Args:
        pool: [F, L, 2, H, P, D] frame pool.
        page_table: int32 [max_sequences, max_pages].
        sequence: the page-table row to read.
        pages: int32 [N], logical page indices (any subset, any order, repeats allowed).
        layer: which layer to read.

    Returns:
        key, value: [N * P, H, D], row i * P + j holding token j of pages[i]. Rows past a
        sequence's end hold whatever the page holds there.
    """
    _library.require_library()
    return torch.ops.paged_kv.gather_kv.default(pool, page_table, sequence, pages, layer)


def merge_states(outputs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention states over disjoint key sets into the exact state over their
    union.

    Args:
        outputs: [S, N, H, D] partial outputs (float16, bfloat16 or float32), N queries, H heads.
        lses: float32 [S, N, H], each partial's natural-log log-sum-exp; -inf marks a partial
            with no keys (its output is ignored, NaN included).

    Returns:
        output [N, H, D] in outputs' dtype (accumulated in float32) and lse float32 [N, H]. A row
        whose every partial is empty gets output 0 and lse -inf.
    """
    _library.require_library()
    return torch.ops.paged_kv.merge_states.default(outputs, lses)


if _LIB_LOADED:

    @torch.library.register_fake("paged_kv::append_kv")
    def _append_kv_fake(key, value, pool, page_table, sequences, positions, layer):
        return None

    @torch.library.register_fake("paged_kv::gather_kv")
    def _gather_kv_fake(pool, page_table, sequence, pages, layer):
        shape = (pages.shape[0] * pool.shape[4], pool.shape[3], pool.shape[5])
        return pool.new_empty(shape), pool.new_empty(shape)

    @torch.library.register_fake("paged_kv::merge_states")
    def _merge_states_fake(outputs, lses):
        return outputs.new_empty(outputs.shape[1:]), lses.new_empty(lses.shape[1:])


def _cuda_library():
    _library.require_library()
    if not _library.build_info()["cuda"]:
        return None
    return _library._C


def check_errors(device: torch.device | int | str | None = None) -> None:
    """Synchronise `device` (default: current) and raise any bad input a paged_kv CUDA kernel
    recorded there since the last check. A no-op for CPU-only builds."""
    lib = _cuda_library()
    if lib is None or not torch.cuda.is_available():
        return
    if device is None:
        index = None
    elif isinstance(device, int):
        index = device
    else:
        index = torch.device(device).index
    lib.check_errors(torch.cuda.current_device() if index is None else index)


def set_sync_checks(enabled: bool) -> None:
    """By default each CUDA op waits for its kernel and raises a bad input at once. With checks
    off, ops never synchronise; an error is raised by the next paged_kv op on that device or by
    check_errors(). Ops captured into a CUDA graph always defer."""
    lib = _cuda_library()
    if lib is not None:
        lib.set_sync_checks(bool(enabled))


def sync_checks() -> bool:
    lib = _cuda_library()
    return True if lib is None else bool(lib.sync_checks())


@contextlib.contextmanager
def deferred_checks():
    """Within the block, CUDA ops do not synchronise to check their inputs; on leaving it,
    pending errors are raised (check_errors)."""
    previous = sync_checks()
    set_sync_checks(False)
    try:
        yield
    finally:
        set_sync_checks(previous)
    check_errors()
