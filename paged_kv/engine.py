"""The engine: a Policy turned into tiers, a pager and a page table, with exact attention over
contexts larger than the GPU frames (docs/DESIGN.md, "The fault protocol").

    with Engine(policy, num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                device="cuda", max_sequences=64, max_pages=512) as engine:
        row = engine.new_sequence()
        for layer in range(32):                      # one forward step of T new tokens
            engine.append(row, key[layer], value[layer], layer)        # [T, H, D] each
            out = engine.attention(query[layer], [row], [0, T], layer)  # [T, Hq, D]

Appending. All layers of a token live in one page, so pages are allocated per token range, not
per layer. Each sequence has a *reserved* token count (pages exist for it) and, per layer, a
*written* count. append(row, key, value, layer) writes the T tokens after that layer's written
count; when those go past the reservation and every layer has caught up with it, the engine
reserves T more tokens first (so the first layer written in a step allocates, the others reuse
those pages). reserve(row, n) does the same explicitly. Writing a layer past the reservation
while another layer lags behind it is an error. attention at `layer` sees the tokens written
at that layer, so the usual loop "append layer l, attend layer l" works step by step.

Sealing. A page is sealed only once it is full and every layer has written its last token; until
then it is open (GPU-resident, writable, never evicted). A step whose tokens start inside a
partly written page and spill into new pages appends them with Pager.append_pages(seal_open=False),
so that page stays open while the other layers write it, and the engine seals it (Pager.seal)
when the step is complete. Under Policy.write_policy="write_through" sealing is what copies a page
to the host, so every copy holds all layers' tokens, and a multi-token step may start anywhere.

Faults: attention runs paged_kv.attention with a fault queue. The pager's mirror of the page
table tells on the host whether any page of the batch is out of reach; only then are the faults
read (a synchronisation). With fault_mode "service" and zero_copy, with room in the host tier,
they are read into host slots and attended there in place; otherwise they are made GPU-resident
in batches of at most pager.max_serviceable(); each batch is attended on a page table mapping
that batch alone, and every partial state is merged with paged_kv.merge_states, which gives
exact attention over the whole context. With fault_mode "forbid" a fault raises FaultError naming the pages.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from typing import Sequence

import torch

from paged_kv import engine_op, ops
from paged_kv.pager import Pager, PagerError
from paged_kv.policy import Policy, parse_bytes
from paged_kv.pte import TIER_SHIFT, Tier, UNMAPPED, exact_int, new_page_table, new_pool

__all__ = ["Engine", "FaultError"]

HEAD_DIMS = (64, 128, 256)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_DTYPES = (torch.float16, torch.bfloat16)


class FaultError(RuntimeError):
    """A page the attention needed was not readable and the policy forbids servicing faults."""


def _new_host_pool(shape: tuple, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """The host slots. Pinned (page-locked) when the pool is on a GPU, so the kernel can read them
    in place and copies run at full speed; a failed pinned allocation says what was asked for."""
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    except RuntimeError as error:
        if not pin:
            raise
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raise RuntimeError(
            f"Engine: could not allocate {nbytes:,} bytes of pinned host memory for "
            f"{shape[0]} host slots (Policy.host_budget); lower the budget or free pinned "
            f"memory. The allocator said: {error}"
        ) from error


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Engine: {name} must be a positive int, got {value!r}")
    return value


class _Sequence:
    __slots__ = ("reserved", "written")

    def __init__(self, num_layers: int):
        self.reserved = 0  # tokens that have pages
        self.written = [0] * num_layers  # tokens written, per layer


def _index_list(what: str, values) -> list[int]:
    """A list or integer tensor of indices as ints; a float or bool entry is an error, not
    rounded."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"{what} must hold integers, got a {values.dtype} tensor")
        return [int(v) for v in values.tolist()]
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of ints or an integer tensor, got {type(values).__name__}") from None
    return [exact_int(f"{what}: each entry", v) for v in items]


def _tier_named(name: str, allowed: tuple[str, ...], where: str) -> Tier:
    if name not in allowed:
        raise ValueError(f"{where}: tier must be one of {', '.join(repr(a) for a in allowed)}, got {name!r}")
    return {"gpu": Tier.GPU, "host": Tier.HOST, "disk": Tier.DISK}[name]


