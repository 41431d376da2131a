"""Decode over the bound batch slots with no host work inside the step, so a CUDA graph can
capture it (docs/DESIGN.md, "Graph safety").

    decoder = SlotDecoder(engine)            # the bound slots, in slot order, form the batch
    decoder.reserve(steps)                   # host: pages for `steps` tokens, prefetched in reach
    with torch.cuda.graph(graph):            # or eagerly, on any device
        for layer in range(num_layers):
            out = decoder.step(query[layer], key[layer], value[layer], layer)
    for _ in range(steps):
        ...copy the next token's inputs in place...; graph.replay()
    decoder.commit(steps)                    # host: raises FaultError for a fault in the steps

reserve() does the host's part ahead of time: it gives every bound sequence pages for its next
`steps` tokens, brings every page within the kernel's reach (GPU frames, or host slots with
zero-copy), writes each slot's length into a device tensor, and raises PagerError when the
tiers cannot make room or FaultError when a page is still out of reach. step() only launches
kernels over device tensors: it appends the token's K/V at the slot's length, attends the
sequence with a fault queue, and after the last layer advances the lengths on the device.
Nothing in it reads a device value on the host; on CUDA append_kv still waits for its input
check unless checks are deferred (ops.deferred_checks) or the step is captured in a CUDA graph.
A page that became unreachable anyway (moved by other work between reserve and the step) is
recorded in the fault queue and skipped; commit() reads the queue once, after the steps, and
raises FaultError naming it: the outputs of those steps are then incomplete. commit() also
catches up the host's bookkeeping (tokens written, full pages sealed). The Engine's policy must
have fault_mode "forbid".

Model code whose cache update and attention are separate calls (Hugging Face's) uses the two
halves of step(), append(key, value, layer) and attend(query, layer); they leave the check of the
reservation to the caller, on the host, so that a compiled step reads no host counter
(paged_kv.integrations.transformers.CompiledDecoder does so).
"""

from __future__ import annotations

import torch

from paged_kv import ops
from paged_kv.engine import Engine, FaultError
from paged_kv.pte import Tier

__all__ = ["SlotDecoder"]


