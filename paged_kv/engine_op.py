"""torch.ops.paged_kv.engine_attention: attention over an Engine's pages, fault service inside.

paged_kv.attention, the kernel op, reads the pages it can reach and reports the rest; it never
synchronises and knows no pager. This op is an engine's whole attention step as one operator:
it runs the kernel, and when pages fault it has the engine's pager bring them in (in batches
when they outnumber the frames that can be freed), reruns the kernel over each batch alone and
merges the partial states exactly. Engine.attention calls it; model code may call it directly,
and under torch.compile it stays one node, so a decode step whose pages fault compiles with no
graph break.

    out, lse = torch.ops.paged_kv.engine_attention(
        query, engine.pool, engine.page_table, engine.op_id, rows, query_starts, layer)

The engine is named by `engine.op_id`, an integer handed out when the engine is built and
withdrawn when it is closed. `pool` and `page_table` must be that engine's own tensors: the
op declares them mutated (fault service writes frames and PTEs), which keeps it ordered after
the appends that wrote the pool and before later readers of the table.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

_engines: dict[int, weakref.ref] = {}
_ids = itertools.count(1)


def register(engine) -> int:
    """A new id naming `engine` to the op (held weakly)."""
    op_id = next(_ids)
    _engines[op_id] = weakref.ref(engine)
    return op_id


def unregister(op_id: int) -> None:
    _engines.pop(op_id, None)


def lookup(op_id: int):
    """The open engine with this id; ValueError when there is none."""
    ref = _engines.get(op_id)
    engine = ref() if ref is not None else None
    if engine is None or engine.closed:
        raise ValueError(
            f"paged_kv.engine_attention: no open Engine has op_id {op_id} (ids are handed out by "
            f"Engine() and withdrawn by Engine.close())"
        )
    return engine


@torch.library.custom_op("paged_kv::engine_attention", mutates_args=("pool", "page_table"))
def engine_attention(
    query: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    engine: int,
    rows: list[int],
    query_starts: list[int],
    layer: int,
    scale: Optional[float] = None,
    window: int = 0,
    sinks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of a batch of query chunks over the engine's pages; see
    Engine.attention for the arguments. Returns the output [N, Hq, D] and the float32 LSE
    [N, Hq]."""
    found = lookup(engine)
    for name, given, own in (("pool", pool, found.pool), ("page_table", page_table, found.page_table)):
        if (given.data_ptr() != own.data_ptr() or given.shape != own.shape or given.dtype != own.dtype
                or given.device != own.device):
            raise ValueError(
                f"paged_kv.engine_attention: {name} must be engine {engine}'s own {name} (its pager "
                f"writes that tensor), got another tensor of shape {tuple(given.shape)}"
            )
    return found._attend(query, rows, query_starts, layer, scale, window, sinks)


@engine_attention.register_fake
def _engine_attention_fake(query, pool, page_table, engine, rows, query_starts, layer, scale=None,
                           window=0, sinks=0):
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    return out, lse