class Engine:
    """Tiers, pager and device page table built from a Policy; see the module docstring.

    Args:
        policy: the Policy; its budgets are floored to whole pages of this model's geometry.
        num_layers, num_kv_heads, head_dim: the model's KV geometry (head_dim 64, 128 or 256).
        dtype: K/V dtype (float16 or bfloat16; float32 also on CPU).
        device: where the GPU frames and the page table live (CUDA, or CPU for tests).
        max_sequences, max_pages: the page table's shape (rows, pages per row).
        max_batch: batch slots that bind() can fill (default max_sequences).

    Attributes: policy, device, dtype, page_bytes, num_frames, num_host_slots, num_disk_slots,
    pool, host_pool (None without a host tier), batch_rows (int32 [max_batch] on the device: the
    row bound to each batch slot, -1 when free), disk_store (None without a disk tier), disk_path,
    io_backend ("posix" or "cufile", or None without a disk tier: how disk pages reach the
    frames, see Policy.io_backend), io_backend_reason (why: cuFile's load error, or the speeds
    of both backends measured on the store's own file), pager, page_table.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_sequences: int,
        max_pages: int,
        max_batch: int | None = None,
    ):
        self._closed = True  # until construction succeeds
        self._temp_dir = None
        if not isinstance(policy, Policy):
            raise TypeError(f"Engine needs a paged_kv.Policy, got {type(policy).__name__}")
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_sequences", max_sequences),
                            ("max_pages", max_pages)):
            _positive(name, value)
        max_batch = max_sequences if max_batch is None else _positive("max_batch", max_batch)
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"Engine: head_dim must be one of {HEAD_DIMS} (the attention kernels), got {head_dim}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"Engine: dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"Engine: device {device} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            allowed = CUDA_DTYPES
        elif device.type == "cpu":
            allowed = CPU_DTYPES
        else:
            raise ValueError(f"Engine: device must be a CUDA device or the CPU, got {device}")
        if dtype not in allowed:
            raise ValueError(
                f"Engine: dtype {dtype} is not supported on {device.type}; use one of "
                f"{', '.join(str(d) for d in allowed)}"
            )

        self.policy = policy
        self.device = device
        self.dtype = dtype
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size = policy.page_size
        self.max_sequences, self.max_pages = max_sequences, max_pages
        element_size = torch.empty((), dtype=dtype).element_size()
        self.page_bytes = policy.page_bytes(num_layers, num_kv_heads, head_dim, element_size)
        frames = policy.frames(self.page_bytes)
        self.num_frames, self.num_host_slots, self.num_disk_slots = frames["gpu"], frames["host"], frames["disk"]
        if self.num_disk_slots and not self.num_host_slots:
            raise ValueError(
                "Engine: Policy.disk_budget is set but Policy.host_budget is 0; pages reach the "
                "disk through host slots, so give the host tier at least one page "
                f"({self.page_bytes} bytes) or set disk_budget to 0"
            )

        pin = device.type == "cuda"
        # Zeroed once: appends write only part of a page, and the pager zeroes a frame only when
        # it passes from one tenant's page to another's, so a fresh frame must hold nobody's bytes.
        self.pool = new_pool(self.num_frames, num_layers, num_kv_heads, self.page_size, head_dim, dtype,
                             device).zero_()
        self.host_pool = None
        if self.num_host_slots:
            self.host_pool = _new_host_pool((self.num_host_slots, *self.pool.shape[1:]), dtype, pin)
        self.disk_store = None
        self.disk_path = None
        if self.num_disk_slots:
            from paged_kv.store import DiskStore

            if policy.disk_path is None:
                self._temp_dir = tempfile.mkdtemp(prefix="paged_kv_")
                self.disk_path = self._temp_dir
            else:
                self.disk_path = policy.disk_path
            try:
                self.disk_store = DiskStore(self.disk_path, self.num_disk_slots, self.page_bytes)
            except BaseException:
                self._remove_temp_dir()
                raise
        try:
            self.pager = Pager(
                self.pool, self.host_pool, max_sequences=max_sequences, max_pages=max_pages,
                disk_store=self.disk_store, write_through=policy.write_policy == "write_through",
                io_backend=policy.io_backend,
            )
        except BaseException:
            self.disk_store = None
            self._remove_temp_dir()
            raise
        self.io_backend = self.pager.io_backend
        self.io_backend_reason = self.pager.io_backend_reason
        self.pager.set_replacement(policy.replacement, decay=policy.span_decay, share=policy.span_share,
                                   sink_pages=policy.span_sink_pages, window_pages=policy.span_window_pages)
        self.page_table = new_page_table(max_sequences, max_pages, device)
        # Span-aware replacement reads what attention uses: the kernel adds each page's softmax
        # mass (summed over heads, over the layers of a step) here, and the last layer's call
        # copies the step's rows out (to pinned memory, without waiting) and hands the step
        # before's to the pager (flush_telemetry), so no step waits for the GPU.
        self._telemetry = self._telemetry_host = None
        self._telemetry_pending = None  # (rows, pages per row, host copy, its copy's event)
        if policy.replacement == "span":
            self._telemetry = torch.zeros(max_sequences, max_pages, dtype=torch.float32, device=device)
            if self._telemetry.is_cuda:
                self._telemetry_host = torch.empty(max_sequences, max_pages, dtype=torch.float32, pin_memory=True)
        self._sequences: dict[int, _Sequence] = {}
        self.max_batch = max_batch
        self.batch_rows = torch.full((max_batch,), -1, dtype=torch.int32, device=device)
        self._bound: dict[int, int] = {}  # batch slot -> row
        self._tick = 0
        self._count_up: torch.Tensor | None = None  # see _counting
        self._counters = {
            "attention_calls": 0,
            "tokens_appended": 0,
            "faults_seen": 0,
            "fault_services": 0,  # attention calls that serviced faults
            "fault_batches": 0,  # batches serviced into GPU frames
            "fault_host_passes": 0,  # zero-copy: faults read into host slots and attended there
            "fault_service_seconds": 0.0,
            "prefetched_pages": 0,
            "prefetches_refused": 0,  # steps whose prefetch found no room in the host tier
        }
        self._closed = False
        self.op_id = engine_op.register(self)

    # ---- sequences ----

    def new_sequence(self, tenant: int = 0) -> int:
        """A new, empty sequence of `tenant`; returns its page-table row."""
        self._check_open()
        row = self.pager.add_sequence(tenant)
        self._sequences[row] = _Sequence(self.num_layers)
        return row

    def fork(self, row: int) -> int:
        """A new sequence with `row`'s tokens, of its tenant; returns the new row. Its full pages
        are shared with `row` (no KV byte is copied, and a shared page is stored once in each
        tier), its partly written last page is copied; from there the two grow apart. Every
        layer must have written the same tokens."""
        seq = self._sequence(row)
        if any(w != seq.reserved for w in seq.written):
            raise ValueError(f"Engine.fork: sequence {row} is in the middle of a step (tokens written per "
                             f"layer: {seq.written}); fork it between steps")
        try:
            child = self.pager.fork(row)
        finally:
            self.pager.sync_table(self.page_table)
        copy = _Sequence(self.num_layers)
        copy.reserved, copy.written = seq.reserved, list(seq.written)
        self._sequences[child] = copy
        return child

    def free_sequence(self, row: int) -> None:
        """Free the row and all its pages (unbinding it from any batch slot)."""
        self._sequence(row)
        self.flush_telemetry()  # its last step's mass must not reach a later sequence in the row
        for slot in [s for s, r in self._bound.items() if r == row]:
            self.unbind(slot)
        self.pager.remove_sequence(row)
        del self._sequences[row]
        self.pager.sync_table(self.page_table)

    def suspend(self, row: int, tier: str = "host") -> int:
        """Move the sequence's sealed pages down to the host (`tier="host"`) or disk
        (`"disk"`) tier, freeing their GPU frames for other sequences; returns how many pages
        left the GPU. Nothing about the sequence changes but where its pages are: its next
        attention faults them back in (or reads host pages in place with zero-copy), and
        resume() brings them up ahead of time. The open tail page, still being written, stays
        in its frame. Raises PagerError when the tier has no room."""
        seq_tier = _tier_named(tier, ("host", "disk"), "Engine.suspend")
        self._sequence(row)
        sealed = self._sealed_count(row)
        tiers = (self.pager.page_table()[row, :sealed].to(torch.int64) & 0xFFFFFFFF) >> TIER_SHIFT
        on_gpu = int((tiers == Tier.GPU).sum())
        try:
            if sealed:
                pages = torch.arange(sealed, dtype=torch.int64)
                self.pager.demote(torch.stack([torch.full_like(pages, row), pages], 1), seq_tier)
        finally:  # a refused call may still have moved pages
            self.pager.sync_table(self.page_table)
        return on_gpu

    def resume(self, row: int, tier: str = "gpu") -> int:
        """Bring the sequence's pages up to the GPU (`tier="gpu"`, newest first, as many as the
        frames that can be freed, and the tenant's GPU quota, hold) or, from disk, to the host
        (`"host"`, all of them); returns how many pages moved up. Copies from host slots into GPU
        frames are queued on the pager's stream and the current stream waits for them, so the
        call does not wait for them; reads from disk (and write-backs they force) it waits for."""
        target = _tier_named(tier, ("gpu", "host"), "Engine.resume")
        self._sequence(row)
        below = self._pages_where([row], {Tier.HOST, Tier.DISK} if target == Tier.GPU else {Tier.DISK})
        if target == Tier.GPU:  # as many as the frames (and the tenant's GPU quota) can take
            below = below[: self.pager.serviceable_prefix(below)]
        try:
            if len(below):
                self.pager.promote(below, target)
        finally:  # a refused call may still have moved pages
            self.pager.sync_table(self.page_table)
        return len(below)

    # ---- prefetch ----

    def prefetch(self, rows: Sequence[int] | None = None) -> dict[str, int]:
        """Bring the pages of `rows` (default: the bound batch slots) within the kernel's reach
        for their next step: disk pages are read into host slots (newest first; the call waits for
        the GPU work queued before it, which may still read those slots, then for the reads), and,
        without zero_copy, host pages
        are copied into free GPU frames on the pager's stream, newest first, evicting nothing
        (the current stream waits for the copies; the host does not). Returns the pages moved,
        {"disk_to_host": n, "host_to_gpu": m}. Raises PagerError when the host tier cannot take
        the disk pages."""
        self._check_open()
        rows = self.bound() if rows is None else [int(r) for r in rows]
        for row in rows:
            self._sequence(row)
        moved = {"disk_to_host": 0, "host_to_gpu": 0}
        if not rows:
            return moved
        try:
            on_disk = self._pages_where(rows, {Tier.DISK}) if self.disk_store is not None else ()
            if len(on_disk):
                self.pager.promote(on_disk, Tier.HOST)
                moved["disk_to_host"] = len(on_disk)
            if not (self.policy.zero_copy and self.host_pool is not None):
                on_host = self._pages_where(rows, {Tier.HOST})
                take = min(self.pager.serviceable_prefix(on_host), self.pager.free_frames())
                if take:
                    self.pager.promote(on_host[:take], Tier.GPU)
                    moved["host_to_gpu"] = take
        finally:
            self.pager.sync_table(self.page_table)
        self._counters["prefetched_pages"] += moved["disk_to_host"] + moved["host_to_gpu"]
        return moved

    def _pages_where(self, rows: list[int], tiers: set[Tier]) -> torch.Tensor:
        """The (row, page) pairs of `rows` whose PTE names one of `tiers`, newest pages first, as
        int64 [n, 2] (one read of the pager's mirror)."""
        mirror = self.pager.page_table()
        wanted = torch.tensor([int(t) for t in tiers], dtype=torch.int64)
        found = []
        for row in dict.fromkeys(rows):
            n = self.pager.num_pages(row)
            pages = torch.arange(n - 1, -1, -1, dtype=torch.int64)
            row_tiers = (mirror[row, :n].flip(0).to(torch.int64) & 0xFFFFFFFF) >> TIER_SHIFT
            pages = pages[torch.isin(row_tiers, wanted)]
            found.append(torch.stack([torch.full_like(pages, row), pages], 1))
        return torch.cat(found) if found else torch.empty(0, 2, dtype=torch.int64)

    # ---- tenants ----

    def set_quota(self, tenant: int, *, gpu=..., host=..., disk=...) -> None:
        """Cap what `tenant`'s pages may hold in each tier named: bytes or a string such as
        "2GiB" (floored to whole pages), or None to remove that tier's cap; tiers not named keep
        theirs. Past its quota a tenant evicts its own pages, never another's; see
        Pager.set_quota for the errors."""
        self._check_open()
        if isinstance(tenant, bool) or not isinstance(tenant, int) or tenant < 0:
            raise ValueError(f"Engine.set_quota: tenant must be an int >= 0, got {tenant!r}")
        for name, tier, value in (("gpu", Tier.GPU, gpu), ("host", Tier.HOST, host), ("disk", Tier.DISK, disk)):
            if value is ...:
                continue
            pages = None
            if value is not None:
                size = parse_bytes(value, f"Engine.set_quota {name}")
                pages = size // self.page_bytes
                if size and not pages:
                    raise ValueError(
                        f"Engine.set_quota: a {name} quota of {size} bytes is less than one page "
                        f"({self.page_bytes} bytes); give 0 for no pages, or at least one page"
                    )
            try:
                self.pager.set_quota(tenant, tier, pages)
            finally:
                self.pager.sync_table(self.page_table)

    def usage(self, tenant: int) -> dict[str, int]:
        """Pages of `tenant` held in each tier: {"gpu": frames, "host": slots, "disk": slots}."""
        self._check_open()
        return {name: self.pager.usage(tenant, tier)
                for name, tier in (("gpu", Tier.GPU), ("host", Tier.HOST), ("disk", Tier.DISK))}

    # ---- batch slots (the context switch) ----

    def bind(self, slot: int, row: int) -> None:
        """Put sequence `row` in batch slot `slot` (replacing what was there): the context
        switch. It writes the row into batch_rows[slot] and moves no KV byte, so its cost does not
        depend on the sequence's length; the first step after it reads the pages where they are
        (faulting what is out of reach). A sequence may sit in one slot at a time."""
        self._sequence(row)
        self._slot(slot)
        elsewhere = [s for s, r in self._bound.items() if r == row and s != slot]
        if elsewhere:
            raise ValueError(f"Engine.bind: sequence {row} is already bound to batch slot {elsewhere[0]}; "
                             f"unbind it there first")
        self._bound[slot] = row
        self.batch_rows[slot] = row

    def unbind(self, slot: int) -> int | None:
        """Empty batch slot `slot`; returns the row that was bound there (None if it was free).
        The sequence keeps its pages: bind it again to go on."""
        self._check_open()
        self._slot(slot)
        row = self._bound.pop(slot, None)
        if row is not None:
            self.batch_rows[slot] = -1
        return row

    def bound(self) -> list[int]:
        """The rows in the filled batch slots, in slot order: the `rows` of a step over the batch."""
        self._check_open()
        return [self._bound[s] for s in sorted(self._bound)]

    def _slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_batch:
            raise ValueError(f"Engine: batch slot must be an int in [0, {self.max_batch}), got {slot!r}")
        return slot

    def _sealed_count(self, row: int) -> int:
        """How many of the sequence's pages are sealed: a prefix, since the open pages (still
        being written) are a suffix."""
        n = self.pager.num_pages(row)
        while n > 0 and not self.pager.page_info(row, n - 1)["sealed"]:
            n -= 1
        return n

    def drop_unfinished(self, row: int) -> int:
        """Take back a step that some layers of the sequence wrote and others did not (a forward
        that failed part-way): every layer goes back to the tokens all of them hold, and the
        pages reserved for the dropped tokens are given back. Returns how many tokens were
        dropped; 0, changing nothing, when every layer holds the same tokens (pages reserved
        ahead of them, as SlotDecoder.reserve makes, are kept then)."""
        seq = self._sequence(row)
        keep = min(seq.written)
        if all(w == keep for w in seq.written):
            return 0
        dropped = seq.reserved - keep
        # The page holding the last kept token stays: it is open, and the next append writes on.
        extra = self.pager.num_pages(row) - -(-keep // self.page_size)
        try:
            if extra > 0:
                self.pager.drop_open_pages(row, extra)
        finally:
            self.pager.sync_table(self.page_table)
        seq.reserved = keep
        seq.written = [keep] * self.num_layers
        return dropped

    def num_tokens(self, row: int, layer: int | None = None) -> int:
        """Tokens written to every layer of the sequence (or to `layer`)."""
        seq = self._sequence(row)
        return min(seq.written) if layer is None else seq.written[self._layer(layer)]

    def reserve(self, row: int, num_tokens: int) -> None:
        """Allocate pages for the next `num_tokens` tokens of the sequence. Every layer must have
        written the tokens reserved before (append reserves by itself when they have)."""
        seq = self._sequence(row)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"Engine.reserve: num_tokens must be an int >= 0, got {num_tokens!r}")
        behind = [layer for layer, n in enumerate(seq.written) if n != seq.reserved]
        if behind:
            raise ValueError(
                f"Engine.reserve: sequence {row} has {seq.reserved} tokens reserved but layer(s) "
                f"{behind} have written only {[seq.written[layer] for layer in behind]}; write every "
                f"layer of the reserved tokens before reserving more"
            )
        target = seq.reserved + num_tokens
        if target > self.max_pages * self.page_size:
            raise ValueError(
                f"Engine.reserve: sequence {row} would hold {target} tokens, more than max_pages * "
                f"page_size = {self.max_pages * self.page_size}"
            )
        have = self.pager.num_pages(row)
        need = -(-target // self.page_size)
        if need > have:
            # A partly written last page stays open: every layer still writes the rest of it.
            # A failed append adds no page, but a store error may come after some evictions,
            # so the table is synced either way.
            try:
                self.pager.append_pages(row, need - have, seal_open=False)
            finally:
                self.pager.sync_table(self.page_table)
        seq.reserved = target
        self._release_if_done(row, seq)

    def append(self, row: int, key: torch.Tensor, value: torch.Tensor, layer: int) -> None:
        """Write K and V ([T, H, D] each, the engine's dtype and device) of the sequence's next T
        tokens into `layer`. Reserves pages for them when every layer has written the tokens
        reserved before."""
        seq = self._sequence(row)
        layer = self._layer(layer)
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Engine.append: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 3 or tuple(t.shape[1:]) != (self.num_kv_heads, self.head_dim):
                raise ValueError(
                    f"Engine.append: {name} must be [T, {self.num_kv_heads}, {self.head_dim}], got {tuple(t.shape)}"
                )
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(
                    f"Engine.append: {name} must be {self.dtype} on {self.device}, got {t.dtype} on {t.device}"
                )
        if key.shape != value.shape:
            raise ValueError(f"Engine.append: key {tuple(key.shape)} and value {tuple(value.shape)} differ")
        n = key.shape[0]
        start = seq.written[layer]
        if start + n > seq.reserved:
            if start == seq.reserved and all(w == seq.reserved for w in seq.written):
                self.reserve(row, n)
            else:
                raise ValueError(
                    f"Engine.append: layer {layer} of sequence {row} would write tokens {start}..{start + n - 1} "
                    f"but only {seq.reserved} are reserved and other layers have not written them all "
                    f"(written per layer: {seq.written}); write the same tokens to every layer of a step"
                )
        if n:
            positions = self._counting(start + n)[start:]
            if n == 1:
                sequences = self._counting(row + 1)[row:]
            else:
                sequences = torch.full((n,), row, dtype=torch.int32, device=self.device)
            ops.append_kv(key, value, self.pool, self.page_table, sequences, positions, layer)
        seq.written[layer] = start + n
        if layer == 0:
            self._counters["tokens_appended"] += n
        self._release_if_done(row, seq)

    def _counting(self, end: int) -> torch.Tensor:
        """0 .. end - 1 as int32 on the device, sliced from one kept tensor: a decode step's
        positions and row index then launch no kernel of their own."""
        if self._count_up is None or len(self._count_up) < end:
            size = max(end, 2 * (0 if self._count_up is None else len(self._count_up)), 1024)
            self._count_up = torch.arange(size, dtype=torch.int32, device=self.device)
        return self._count_up[:end]

    def _release_if_done(self, row: int, seq: _Sequence) -> None:
        if not all(w == seq.reserved for w in seq.written):
            return
        # Every layer is written: the full pages will not change again. Sealing them now (the
        # partly written last page stays open) lets them be evicted, and under write_through
        # copies them to the host with every layer's tokens. A no-op for pages already sealed.
        full = seq.reserved // self.page_size
        if full:
            try:
                self.pager.seal(row, full - 1)
            finally:
                # A write-through may push another page's host copy to disk and reuse its slot.
                self.pager.sync_table(self.page_table)

    # ---- attention ----

    def attention(
        self,
        query: torch.Tensor,
        rows: Sequence[int] | torch.Tensor | None,
        query_starts: Sequence[int] | torch.Tensor,
        layer: int,
        *,
        scale: float | None = None,
        window: int = 0,
        sinks: int = 0,
        return_lse: bool = False,
    ):
        """Exact attention of a batch of query chunks over every token written at `layer`.

        Entry b has the queries query[query_starts[b]:query_starts[b + 1]] ([N, Hq, D] in all),
        which are the newest tokens of sequence rows[b] (append them first). rows=None means the
        rows bound to the batch slots, in slot order (bound()). Pages off the GPU
        fault and are serviced (or raise FaultError under fault_mode "forbid"); see
        paged_kv.attention for the masking. Returns output [N, Hq, D] and, with return_lse, the
        float32 LSE [N, Hq].

        Under torch.compile the step is one operator, torch.ops.paged_kv.engine_attention (see
        paged_kv.engine_op), which model code may also call directly and torch.compile keeps
        whole; eagerly the same body runs without the operator's dispatch.
        """
        self._check_open()
        if rows is None:
            rows = self.bound()
            if not rows:
                raise ValueError("Engine.attention: rows=None reads the bound batch slots, but none is bound")
        rows = _index_list("Engine.attention: rows", rows)
        starts = _index_list("Engine.attention: query_starts", query_starts)
        if torch.compiler.is_compiling():
            # Checked while tracing too, so that a bad layer fails there and not in the graph's run.
            layer = self._layer(layer)
            out, lse = torch.ops.paged_kv.engine_attention(
                query, self.pool, self.page_table, self.op_id, rows, starts, layer, scale, window, sinks)
        else:
            # Eagerly the operator's body runs directly: the custom op's dispatch layers cost
            # more host time than the rest of a decode step's host work. It checks the layer.
            out, lse = self._attend(query, rows, starts, layer, scale, window, sinks)
        return (out, lse) if return_lse else out

    def _attend(self, query, rows: list[int], starts: list[int], layer: int, scale, window: int,
                sinks: int):
        """The body of paged_kv::engine_attention: checks, the kernel, the fault service."""
        self._check_open()
        layer = self._layer(layer)
        if len(starts) != len(rows) + 1 or not rows:
            raise ValueError(
                f"Engine.attention: query_starts needs len(rows) + 1 = {len(rows) + 1} entries and rows "
                f"at least one, got {len(starts)} and {len(rows)}"
            )
        if not isinstance(query, torch.Tensor) or query.dtype != self.dtype or query.device != self.device:
            raise ValueError(
                f"Engine.attention: query must be {self.dtype} on {self.device}, got "
                f"{getattr(query, 'dtype', type(query).__name__)} on {getattr(query, 'device', '-')}"
            )
        kv_lens = [self._sequence(r).written[layer] for r in rows]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        for b, (q, kv) in enumerate(zip(lengths, kv_lens)):
            if q > kv:
                raise ValueError(
                    f"Engine.attention: entry {b} (sequence {rows[b]}) has {q} queries but only {kv} "
                    f"tokens written at layer {layer}; append the new tokens' K/V first"
                )
        self._counters["attention_calls"] += 1
        self._tick += 1
        dev = self.device
        # One copy for the three index arrays, from pinned memory: a copy from pageable memory
        # would wait for the kernels queued before it, serialising this host work with them.
        packed = torch.tensor(rows + starts + kv_lens, dtype=torch.int32)
        if dev.type == "cuda":
            packed = packed.pin_memory().to(dev, non_blocking=True)
        sequences_t, starts_t, kv_lens_t = packed.split([len(rows), len(starts), len(kv_lens)])
        max_query_len = max(max(lengths), 1)
        pages_per_entry = [-(-kv // self.page_size) for kv in kv_lens]
        capacity = sum(pages_per_entry) + 1

        def run(table, host_pool, queue):
            return ops.attention(
                query, self.pool, table, sequences_t, starts_t, kv_lens_t, layer, max_query_len,
                scale=scale, window=window, sinks=sinks, host_pool=host_pool,
                fault_queue=queue[0] if queue else None, fault_count=queue[1] if queue else None,
                telemetry=self._telemetry, return_lse=True,
            )

        zero_copy = self.policy.zero_copy and self.host_pool is not None
        host_pool = self.host_pool if zero_copy else None
        # The mirror says on the host whether any page is out of reach; only then is the fault
        # count read, so the common case never synchronises.
        if self.pager.prefixes_reachable(rows, pages_per_entry, zero_copy):
            out, lse = run(self.page_table, host_pool, None)
        else:
            queue = ops.new_fault_queue(capacity, dev)
            out, lse = run(self.page_table, host_pool, queue)
            faults = ops.read_faults(*queue).to(torch.int64)
            if len(faults):
                self._counters["faults_seen"] += len(faults)
                if self.policy.fault_mode == "forbid":
                    shown = ", ".join(f"(row {r}, page {p})" for r, p in faults[:16].tolist())
                    more = f" and {len(faults) - 16} more" if len(faults) > 16 else ""
                    raise FaultError(
                        f"Engine.attention: {len(faults)} page(s) not readable at layer {layer} with "
                        f"Policy.fault_mode='forbid': {shown}{more}; keep them in the GPU frames "
                        f"(or host slots with zero_copy) before the step, or use fault_mode='service'"
                    )
                out, lse = self._service(faults, out, lse, run, capacity, host_pool)
        self.pager.touch_prefixes(rows, pages_per_entry, self._tick)
        if layer == self.num_layers - 1:
            if self._telemetry is not None:
                self._record_attention(sorted(set(rows)))
            if self.policy.prefetch:
                try:
                    self.prefetch(rows)
                except PagerError:  # no room to prefetch: the next step faults instead
                    self._counters["prefetches_refused"] += 1
        return out, lse

    def _record_attention(self, rows: list[int]) -> None:
        """Takes the step's attention mass of `rows` out of the telemetry (cleared for the next
        step) and hands the previous step's to the pager: the pager ranks pages one step behind,
        and the copy of this step's, queued without waiting, has long finished by the next. In a
        call that serviced faults, each pass (the first over the reachable pages, then each
        batch) shares out the mass of its own pages only, so a page read in a pass over few
        pages weighs more than its true share of the step."""
        self.flush_telemetry()
        index = torch.tensor(rows, dtype=torch.int64, device=self._telemetry.device)
        mass = self._telemetry.index_select(0, index)
        self._telemetry.index_fill_(0, index, 0.0)
        event = None
        if self._telemetry_host is not None:
            mass = self._telemetry_host[: len(rows)].copy_(mass, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._telemetry_pending = (rows, [self.pager.num_pages(row) for row in rows], mass, event)

    def flush_telemetry(self) -> None:
        """Hand the last step's attention mass to the pager now (span replacement; otherwise a
        no-op). The engine does so itself at the end of the next step, or before freeing a
        sequence; call it to read Pager.attention_scores up to date."""
        if self._telemetry_pending is None:
            return
        rows, pages, mass, event = self._telemetry_pending
        self._telemetry_pending = None
        if event is not None:
            event.synchronize()
        for i, (row, count) in enumerate(zip(rows, pages)):
            if row in self._sequences:
                self.pager.record_attention(row, mass[i, :count])

    def _only(self, pages: torch.Tensor) -> torch.Tensor:
        """A page table mapping `pages` alone (as the device table does): the op reads them and
        faults (skips) the rest."""
        self.pager.sync_table(self.page_table)
        rows, cols = pages[:, 0].to(self.device), pages[:, 1].to(self.device)
        only = torch.full((self.max_sequences, self.max_pages), UNMAPPED, dtype=torch.int32, device=self.device)
        only[rows, cols] = self.page_table[rows, cols]
        return only

    def _service(self, faults, out, lse, run, capacity, host_pool):
        began = time.perf_counter()
        outs, lses = [out], [lse]
        try:
            if host_pool is not None:
                # Zero-copy: the faulted pages (on disk) are read into host slots and attended in
                # place there, taking no GPU frame; they keep those host copies, so the steps
                # after read them in place too. Without room in the host tier, they go the
                # frames' way below.
                try:
                    self.pager.promote(faults, Tier.HOST)
                except PagerError:
                    pass  # the host tier is full: the batches below bring them into frames
                else:
                    part, part_lse = run(self._only(faults), host_pool, ops.new_fault_queue(capacity, self.device))
                    outs.append(part)
                    lses.append(part_lse)
                    faults = faults[:0]
                    self._counters["fault_host_passes"] += 1
            while len(faults):
                limit = self.pager.serviceable_prefix(faults)
                if limit < 1:
                    raise RuntimeError(
                        f"Engine.attention: no GPU frame can be freed to service {len(faults)} faulted page(s): "
                        f"each frame (or each of the faulting tenant's GPU quota) holds an open or pinned "
                        f"page, or a page whose only copy must first be written back to the host tier, "
                        f"which has no room for it ({self.pager.free_host_slots()} of {self.num_host_slots} "
                        f"host slots free; a faulted page keeps its host copy while it is serviced). Raise "
                        f"Policy.gpu_budget, or host_budget (a spare host slot per GPU frame is enough), or "
                        f"the quota, or free sequences"
                    )
                batch, faults = faults[:limit], faults[limit:]
                self.pager.service(batch)
                self.pager.pin(batch)
                try:
                    part, part_lse = run(self._only(batch), None, ops.new_fault_queue(capacity, self.device))
                    outs.append(part)
                    lses.append(part_lse)
                    # No synchronisation: the pager's copies of the next batch wait on the device
                    # for this rerun, which still reads the frames they refill.
                finally:
                    self.pager.unpin(batch)
                self._counters["fault_batches"] += 1
            self._counters["fault_services"] += 1
        finally:
            self.pager.sync_table(self.page_table)
            self._counters["fault_service_seconds"] += time.perf_counter() - began
        return ops.merge_states(torch.stack(outs), torch.stack(lses))

    # ---- inspection, lifetime ----

    def stats(self) -> dict:
        """The pager's counters (Pager.stats) plus the engine's: attention_calls,
        tokens_appended, faults_seen (distinct faulted pages, summed over calls), fault_services
        (calls that serviced faults), fault_batches (batches made GPU-resident), fault_host_passes
        (zero-copy: faulted disk pages read into host slots and attended in place),
        fault_service_seconds, prefetched_pages,
        prefetches_refused (steps whose prefetch found the host tier full); and io_backend and
        io_backend_reason (the disk backend and why; None and "" without a disk tier)."""
        self._check_open()
        stats = dict(self.pager.stats())
        stats.update(self._counters)
        stats["io_backend"] = self.io_backend
        stats["io_backend_reason"] = self.io_backend_reason
        return stats

    def close(self) -> None:
        """Release the pager, the pools and the disk store; remove the temporary disk folder."""
        if self._closed:
            return
        self._closed = True
        engine_op.unregister(self.op_id)
        self._sequences.clear()
        self._bound.clear()
        # The store's file is deleted with the store; the pager holds a reference to it.
        self.pager = None
        self.disk_store = None
        self.pool = self.host_pool = self.page_table = self._telemetry = self.batch_rows = None
        self._telemetry_host = self._telemetry_pending = None
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- helpers ----

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Engine is closed")

    def _sequence(self, row) -> _Sequence:
        self._check_open()
        seq = self._sequences.get(row) if isinstance(row, int) and not isinstance(row, bool) else None
        if seq is None:
            raise ValueError(f"Engine: {row!r} is not a live sequence row (rows: {sorted(self._sequences)})")
        return seq

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"Engine: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer
