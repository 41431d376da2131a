"""The disk tier: one preallocated file of page slots, each with a verified header.

    store = DiskStore(folder, num_slots, page_bytes, io_threads=4, direct_io=True)
    store.write_page(slot, (tenant, session, logical_page, generation), page)
    store.read_page(slot, (tenant, session, logical_page, generation), out)

A slot is a 4096-byte header (magic "PKVSLOT1", format version, the tag, payload size, payload
checksum, header checksum) followed by the page, padded to 4096 bytes. The file
`<folder>/paged_kv_slots.XXXXXX` is created and preallocated in full by the constructor and
deleted with the store. I/O uses O_DIRECT where the file system allows it; elsewhere (tmpfs, for
one) it is buffered, `direct_io` is False and `direct_io_reason` says why.

Pages cross as contiguous CPU tensors (pinned or not) of exactly `page_bytes` bytes, of any
dtype; memory not aligned to 4096 bytes goes through an aligned bounce buffer. A tag is a
`SlotTag` or a `(tenant, session, logical_page, generation)` tuple; `write_page` and
`read_page` also take it as keyword arguments: `write_page(slot, page, tenant=..., session=...,
logical_page=..., generation=...)`.

Every failure raises `StoreError` (a RuntimeError) naming the slot, the file and the cause:
a tag that differs from the one written (naming the field), a checksum mismatch, a slot never
written or whose last write failed, an I/O error with its errno text. A read never reports
success with wrong bytes. `write_pages` and `read_pages` run batches of `(slot, tag, tensor)`
requests `io_threads` at a time and report every failed request with its slot.

Reads that bypass the host (cuFile straight into GPU frames, see Policy.io_backend) use
`read_header(slot, tag)`, which checks the slot and its header alone and returns the payload
checksum to verify the bytes against, with `file_descriptor` and `payload_offset(slot)`.

For tests, `inject_fault(kind, nth=1)` makes the nth matching page operation fail as `kind`
says (one of `DiskStore.FAULT_KINDS`). `checksum64(tensor)` is the checksum the headers use.
"""

from __future__ import annotations

from paged_kv._library import _C, require_library

__all__ = ["DiskStore", "SlotTag", "StoreError", "checksum64"]

if _C is not None:
    DiskStore = _C.DiskStore
    SlotTag = _C.SlotTag
    StoreError = _C.StoreError
    checksum64 = _C.checksum64
else:  # the compiled library is missing: importing works, using the store says why

    class StoreError(RuntimeError):
        """Raised by the disk store (the compiled library is missing here)."""

    def _missing(*args, **kwargs):
        require_library()

    DiskStore = SlotTag = checksum64 = _missing
