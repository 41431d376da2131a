"""Typed wrappers of the paged_kv ops, each with its fake (meta) kernel beside it.

The fake kernels let the ops run under torch.compile(fullgraph=True) and torch.library.opcheck.
Shapes use these names: T tokens, H KV heads, D head_dim, F frames, L layers, P page_size.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from paged_kv import _library
from paged_kv.pte import exact_int

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
    the page is not in a GPU frame; no bad PTE is ever dereferenced. It copies values: the pool
    carries no gradient back to key and value (with grad mode on, a key or value that requires
    grad gets a warning).
    """
    _library.require_library()
    needs_grad = [name for name, t in (("key", key), ("value", value)) if getattr(t, "requires_grad", False)]
    if needs_grad and torch.is_grad_enabled():
        warnings.warn(f"paged_kv.append_kv: {needs_grad[0]} requires grad, but the pool takes values only: no gradient "
                      f"reaches it through attention over the pool. Run inference under torch.no_grad() or "
                      f"torch.inference_mode()", stacklevel=2)
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

    No backward: when the pool requires grad (grad mode on), backward through the outputs raises.
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
        whose every partial is empty gets output 0 and lse -inf; one with a NaN partial lse
        gets NaN for both. Differentiable in outputs and lses (an empty partial's gradients
        are 0).
    """
    _library.require_library()
    return torch.ops.paged_kv.merge_states.default(outputs, lses)


def attention(
    query: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    sequences: torch.Tensor,
    query_starts: torch.Tensor,
    kv_lens: torch.Tensor,
    layer: int,
    max_query_len: int,
    *,
    scale: float | None = None,
    window: int = 0,
    sinks: int = 0,
    host_pool: torch.Tensor | None = None,
    fault_queue: torch.Tensor | None = None,
    fault_count: torch.Tensor | None = None,
    telemetry: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of a batch of query chunks over each sequence's K/V, read through the page table.

    Sequence b of the batch has q_b = query_starts[b + 1] - query_starts[b] new queries (rows
    query_starts[b] .. query_starts[b + 1] of `query`) and kv_lens[b] tokens of K/V in row
    sequences[b] of the page table, the new tokens' K/V included (append them first). Its query i
    sits at position kv_lens[b] - q_b + i and sees the keys at positions k with
        k <= position                                   (causal)
        and, when window > 0, k > position - window     (sliding window, Mistral style)
                               or k < sinks             (sink tokens stay visible)
    Decode is q_b = 1; prefill and extend are larger chunks, causal against the whole history.

    Residency: a page whose PTE is tier 0 is read from its GPU frame; tier 1 is read from
    `host_pool` directly (zero-copy) when it is given, else it is a fault; tiers 2 and 3 are
    faults. A faulted page is skipped: its (page-table row, page) pair is appended to
    `fault_queue` at index fault_count[0] (then incremented; the caller zeroes the count; a
    count above the capacity means entries were dropped) and the result covers the other pages,
    so it can be completed exactly with merge_states. Each needed page is listed once per batch
    entry (entries sharing a page-table row may list a page they share more than once;
    read_faults returns the distinct pages);
    pages no query can see (outside every window) are never read and never fault. Without a
    fault queue, a page that cannot be read is an error. The op never synchronises with the host.

    Args:
        query: [N, Hq, D] queries, the pool's dtype (CUDA: float16/bfloat16; CPU: also float32),
            contiguous along D. Hq a multiple of the pool's KV heads (MHA, GQA, MQA); D 64, 128
            or 256.
        pool: [F, L, 2, H, P, D] GPU frame pool (or CPU pool for the CPU kernel).
        page_table: int32 [max_sequences, max_pages].
        sequences: int32 [B], page-table row of each batch entry.
        query_starts: int32 [B + 1], nondecreasing, query_starts[0] = 0, query_starts[B] = N.
        kv_lens: int32 [B], K/V tokens of each sequence, q_b <= kv_lens[b] <= max_pages * P.
        layer: which layer of the pages to read.
        max_query_len: an upper bound of every q_b (1 for decode); it sizes the launch.
        scale: softmax scale, default 1 / sqrt(D).
        window: sliding window in tokens, 0 for none. sinks: sink tokens (needs a window).
        host_pool: pinned [S, L, 2, H, P, D] host slots, read zero-copy for tier-1 pages; on a
            GPU, their mapped_host_view on the pool's device (for CUDA graphs) reads the same.
        fault_queue: int32 [capacity, 2]; fault_count: int32 [1]; the pool's device.
        telemetry: float32 [max_sequences, max_pages]; for each batch entry and page read in
            this call, adds the softmax mass that the entry's newest query put on the page,
            summed over query heads (so a layer adds at most Hq per entry; accumulate over
            layers by passing the same tensor).
        return_lse: also return the log-sum-exp.

    Returns:
        output [N, Hq, D] in query's dtype (float32 accumulation), and with return_lse the
        natural-log LSE float32 [N, Hq]. A query that sees no readable key gets output 0 and
        LSE -inf. A NaN score (a NaN in a query head or in a key it sees) makes that head's
        output and LSE NaN, as the softmax is; such a head adds nothing to `telemetry`. A NaN
        or inf value makes NaN (or inf) only the outputs of the queries that see its key. On
        CUDA that holds for calls with max_query_len 1 and at most 16 query heads per KV head
        (the decode kernels); in other calls (prefill chunks, several new tokens, larger
        groups) it can also reach queries that read the key's tile (16 to 128 keys) without
        seeing the key (P @ V multiplies their zero weights by it).

    No backward: when the query or a pool requires grad (grad mode on), the outputs require grad
    and backward through them raises, rather than leave a gradient silently lost (the pool,
    written by append_kv, never carries one back to the keys and values). Under torch.compile
    the compile of such a graph raises (AOTAutograd traces the backward): compile inference
    under torch.no_grad() or torch.inference_mode().
    """
    _library.require_library()
    out, lse = torch.ops.paged_kv.attention.default(
        query, pool, page_table, sequences, query_starts, kv_lens, layer, max_query_len,
        scale, window, sinks, host_pool, fault_queue, fault_count, telemetry,
    )
    return (out, lse) if return_lse else out


def new_fault_queue(capacity: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty fault queue for attention: int32 [capacity, 2] entries and an int32 [1] count."""
    capacity = exact_int("new_fault_queue: capacity", capacity)
    if capacity < 1:
        raise ValueError(f"new_fault_queue: capacity must be at least 1, got {capacity}")
    return (
        torch.full((capacity, 2), -1, dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
    )


def read_faults(fault_queue: torch.Tensor, fault_count: torch.Tensor) -> torch.Tensor:
    """The distinct recorded faults as an int32 [n, 2] CPU tensor of (page-table row, page),
    sorted. Synchronises. Raises if the queue overflowed (count above capacity): faults were
    dropped, or if the count is negative (it starts at 0 and only grows: the caller set it)."""
    for name, tensor, shape in (("fault_queue", fault_queue, "[capacity, 2]"), ("fault_count", fault_count, "[1]")):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32:
            kind = f"{tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"read_faults: {name} must be an int32 {shape} tensor (new_fault_queue), got {kind}")
    if fault_queue.dim() != 2 or fault_queue.shape[1] != 2:
        raise ValueError(f"read_faults: fault_queue must be [capacity, 2], got {list(fault_queue.shape)}")
    if fault_count.numel() != 1:
        raise ValueError(f"read_faults: fault_count must hold one element, got {list(fault_count.shape)}")
    count = int(fault_count.item())
    capacity = fault_queue.shape[0]
    if count < 0:
        raise RuntimeError(
            f"read_faults: fault_count is {count}: a count starts at 0 (new_fault_queue) and the "
            f"kernel only adds to it, so the faults it recorded cannot be told apart"
        )
    if count > capacity:
        raise RuntimeError(
            f"paged_kv.attention: fault queue overflowed: {count} faults for a capacity of "
            f"{capacity}; {count - capacity} were dropped. Use a queue of at least {count} entries."
        )
    faults = fault_queue[:count].cpu()
    if count:
        # Batch entries that share a page-table row may each list a page they both need.
        faults = torch.unique(faults, dim=0)  # sorted by row, then page
    return faults


def mapped_host_view(host: torch.Tensor, device: torch.device | str | int | None = None) -> torch.Tensor:
    """The pinned CPU tensor `host` as a CUDA tensor on `device` (default: the current one) over
    the same pages: no copy, the GPU reads and writes host memory over PCIe. It is what
    attention's `host_pool` takes where only device tensors may go, such as a step that
    torch.compile captures into CUDA graphs (mode="reduce-overhead" leaves a graph with a CPU
    input uncaptured). The view keeps `host` alive; a write through either is seen by the other
    (order GPU work against host writes as for any pinned buffer)."""
    _library.require_library()
    if not isinstance(host, torch.Tensor):
        raise TypeError(f"mapped_host_view: host must be a torch.Tensor, got {type(host).__name__}")
    lib = _cuda_library()
    if lib is None:
        raise RuntimeError("mapped_host_view: paged_kv was built without CUDA")
    if not torch.cuda.is_available():
        raise RuntimeError("mapped_host_view: no CUDA device is available")
    if isinstance(device, bool):
        raise TypeError("mapped_host_view: device must be a CUDA device, an index or None, got a bool")
    if isinstance(device, (str, torch.device)) and torch.device(device).type != "cuda":
        raise ValueError(f"mapped_host_view: device must be a CUDA device, got {torch.device(device)}")
    return lib.mapped_host_view(host, _cuda_index(device))


def _fake_args(op: str, anchor: str, tensors: dict, dims: dict) -> None:
    """What a fake kernel must refuse, since the real one never sees the call: a tensor on
    another device than `anchor` (one `meta` tensor among real ones sends the whole call to the
    fake kernel, which would return uninitialised memory), or a rank its shape is read from."""
    device = tensors[anchor].device
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise RuntimeError(f"paged_kv.{op}: {name} must be on the device of {anchor} ({device}), got {tensor.device}")
    for name, rank in dims.items():
        if tensors[name].dim() != rank:
            raise RuntimeError(f"paged_kv.{op}: {name} must have {rank} dimensions, got {tensors[name].dim()}")


if _LIB_LOADED:

    @torch.library.register_fake("paged_kv::append_kv")
    def _append_kv_fake(key, value, pool, page_table, sequences, positions, layer):
        _fake_args("append_kv", "pool", dict(key=key, value=value, pool=pool, page_table=page_table,
                                             sequences=sequences, positions=positions), {})
        return None

    @torch.library.register_fake("paged_kv::gather_kv")
    def _gather_kv_fake(pool, page_table, sequence, pages, layer):
        _fake_args("gather_kv", "pool", dict(pool=pool, page_table=page_table, pages=pages),
                   dict(pool=6, pages=1))
        shape = (pages.shape[0] * pool.shape[4], pool.shape[3], pool.shape[5])
        return pool.new_empty(shape), pool.new_empty(shape)

    @torch.library.register_fake("paged_kv::attention")
    def _attention_fake(query, pool, page_table, sequences, query_starts, kv_lens, layer,
                        max_query_len, scale=None, window=0, sinks=0, host_pool=None,
                        fault_queue=None, fault_count=None, telemetry=None):
        # host_pool may be a CPU tensor beside a CUDA pool (pinned slots), so it is not checked.
        _fake_args("attention", "pool", dict(query=query, pool=pool, page_table=page_table, sequences=sequences,
                                             query_starts=query_starts, kv_lens=kv_lens, fault_queue=fault_queue,
                                             fault_count=fault_count, telemetry=telemetry), dict(query=3))
        lse = query.new_empty(query.shape[:2], dtype=torch.float32)
        return query.new_empty(query.shape), lse

    @torch.library.register_fake("paged_kv::merge_states")
    def _merge_states_fake(outputs, lses):
        _fake_args("merge_states", "outputs", dict(outputs=outputs, lses=lses), dict(outputs=4, lses=3))
        return outputs.new_empty(outputs.shape[1:]), lses.new_empty(lses.shape[1:])

    def _merge_states_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], output[1])

    def _merge_states_backward(ctx, grad_out, grad_lse):
        """out = sum_i w_i o_i and lse = logsumexp_i lse_i, with w_i = exp(lse_i - lse):
        d/d o_i = w_i grad_out; d/d lse_i = w_i (<grad_out, o_i - out> + grad_lse). An empty
        partial (lse_i -inf) gets zero gradients, whatever its output holds. out is summed
        again in float32: the saved one is rounded to the outputs' dtype."""
        outputs, lses, lse = ctx.saved_tensors
        empty = torch.isneginf(lses)
        weights = torch.where(empty, 0.0, torch.exp(lses - lse))  # float32 [S, N, H]
        grad_lses = torch.zeros_like(lses) if grad_lse is None else grad_lse.float().expand_as(lses)
        grad_outputs = None
        if grad_out is not None:
            g = grad_out.float()
            grad_outputs = (weights[..., None] * g).to(outputs.dtype)
            parts = torch.where(empty[..., None], 0.0, outputs.float())
            parts = parts - (weights[..., None] * parts).sum(dim=0)
            grad_lses = grad_lses + (g * parts).sum(dim=-1)
        return grad_outputs, weights * grad_lses

    torch.library.register_autograd("paged_kv::merge_states", _merge_states_backward,
                                    setup_context=_merge_states_setup)


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
    lib.check_errors(_cuda_index(device))


def _cuda_index(device: torch.device | int | str | None) -> int:
    """The CUDA device index `device` names: an int is one, a device without an index (or None)
    means the current device."""
    if isinstance(device, int):
        return device
    index = None if device is None else torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def set_sync_checks(enabled: bool) -> None:
    """By default append_kv and gather_kv wait for their kernel and raise a bad input at once.
    With checks off they do not wait either; attention never waits, checks or not. A deferred
    error is raised by the next append_kv, gather_kv or attention on that device, or by
    check_errors(). The setting is the calling thread's (as torch's grad mode is): other
    threads' ops keep theirs. Ops captured into a CUDA graph always defer."""
    lib = _cuda_library()
    if lib is not None:
        lib.set_sync_checks(bool(enabled))


def sync_checks() -> bool:
    lib = _cuda_library()
    return True if lib is None else bool(lib.sync_checks())


@contextlib.contextmanager
def deferred_checks():
    """Within the block, CUDA ops of this thread do not synchronise to check their inputs; on
    leaving it, pending errors are raised (check_errors)."""
    previous = sync_checks()
    set_sync_checks(False)
    try:
        yield
    finally:
        set_sync_checks(previous)
    check_errors()
