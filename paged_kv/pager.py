"""The pager: demand paging of KV pages between GPU frames, host slots and disk slots.

A thin wrapper of the compiled paged_kv._C.Pager (csrc/engine/). Sequences are page-table rows.
Pages are appended at a sequence's end; the newest pages are *open* (being written: GPU-resident,
never evicted) until seal() seals them, or the next append_pages() does (its default; with
seal_open=False they stay open beside the new pages). Sealed pages never change, so each is
written to a lower tier at most once: a page evicted with a valid lower copy just gives up its
frame, and its PTE names that copy.

The pager keeps a host mirror of the page table (int32 [max_sequences, max_pages], PTE encoding
of paged_kv.pte) and the rows that changed; sync_table() copies those rows into the device page
table that paged_kv.attention reads.

Pages are given as an int32/int64 tensor [n, 2] of (row, page), such as paged_kv.ops.read_faults
returns, or as a list of (row, page) pairs.

Errors: ValueError for a bad argument (unknown row, page past a sequence's end, an open page
demoted); PagerError (a RuntimeError) when the tiers cannot satisfy a request (every frame
pinned or open, or every tier full); PagerInternalError when the pager's own bookkeeping is
inconsistent (a bug, never expected).
"""

from __future__ import annotations

from typing import Iterable, Tuple, Union

import torch

from paged_kv import _library
from paged_kv.pte import Tier

if _library._C is not None:
    PagerError = _library._C.PagerError
    PagerInternalError = _library._C.PagerInternalError
else:  # the library is missing; Pager() raises the reason

    class PagerError(RuntimeError):
        pass

    class PagerInternalError(RuntimeError):
        pass


#: (row, page) pairs: an int32/int64 tensor [n, 2] or an iterable of pairs.
Pages = Union[torch.Tensor, Iterable[Tuple[int, int]]]

#: Bytes of a page's PageMeta (besides its 8 bytes of attention scores, about 24 bytes per
#: frame or slot and 4 per PTE; bytes_of_metadata() counts them all).
METADATA_BYTES_PER_PAGE = 32


def _pages(pages) -> torch.Tensor:
    if isinstance(pages, torch.Tensor):
        return pages
    pairs = [(int(row), int(page)) for row, page in pages]
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