class SlotDecoder:
    """Graph-safe decode steps over an Engine's bound batch slots; see the module docstring."""

    def __init__(self, engine: Engine):
        if not isinstance(engine, Engine):
            raise TypeError(f"SlotDecoder needs a paged_kv.Engine, got {type(engine).__name__}")
        if engine.policy.fault_mode != "forbid":
            raise ValueError(
                "SlotDecoder: the engine's Policy.fault_mode must be 'forbid' (a step inside a CUDA "
                f"graph cannot service faults), got {engine.policy.fault_mode!r}"
            )
        self.engine = engine
        self.rows: list[int] = []
        self._pending = 0  # steps reserved and not yet committed
        dev = engine.device
        self.lengths = torch.zeros(engine.max_batch, dtype=torch.int32, device=dev)
        self._starts = torch.arange(engine.max_batch + 1, dtype=torch.int32, device=dev)
        capacity = engine.max_batch * engine.max_pages + 1
        self._queue, self._count = ops.new_fault_queue(capacity, dev)
        self._faults_in_steps = torch.zeros(1, dtype=torch.int32, device=dev)
        # The host slots a step reads in place (zero-copy). On a GPU, their mapped view: a device
        # tensor, which a step captured into CUDA graphs by torch.compile can take as an input.
        self._host_slots = None
        if engine.policy.zero_copy and engine.host_pool is not None:
            self._host_slots = (ops.mapped_host_view(engine.host_pool, dev) if dev.type == "cuda"
                                else engine.host_pool)

    def reserve(self, steps: int) -> None:
        """Prepare the next `steps` decode steps of the bound slots (host work, outside any graph):
        pages for the tokens, every page brought within reach, the slots' lengths written. Raises
        PagerError when the tiers cannot make room (the host tier cannot take the disk pages),
        or FaultError when a page is still out of reach after the prefetch (raise the GPU
        budget, turn zero_copy on, or give the host tier room); the sequences are then left as
        they were, so the call can be repeated once there is room."""
        engine = self.engine
        engine._check_open()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SlotDecoder.reserve: steps must be a positive int, got {steps!r}")
        if self._pending:
            raise RuntimeError(f"SlotDecoder.reserve: {self._pending} reserved steps are not committed yet")
        rows = engine.bound()
        if not rows:
            raise ValueError("SlotDecoder.reserve: no batch slot is bound (Engine.bind)")
        lengths = [engine.num_tokens(row) for row in rows]
        reserved = [engine._sequence(row).reserved for row in rows]
        pages = [engine.pager.num_pages(row) for row in rows]
        try:
            for row in rows:
                engine.reserve(row, steps)
            engine.prefetch(rows)
            unreachable = self._unreachable(rows)
            if len(unreachable):
                shown = ", ".join(f"(row {r}, page {p})" for r, p in unreachable[:16].tolist())
                raise FaultError(
                    f"SlotDecoder.reserve: {len(unreachable)} page(s) of the bound sequences cannot be "
                    f"brought within the kernel's reach: {shown}; raise Policy.gpu_budget or the host "
                    f"tier, or turn zero_copy on"
                )
        except BaseException:
            # Refused: the sequences are left with the tokens and pages they had (the empty pages
            # added for the new tokens give their frames back), so reserve() can be tried again
            # once there is room.
            for row, tokens, count in zip(rows, reserved, pages):
                engine._sequence(row).reserved = tokens
                try:
                    engine.pager.drop_open_pages(row, engine.pager.num_pages(row) - count)
                except ValueError:  # cannot happen to pages reserve() just added; if it did, they
                    pass            # would only stay empty until the sequence is freed
            engine.pager.sync_table(engine.page_table)
            raise
        values = torch.tensor(lengths, dtype=torch.int32)
        self.lengths[: len(rows)].copy_(values.pin_memory() if self.lengths.is_cuda else values,
                                        non_blocking=True)
        self._faults_in_steps.zero_()
        self.rows = rows
        self._pending = steps

    @property
    def pending(self) -> int:
        """Steps reserved and not yet committed (0 outside reserve() .. commit())."""
        return self._pending

    def static_tensors(self) -> list[torch.Tensor]:
        """The tensors a step reads or writes in place, besides its arguments: the engine's pool,
        page table and batch rows, the decoder's lengths and fault queue, and with zero-copy the
        host slots (on a GPU, their mapped view: a device tensor). Their addresses never change,
        which is what a CUDA graph replaying the step needs (torch.compile's "reduce-overhead"
        mode must be told so: torch._dynamo.mark_static_address)."""
        engine = self.engine
        tensors = [engine.pool, engine.page_table, engine.batch_rows, self.lengths, self._starts,
                   self._queue, self._count, self._faults_in_steps]
        return tensors + ([self._host_slots] if self._host_slots is not None else [])

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
             *, scale: float | None = None, window: int = 0, sinks: int = 0) -> torch.Tensor:
        """One layer of one decode step for the reserved batch: appends key/value ([B, H, D]) at
        each slot's length, attends query ([B, Hq, D]) over the sequence including it, and after
        the last layer advances the lengths. Device work only."""
        if not self._pending:
            raise RuntimeError("SlotDecoder.step: call reserve() before the steps")
        self.append(key, value, layer)
        return self.attend(query, layer, scale=scale, window=window, sinks=sinks)

    def append(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> None:
        """The first half of step(): writes key/value ([B, H, D]) at each slot's length in `layer`.
        For model code whose cache update and attention are separate calls. Unlike step() it
        does not check the reservation (`pending`, host state that a compiled step must not read,
        or it would be recompiled as it changes): the caller checks it on the host."""
        engine = self.engine
        batch = self._check_batch(key=key, value=value)
        ops.append_kv(key, value, engine.pool, engine.page_table, engine.batch_rows[:batch],
                      self.lengths[:batch], engine._layer(layer))

    def attend(self, query: torch.Tensor, layer: int, *, scale: float | None = None, window: int = 0,
               sinks: int = 0) -> torch.Tensor:
        """The second half of step(): attends query ([B, Hq, D]) over each slot's sequence up to
        and including the token append() wrote at `layer`, and after the last layer advances
        the lengths. Returns [B, Hq, D]."""
        engine = self.engine
        batch = self._check_batch(query=query)
        layer = engine._layer(layer)
        lengths = self.lengths[:batch]
        self._count.zero_()
        out = ops.attention(
            query, engine.pool, engine.page_table, engine.batch_rows[:batch], self._starts[: batch + 1],
            lengths + 1, layer, 1, scale=scale, window=window, sinks=sinks,
            host_pool=self._host_slots,
            fault_queue=self._queue, fault_count=self._count,
        )
        self._faults_in_steps.add_(self._count)
        if layer == engine.num_layers - 1:
            lengths.add_(1)
        return out

    def commit(self, steps: int) -> None:
        """After `steps` replays (or eager steps): read the fault count once and raise FaultError
        when any step met an unreachable page; bring the engine's bookkeeping up to date."""
        engine = self.engine
        if steps != self._pending:
            raise ValueError(f"SlotDecoder.commit: {self._pending} steps were reserved, got {steps}")
        self._pending = 0
        for row in self.rows:
            seq = engine._sequence(row)
            seq.written = [seq.reserved] * engine.num_layers
            engine._release_if_done(row, seq)
        engine._tick += 1
        pages = [-(-engine.num_tokens(row) // engine.page_size) for row in self.rows]
        engine.pager.touch_prefixes(self.rows, pages, engine._tick)
        faults = int(self._faults_in_steps.item())  # the one synchronisation
        if faults:
            last = ops.read_faults(self._queue, self._count)
            shown = ", ".join(f"(row {r}, page {p})" for r, p in last[:16].tolist())
            raise FaultError(
                f"SlotDecoder.commit: {faults} page read(s) in the last {steps} step(s) found the page "
                f"out of reach, so those steps' outputs are incomplete; the last layer missed: "
                f"{shown or 'none'}. Keep the bound sequences' pages in reach between reserve() and commit()"
            )

    def _check_batch(self, **tensors: torch.Tensor) -> int:
        """The batch (the reserved slots); raises when a tensor's first dimension differs."""
        batch = len(self.rows)
        if any(t.shape[0] != batch for t in tensors.values()):
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
            raise ValueError(f"SlotDecoder: the batch is the {batch} bound slot(s), got {shapes}")
        return batch

    def _unreachable(self, rows: list[int]) -> torch.Tensor:
        engine = self.engine
        out_of_reach = {Tier.DISK, Tier.UNMAPPED}
        if not (engine.policy.zero_copy and engine.host_pool is not None):
            out_of_reach.add(Tier.HOST)
        return engine._pages_where(rows, out_of_reach)