class Pager:
    """Demand paging of one pool of GPU frames, with host slots and an optional disk store.

    Args:
        pool: the GPU frame pool [F, L, 2, H, P, D] (CUDA, or CPU for tests), contiguous.
        host_pool: the host slots [S, L, 2, H, P, D], CPU, the pool's dtype, pinned when the pool
            is on CUDA; None for no host tier.
        max_sequences, max_pages: the page table's shape (rows, pages per row).
        num_frames: frames the pager may use (default: all of the pool's).
        num_host_slots: host slots it may use (default: all of host_pool's).
        disk_store: a paged_kv disk store whose page size is one frame's bytes, or None.
        num_disk_slots: disk slots it may use (default: all of the store's).
        write_through: write each page to a host slot as soon as it is sealed, so that evicting
            it never waits for a write-back.
        bounce_through_host_slots: read disk pages into frames through host slots the pager
            lends for the call (the generic Mover path) rather than straight into the frames
            (CPU pool) or through the mover's own pinned staging buffer (CUDA pool). For tests.
        io_backend: how disk pages reach CUDA frames: "posix" (the default here: O_DIRECT reads
            into pinned memory, then a copy), "cufile" (GPUDirect Storage straight into the
            frames; raises StoreError naming the reason when cuFile is not usable) or "auto"
            (cuFile where a check on the store's own file finds it returns the right bytes at
            least as fast as POSIX, else POSIX). io_backend and io_backend_reason say what was
            chosen and why.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        host_pool: torch.Tensor | None = None,
        *,
        max_sequences: int,
        max_pages: int,
        num_frames: int | None = None,
        num_host_slots: int | None = None,
        disk_store=None,
        num_disk_slots: int | None = None,
        write_through: bool = False,
        bounce_through_host_slots: bool = False,
        io_backend: str = "posix",
    ):
        _library.require_library()
        if host_pool is None:
            host_pool = torch.empty((0, *pool.shape[1:]), dtype=pool.dtype)
        if num_frames is None:
            num_frames = pool.shape[0]
        if num_host_slots is None:
            num_host_slots = host_pool.shape[0]
        if num_disk_slots is None:
            num_disk_slots = disk_store.num_slots if disk_store is not None else 0
            num_disk_slots = num_disk_slots() if callable(num_disk_slots) else num_disk_slots
        self.pool = pool
        self.host_pool = host_pool
        self.disk_store = disk_store
        cufile_paths = []
        if disk_store is not None and io_backend != "posix":
            from paged_kv.info import cufile_wheel_paths

            cufile_paths = cufile_wheel_paths()
        self._pager = _library._C.Pager(
            num_frames, num_host_slots, num_disk_slots, max_sequences, max_pages, write_through,
            pool, host_pool, disk_store, bounce_through_host_slots, io_backend, cufile_paths,
        )

    # ---- sequences ----

    def add_sequence(self, tenant: int = 0, row: int | None = None) -> int:
        """Take a free page-table row (or `row`) for a new sequence of `tenant`; returns the row."""
        if isinstance(tenant, bool) or not isinstance(tenant, int) or not 0 <= tenant < 2**31:
            raise ValueError(f"Pager.add_sequence: tenant must be >= 0 and below 2**31 (an int), got {tenant!r}")
        return self._pager.add_sequence(tenant, -1 if row is None else row)

    def remove_sequence(self, row: int) -> None:
        """Free the row and every frame and slot of its pages; its PTEs become unmapped."""
        self._pager.remove_sequence(row)

    def fork(self, parent: int, row: int | None = None) -> int:
        """A new sequence (in `row`, or a free row: the lowest on a fresh pager, else the one freed
        most recently) of the parent's tenant holding the
        parent's pages: the sealed ones shared (no bytes copied; a shared page moves between
        tiers for every sequence holding it and lives while any does), the open ones copied
        into new frames. Returns the new row."""
        return self._pager.fork(parent, -1 if row is None else row)

    def append_pages(self, row: int, n: int = 1, *, seal_open: bool = True) -> int:
        """Append n open pages in GPU frames (evicting least recently used pages as needed) and
        return the first new page's index. Write the new pages (paged_kv.append_kv through a
        synced page table) before they are sealed: a sealed page may be evicted.

        With seal_open (the default) the sequence's open pages are sealed first, as by
        seal(row, num_pages(row) - 1). With seal_open=False they stay open (still writable, never
        evicted) beside the new ones, for a step whose tokens start inside a partly written page
        and spill into new pages; seal them with seal() once they are full and written.

        Raises PagerError, appending nothing, when the frames cannot be found (open and pinned
        pages hold theirs, or no tier below can take a page that must be written back); without
        seal_open the pager is then unchanged, with it the open pages may already be sealed."""
        if not isinstance(seal_open, bool):
            raise TypeError(
                f"Pager.append_pages: seal_open must be a bool, got {type(seal_open).__name__} {seal_open!r}"
            )
        return self._pager.append_pages(row, n, seal_open=seal_open)

    def drop_open_pages(self, row: int, n: int) -> None:
        """Take back the sequence's last n pages, which must be open and unpinned: pages
        appended for tokens that will not be written after all. Their frames are freed and their
        PTEs unmapped (sync the page table). Raises ValueError, changing nothing, otherwise."""
        self._pager.drop_open_pages(row, n)

    def seal(self, row: int, page: int) -> None:
        """Seal an open page and the open pages before it: they never change again and may now
        be evicted. With write_through, they are written to host slots at once. A no-op for a
        sealed page."""
        self._pager.seal(row, page)

    def is_live(self, row: int) -> bool:
        return self._pager.is_live(row)

    def num_pages(self, row: int) -> int:
        return self._pager.num_pages(row)

    def tenant(self, row: int) -> int:
        return self._pager.tenant(row)

    # ---- replacement ----

    def set_replacement(self, replacement: str, *, decay: float = 0.995, share: float = 0.3,
                        sink_pages: int = 1, window_pages: int = 4) -> None:
        """How the GPU tier picks victims: "lru" (least recently used first) or "span"
        (span-aware: pages ranked by their attention scores, see record_attention, least
        first, ties by recency; each sequence's first `sink_pages` and last `window_pages` pages
        are taken only when nothing else is left). The host and disk tiers stay LRU. ValueError
        for an unknown name, a decay outside [0, 1), a share that is not a finite number > 0 or
        a negative page count."""
        self._pager.set_replacement(replacement, decay, share, sink_pages, window_pages)

    @property
    def replacement(self) -> str:
        return self._pager.replacement()

    def record_attention(self, row: int, mass: torch.Tensor) -> None:
        """Count one step's attention mass of the row's pages 0 .. len(mass) - 1 (a 1-D CPU
        tensor, such as a row of the attention kernel's telemetry) into their scores. A page
        draws on the step when its mass is at least `share` (set_replacement) times its fair
        share, mass.sum() / len(mass); its score is the share of its steps it drew on, each
        step's weight decaying by `decay` per later step. The sink and window pages are not
        counted (they draw mass for where they sit), nor is a step whose mass is all zero. An
        evicted page keeps its score, so a page attention retrieves again is ranked by the
        history it earned."""
        self._pager.record_attention(row, mass)

    def attention_scores(self, row: int) -> torch.Tensor:
        """The attention scores of the row's pages, float32 [num_pages(row)] in [0, 1]: the
        decayed share of counted steps in which the page drew its share (0 before any)."""
        return self._pager.attention_scores(row)

    # ---- use, pins, residency ----

    def touch(self, pages: Pages, tick: int) -> None:
        """Record a use at `tick`: the pages become the most recently used in their tiers."""
        self._pager.touch(_pages(pages), tick)

    def touch_prefixes(self, rows: list[int], counts: list[int], tick: int) -> None:
        """touch() of pages 0 .. counts[i] - 1 of each rows[i] (the pages an attention call
        reads), without building the page list."""
        self._pager.touch_prefixes(rows, counts, tick)

    def prefixes_reachable(self, rows: list[int], counts: list[int], host_readable: bool) -> bool:
        """Whether pages 0 .. counts[i] - 1 of each rows[i] are all in GPU frames, or in host
        slots when `host_readable` (the attention kernel reads host memory in place)."""
        return self._pager.prefixes_reachable(rows, counts, host_readable)

    def pin(self, pages: Pages) -> None:
        """Keep pages in their current tier until unpinned (pins nest)."""
        self._pager.pin(_pages(pages))

    def unpin(self, pages: Pages) -> None:
        self._pager.unpin(_pages(pages))

    def service(self, pages: Pages) -> int:
        """Make every listed page GPU-resident (the fault path) and return how many were not.

        The pages are pinned for the call, so they never evict each other. Raises PagerError when
        more pages are missing than max_serviceable() or when no lower tier has room for a page
        that must be written back. On CUDA the copies from host slots into frames run on the
        pager's own stream and the current stream waits for them (no host synchronisation), so
        kernels queued next read the pages; pages read from disk, and write-backs into host
        slots, are waited for by the host (they are complete on return). Call sync_table() before
        the kernel reads the page table.
        """
        return self._pager.service(_pages(pages))

    def max_serviceable(self) -> int:
        """How many pages one service() call can make GPU-resident: free frames, frames of
        sealed unpinned pages that have a copy below, and as many of the other sealed unpinned
        pages as the host (and, through it, the disk) tier can take written back. Stream more
        faults than this in batches."""
        return self._pager.max_serviceable()

    def serviceable_prefix(self, pages: Pages) -> int:
        """How many of `pages`, from the front, one service() call can take: within
        max_serviceable() and within each tenant's GPU quota (its open and pinned frames
        counted). Stream the rest in later calls."""
        return self._pager.serviceable_prefix(_pages(pages))

    # ---- tenant quotas ----

    def set_quota(self, tenant: int, tier: Tier | int, pages: int | None) -> None:
        """At most `pages` frames (GPU), host slots (HOST) or disk slots (DISK) for the tenant's
        pages; None removes the quota. A move that would pass it first evicts the tenant's own
        pages from that tier; when they cannot leave (open, pinned, no room below) it raises
        PagerError and nothing of the tenant's moves. A quota below the tenant's use evicts down
        to it at once (raising, with the old quota kept, when it cannot)."""
        self._pager.set_quota(tenant, int(tier), -1 if pages is None else pages)

    def quota(self, tenant: int, tier: Tier | int) -> int | None:
        pages = self._pager.quota(tenant, int(tier))
        return None if pages < 0 else pages

    def usage(self, tenant: int, tier: Tier | int) -> int:
        """Frames (GPU) or slots (HOST, DISK) the tenant's pages hold now."""
        return self._pager.usage(tenant, int(tier))

    def promote(self, pages: Pages, tier: Tier | int) -> None:
        """Move pages up to `tier` (GPU or HOST); pages already there or higher stay."""
        self._pager.promote(_pages(pages), int(tier))

    def demote(self, pages: Pages, tier: Tier | int) -> None:
        """Move sealed, unpinned pages down to `tier` (HOST or DISK); pages already there or lower
        stay. A page with a valid copy there is not written again."""
        self._pager.demote(_pages(pages), int(tier))

    # ---- page table ----

    def page_table(self) -> torch.Tensor:
        """A copy of the page-table mirror, int32 [max_sequences, max_pages] on the CPU."""
        return self._pager.page_table()

    def pte(self, row: int, page: int) -> int:
        return self._pager.pte(row, page)

    def sync_table(self, page_table: torch.Tensor, all_rows: bool = False) -> int:
        """Copy the rows whose PTEs changed since the last sync (or every row) into `page_table`
        (int32 [max_sequences, max_pages], any device); returns how many rows were copied. It
        consumes the dirty rows, as take_dirty_rows() does."""
        return self._pager.sync_table(page_table, all_rows)

    def take_dirty_rows(self) -> list[int]:
        """The rows whose PTEs changed since the last call (or sync_table), sorted."""
        return self._pager.take_dirty_rows()

    # ---- inspection ----

    def page_info(self, row: int, page: int) -> dict:
        """The page's metadata: tier, pte, frame, host_slot, disk_slot (-1 when none), sealed,
        host_valid, disk_valid, pins, tenant, last_use, generation, sharers (how many sequences
        hold it: more than 1 for a page shared by forks, whose copies these are), disk_tag (the
        (tenant, sequence, page, generation) its disk copy carries: the sequence and page that
        first held it)."""
        return self._pager.page_info(row, page)

    @property
    def io_backend(self) -> str | None:
        """How disk pages reach the frames: "posix" or "cufile"; None without a disk store."""
        return self._pager.io_backend or None

    @property
    def io_backend_reason(self) -> str:
        """Why io_backend was chosen (cuFile's load error, the speeds measured, ...)."""
        return self._pager.io_backend_reason

    def stats(self) -> dict:
        """Counters: service_calls, faults_serviced, pages_moved and bytes_moved per direction
        (gpu_to_host, host_to_gpu, host_to_disk, disk_to_host, disk_to_gpu), evictions per tier,
        evictions_without_write, write_throughs, write_throughs_deferred (sealed pages the host tier
        had no room for under write-through: written back when evicted instead), frames_zeroed
        (frames cleared before a page of another
        tenant was appended into them), service_seconds."""
        return self._pager.stats()

    def reset_stats(self) -> None:
        self._pager.reset_stats()

    def free_frames(self) -> int:
        return self._pager.free_frames()

    def free_host_slots(self) -> int:
        return self._pager.free_host_slots()

    def free_disk_slots(self) -> int:
        return self._pager.free_disk_slots()

    def lru_order(self, tier: Tier | int) -> list[int]:
        """The evictable frames (GPU) or slots (HOST, DISK), least recently used first."""
        return self._pager.lru_order(int(tier))

    def check_invariants(self) -> None:
        """Raise PagerInternalError if any bookkeeping is inconsistent (for tests)."""
        self._pager.check_invariants()

    def bytes_of_metadata(self) -> int:
        """Bytes of every structure the pager keeps: page metadata, allocators, LRU links and
        the page-table mirror."""
        return self._pager.bytes_of_metadata()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (one frame of the pool)."""
        return self._pager.page_bytes

    @property
    def config(self) -> dict:
        return self._pager.config
