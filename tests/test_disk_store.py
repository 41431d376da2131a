"""The disk tier (paged_kv.store.DiskStore): round trips, tag and checksum verification, corrupted
files, injected I/O faults, bad arguments, batches, and the checksum's speed. CPU only."""

import os
import random
import threading
import time

import pytest
import torch

from paged_kv.store import DiskStore, SlotTag, StoreError, checksum64

DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64]
PAGE_BYTES = [8192, 5000]  # a multiple of 4096 (transfers straight from the tensor) and not
DIRECT_IO = [True, False]  # O_DIRECT where the file system allows it, and buffered I/O
HEADER_BYTES = 4096
SEEDS = [0, 1]


def make_store(folder, num_slots=8, page_bytes=8192, io_threads=4, direct_io=True):
    store = DiskStore(str(folder), num_slots, page_bytes, io_threads=io_threads, direct_io=direct_io)
    if not store.direct_io:
        assert store.direct_io_reason, "buffered I/O must say why"
    return store


def random_page(page_bytes, dtype, generator):
    """A page of `dtype` holding exactly page_bytes bytes of random bits."""
    raw = torch.randint(0, 256, (page_bytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype) if page_bytes % torch.empty((), dtype=dtype).element_size() == 0 else raw


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def same_bytes(a, b):
    return a.nbytes == b.nbytes and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_create_reports_its_geometry_and_io_mode(tmp_path):
    store = make_store(tmp_path, num_slots=5, page_bytes=5000, io_threads=3)
    assert (store.num_slots, store.page_bytes, store.slot_bytes, store.io_threads) == (5, 5000, 4096 + 8192, 3)
    assert os.path.dirname(store.path) == str(tmp_path)
    assert os.path.basename(store.path).startswith("paged_kv_slots.")
    assert os.path.getsize(store.path) == 5 * store.slot_bytes
    assert store.direct_io == (store.direct_io_reason == "")
    print(f"\nO_DIRECT in {tmp_path}: {store.direct_io} {store.direct_io_reason!r}")
    buffered = make_store(tmp_path, direct_io=False)
    assert not buffered.direct_io and "O_DIRECT was not asked for" in buffered.direct_io_reason


def test_file_is_deleted_with_the_store(tmp_path):
    store = make_store(tmp_path)
    path = store.path
    assert os.path.exists(path)
    del store
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("direct_io", DIRECT_IO)
@pytest.mark.parametrize("page_bytes", PAGE_BYTES)
@pytest.mark.parametrize("seed", SEEDS)
def test_round_trip_random_pages_in_random_slots(tmp_path, direct_io, page_bytes, seed):
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_slots = 16
    store = make_store(tmp_path, num_slots=num_slots, page_bytes=page_bytes, direct_io=direct_io)
    written = {}
    for i, slot in enumerate(rng.sample(range(num_slots), 10)):
        dtype = DTYPES[i % len(DTYPES)]
        page = random_page(page_bytes, dtype, generator)
        tag = (rng.randrange(-5, 5), rng.randrange(1 << 40), rng.randrange(1 << 20), rng.randrange(1 << 63))
        store.write_page(slot, tag, page)
        written[slot] = (tag, page)
    for slot, (tag, page) in written.items():
        out = torch.full_like(page, 0) if page.dtype == torch.uint8 else torch.empty_like(page)
        assert store.read_page(slot, tag, out) is out
        assert same_bytes(out, page)


def test_tag_forms_tuple_slottag_and_keywords(tmp_path):
    store = make_store(tmp_path)
    page = random_page(8192, torch.float32, torch.Generator().manual_seed(3))
    store.write_page(0, page, tenant=2, session=7, logical_page=11, generation=1)
    out = torch.empty_like(page)
    store.read_page(0, SlotTag(tenant=2, session=7, logical_page=11, generation=1), out)
    assert same_bytes(out, page)
    out.zero_()
    store.read_page(0, (2, 7, 11, 1), out)
    assert same_bytes(out, page)
    out.zero_()
    store.read_page(0, out, tenant=2, session=7, logical_page=11, generation=1)
    assert same_bytes(out, page)
    assert SlotTag(2, 7, 11, 1) == SlotTag((2, 7, 11, 1))
    assert repr(SlotTag(1, 2, 3, 4)) == "SlotTag(tenant=1, session=2, logical_page=3, generation=4)"
    with pytest.raises(ValueError, match="tuple of 3 items"):
        SlotTag((1, 2, 3))


def test_rewrite_with_a_new_generation(tmp_path):
    generator = torch.Generator().manual_seed(4)
    store = make_store(tmp_path)
    old, new = random_page(8192, torch.uint8, generator), random_page(8192, torch.uint8, generator)
    store.write_page(3, (1, 1, 5, 1), old)
    store.write_page(3, (1, 1, 5, 2), new)
    out = torch.empty_like(new)
    store.read_page(3, (1, 1, 5, 2), out)
    assert same_bytes(out, new)
    with pytest.raises(StoreError, match=r"generation \(slot holds 2, read expected 1\)"):
        store.read_page(3, (1, 1, 5, 1), out)


@pytest.mark.parametrize(
    "wrong, field",
    [
        ((9, 2, 3, 4), r"tenant \(slot holds 1, read expected 9\)"),
        ((1, 9, 3, 4), r"session \(slot holds 2, read expected 9\)"),
        ((1, 2, 9, 4), r"logical page \(slot holds 3, read expected 9\)"),
        ((1, 2, 3, 9), r"generation \(slot holds 4, read expected 9\)"),
    ],
)
def test_read_with_a_wrong_tag_names_the_mismatch(tmp_path, wrong, field):
    store = make_store(tmp_path)
    page = random_page(8192, torch.uint8, torch.Generator().manual_seed(5))
    store.write_page(6, (1, 2, 3, 4), page)
    out = torch.zeros_like(page)
    with pytest.raises(StoreError, match="tag mismatch: " + field) as error:
        store.read_page(6, wrong, out)
    assert "slot 6" in str(error.value) and store.path in str(error.value)
    assert not out.any(), "a page that fails verification must not be left in dst"


@pytest.mark.parametrize("direct_io", DIRECT_IO)
@pytest.mark.parametrize("page_bytes", PAGE_BYTES)
def test_flipped_payload_byte_fails_the_checksum(tmp_path, direct_io, page_bytes):
    store = make_store(tmp_path, page_bytes=page_bytes, direct_io=direct_io)
    generator = torch.Generator().manual_seed(6)
    pages = [random_page(page_bytes, torch.uint8, generator) for _ in range(3)]
    for slot, page in enumerate(pages):
        store.write_page(slot, (0, 0, slot, 1), page)
    for k in (0, 1, page_bytes // 2, page_bytes - 1):
        flip_byte(store.path, 1 * store.slot_bytes + HEADER_BYTES + k)
        out = torch.zeros(page_bytes, dtype=torch.uint8)
        with pytest.raises(StoreError, match="payload checksum mismatch.*corrupt") as error:
            store.read_page(1, (0, 0, 1, 1), out)
        assert "slot 1" in str(error.value)
        assert not out.any()
        flip_byte(store.path, 1 * store.slot_bytes + HEADER_BYTES + k)  # undo
    for slot, page in enumerate(pages):  # neighbours were never affected; the undone slot reads
        out = torch.empty_like(page)
        store.read_page(slot, (0, 0, slot, 1), out)
        assert same_bytes(out, page)


@pytest.mark.parametrize(
    "offset, message",
    [
        (0, "no slot header"),  # magic
        (9, "header checksum mismatch"),  # format version
        (17, "header checksum mismatch"),  # tenant
        (41, "header checksum mismatch"),  # generation
        (57, "header checksum mismatch"),  # payload checksum
        (66, "header checksum mismatch"),  # header checksum itself
        (2000, "header checksum mismatch"),  # padding
    ],
)
def test_corrupted_header_is_an_error(tmp_path, offset, message):
    store = make_store(tmp_path)
    page = random_page(8192, torch.uint8, torch.Generator().manual_seed(7))
    store.write_page(2, (1, 2, 3, 4), page)
    flip_byte(store.path, 2 * store.slot_bytes + offset)
    with pytest.raises(StoreError, match=message):
        store.read_page(2, (1, 2, 3, 4), torch.empty_like(page))


def test_never_written_slot_is_an_error(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(StoreError, match="slot 4 .* the slot was never written"):
        store.read_page(4, (0, 0, 0, 0), torch.empty(8192, dtype=torch.uint8))


@pytest.mark.parametrize("direct_io", DIRECT_IO)
def test_unaligned_source_and_destination(tmp_path, direct_io):
    generator = torch.Generator().manual_seed(8)
    for page_bytes in PAGE_BYTES:
        store = make_store(tmp_path, page_bytes=page_bytes, direct_io=direct_io)
        backing = torch.randint(0, 256, (page_bytes + 7,), dtype=torch.uint8, generator=generator)
        src = backing[3 : 3 + page_bytes]  # an odd offset: never 4096-aligned
        assert src.data_ptr() % 2 == 1
        store.write_page(5, (0, 1, 2, 3), src)
        out_backing = torch.zeros(page_bytes + 9, dtype=torch.uint8)
        dst = out_backing[5 : 5 + page_bytes]
        store.read_page(5, (0, 1, 2, 3), dst)
        assert same_bytes(dst, src)
        assert not out_backing[:5].any() and not out_backing[5 + page_bytes :].any()
        # Float views at an unaligned element offset too.
        floats = random_page(page_bytes + 4, torch.float32, generator)[1:] if page_bytes % 4 == 0 else None
        if floats is not None:
            store.write_page(6, (0, 1, 2, 4), floats)
            back = torch.empty(page_bytes // 4 + 1, dtype=torch.float32)[1:]
            store.read_page(6, (0, 1, 2, 4), back)
            assert same_bytes(back, floats)


def test_bad_arguments_raise_clear_errors(tmp_path):
    store = make_store(tmp_path)
    page = torch.zeros(8192, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"src must hold page_bytes = 8192 bytes, got shape \[8191\]"):
        store.write_page(0, (0, 0, 0, 0), page[:-1])
    with pytest.raises(ValueError, match="dst must be contiguous"):
        store.read_page(0, (0, 0, 0, 0), torch.zeros(2, 8192, dtype=torch.uint8)[:, 0:4096].t())
    with pytest.raises(ValueError, match="dst must hold page_bytes = 8192 bytes.*dtype Float, 16384 bytes"):
        store.read_page(0, (0, 0, 0, 0), torch.zeros(4096, dtype=torch.float32))
    with pytest.raises(StoreError, match=r"slot 8 is outside \[0, 8\)"):
        store.write_page(8, (0, 0, 0, 0), page)
    with pytest.raises(StoreError, match=r"slot -1 is outside \[0, 8\)"):
        store.read_page(-1, (0, 0, 0, 0), page)
    with pytest.raises(ValueError, match="unknown fault kind 'disk_on_fire'.*write_eio"):
        store.inject_fault("disk_on_fire")
    with pytest.raises(ValueError, match="nth must be >= 1"):
        store.inject_fault("read_eio", 0)
    with pytest.raises(TypeError):
        store.write_page(0, (0, 0, 0, 0), page.numpy())
    with pytest.raises(StoreError, match="num_slots must be >= 1"):
        DiskStore(str(tmp_path), 0, 8192)
    with pytest.raises(StoreError, match="io_threads must be in"):
        DiskStore(str(tmp_path), 1, 8192, io_threads=0)
    with pytest.raises(StoreError, match="does-not-exist is unusable: No such file or directory"):
        DiskStore(str(tmp_path / "does-not-exist"), 1, 8192)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be a CPU tensor"):
            store.write_page(0, (0, 0, 0, 0), page.cuda())


def test_no_room_at_create_names_the_bytes(tmp_path):
    slot_bytes = 1 << 20
    num_slots = 1 << 30  # 1 PiB
    with pytest.raises(StoreError) as error:
        DiskStore(str(tmp_path), num_slots, slot_bytes - HEADER_BYTES)
    text = str(error.value)
    assert "not enough room" in text and str(tmp_path) in text
    assert f"{num_slots * slot_bytes} bytes (1.00 PiB)" in text
    assert "free" in text
    assert os.listdir(tmp_path) == [], "a failed create must leave no file behind"


# Faults that make a write fail, and the text their error must carry.
WRITE_FAULTS = [
    ("write_eio", r"Input/output error \(EIO\) \[injected fault: write_eio\]"),
    ("write_enospc", r"No space left on device \(ENOSPC\) \[injected fault: write_enospc\]"),
    ("short_write", r"short write, the file accepted no more bytes \[injected fault: short_write\]"),
    ("alloc_fail", r"could not allocate a \d+-byte I/O buffer aligned to 4096 bytes: injected fault \(alloc_fail\)"),
]


@pytest.mark.parametrize("direct_io", DIRECT_IO)
@pytest.mark.parametrize("kind, message", WRITE_FAULTS)
def test_injected_write_fault_leaves_no_readable_page(tmp_path, direct_io, kind, message):
    generator = torch.Generator().manual_seed(9)
    store = make_store(tmp_path, direct_io=direct_io)
    pages = [random_page(8192, torch.uint8, generator) for _ in range(4)]
    for slot, page in enumerate(pages):
        store.write_page(slot, (0, 0, slot, 1), page)
    store.inject_fault(kind, nth=2)
    store.write_page(0, (0, 0, 0, 2), pages[0])  # the first matching write passes
    with pytest.raises(StoreError, match=message) as error:
        store.write_page(2, (0, 0, 2, 2), pages[3])  # a rewrite of a slot that held a page
    assert "write of slot 2" in str(error.value) and "holds no valid page" in str(error.value)
    assert store.faults_fired(kind) == 1
    out = torch.zeros(8192, dtype=torch.uint8)
    for tag in [(0, 0, 2, 2), (0, 0, 2, 1)]:  # neither the new page nor the old one
        with pytest.raises(StoreError, match="slot 2 .*its last write failed.*" + kind):
            store.read_page(2, tag, out)
        assert not out.any()
    for slot, generation in [(0, 2), (1, 1), (3, 1)]:  # other slots stay intact
        store.read_page(slot, (0, 0, slot, generation), out)
        assert same_bytes(out, pages[slot])
    # The fault fired once; the slot takes a page again.
    store.write_page(2, (0, 0, 2, 3), pages[2])
    store.read_page(2, (0, 0, 2, 3), out)
    assert same_bytes(out, pages[2])


def test_failed_write_clears_the_header_on_disk(tmp_path):
    store = make_store(tmp_path)
    page = random_page(8192, torch.uint8, torch.Generator().manual_seed(10))
    store.write_page(1, (0, 0, 1, 1), page)
    store.inject_fault("short_write")
    with pytest.raises(StoreError, match="short_write"):
        store.write_page(1, (0, 0, 1, 2), page)
    with open(store.path, "rb") as f:
        f.seek(1 * store.slot_bytes)
        assert f.read(8) != b"PKVSLOT1"


@pytest.mark.parametrize("direct_io", DIRECT_IO)
@pytest.mark.parametrize(
    "kind, message",
    [
        ("read_eio", r"Input/output error \(EIO\) \[injected fault: read_eio\]"),
        ("alloc_fail", r"injected fault \(alloc_fail\)"),
    ],
)
def test_injected_read_fault_is_an_error_and_the_page_survives(tmp_path, direct_io, kind, message):
    store = make_store(tmp_path, direct_io=direct_io)
    page = random_page(8192, torch.uint8, torch.Generator().manual_seed(11))
    store.write_page(7, (3, 3, 3, 3), page)
    store.inject_fault(kind)
    out = torch.zeros_like(page)
    with pytest.raises(StoreError, match="read of slot 7 .*" + message):
        store.read_page(7, (3, 3, 3, 3), out)
    assert not out.any()
    store.read_page(7, (3, 3, 3, 3), out)
    assert same_bytes(out, page)


@pytest.mark.parametrize("direct_io", DIRECT_IO)
@pytest.mark.parametrize("kind", ["write_eintr", "read_partial"])
def test_interrupted_and_partial_transfers_are_resumed(tmp_path, direct_io, kind):
    store = make_store(tmp_path, page_bytes=3 * 4096, direct_io=direct_io)
    page = random_page(3 * 4096, torch.uint8, torch.Generator().manual_seed(12))
    store.inject_fault(kind)
    store.write_page(0, (0, 0, 0, 0), page)
    out = torch.zeros_like(page)
    store.read_page(0, (0, 0, 0, 0), out)
    assert store.faults_fired(kind) == 1
    assert same_bytes(out, page)


def test_unarmed_and_cleared_faults_never_fire(tmp_path):
    store = make_store(tmp_path)
    page = torch.zeros(8192, dtype=torch.uint8)
    store.inject_fault("write_eio", nth=3)
    store.clear_faults()
    for _ in range(4):
        store.write_page(0, (0, 0, 0, 0), page)
    assert all(store.faults_fired(kind) == 0 for kind in DiskStore.FAULT_KINDS)


@pytest.mark.parametrize("io_threads", [1, 4])
def test_batched_writes_and_reads(tmp_path, io_threads):
    generator = torch.Generator().manual_seed(13)
    num_slots = 24
    store = make_store(tmp_path, num_slots=num_slots, page_bytes=5000, io_threads=io_threads)
    slots = random.Random(13).sample(range(num_slots), 20)
    pages = {s: random_page(5000, torch.uint8, generator) for s in slots}
    assert store.write_pages([(s, (1, 2, s, 9), pages[s]) for s in slots]) == []
    outs = {s: torch.zeros(5000, dtype=torch.uint8) for s in slots}
    assert store.read_pages([(s, SlotTag(1, 2, s, 9), outs[s]) for s in slots]) == []
    assert all(same_bytes(outs[s], pages[s]) for s in slots)

    # Failures are reported per request, with the slot; the other requests complete.
    store.inject_fault("write_eio", nth=5)
    failures = store.write_pages([(s, (1, 2, s, 10), pages[s]) for s in slots], check=False)
    assert len(failures) == 1
    index, slot, message = failures[0]
    assert slots[index] == slot and f"slot {slot}" in message and "write_eio" in message
    requests = [(s, (1, 2, s, 10), torch.zeros(5000, dtype=torch.uint8)) for s in slots]
    with pytest.raises(StoreError, match=rf"1 of 20 page reads failed: request {index} \(slot {slot}\):.*its last write failed"):
        store.read_pages(requests)
    for s, _, out in requests:  # every other request was served
        assert s == slot or same_bytes(out, pages[s])

    # A slot whose write failed is refused before any transfer, so it is no read for the fault
    # to count: the 2nd transfer of the batch fails with EIO, and every other slot is served.
    store.inject_fault("read_eio", nth=2)
    for _, _, out in requests:
        out.zero_()
    failures = store.read_pages(requests, check=False)
    assert len(failures) == 2 and store.faults_fired("read_eio") == 1
    by_slot = {f[1]: f[2] for f in failures}
    assert "its last write failed" in by_slot.pop(slot)
    (eio_slot, eio_message), = by_slot.items()
    assert f"slot {eio_slot}" in eio_message and "[injected fault: read_eio]" in eio_message
    for s, _, out in requests:
        assert same_bytes(out, pages[s]) if s not in (slot, eio_slot) else not out.any()

    with pytest.raises(StoreError, match="request 2 writes slot 4, as request 0 does"):
        store.write_pages([(4, (0, 0, 0, 0), pages[slots[0]]), (5, (0, 0, 0, 0), pages[slots[0]]), (4, (0, 0, 0, 0), pages[slots[0]])])
    with pytest.raises(StoreError, match=r"request 1 names slot 99, outside \[0, 24\)"):
        store.read_pages([(4, (0, 0, 0, 0), outs[slots[0]]), (99, (0, 0, 0, 0), outs[slots[0]])])
    with pytest.raises(TypeError, match=r"request 0 must be a \(slot, tag, src\) triple"):
        store.write_pages([(4, (0, 0, 0, 0))])
    with pytest.raises(ValueError, match="src of request 0 must hold page_bytes = 5000"):
        store.write_pages([(4, (0, 0, 0, 0), torch.zeros(3))])


def test_concurrent_calls_on_different_slots(tmp_path):
    num_threads, per_thread = 4, 6
    store = make_store(tmp_path, num_slots=num_threads * per_thread, page_bytes=3 * 4096 + 100)
    generator = torch.Generator().manual_seed(14)
    pages = [random_page(store.page_bytes, torch.uint8, generator) for _ in range(store.num_slots)]
    errors = []

    def worker(t):
        try:
            for round_ in range(3):
                for slot in range(t * per_thread, (t + 1) * per_thread):
                    store.write_page(slot, (t, 0, slot, round_), pages[slot])
                    out = torch.empty_like(pages[slot])
                    store.read_page(slot, (t, 0, slot, round_), out)
                    assert same_bytes(out, pages[slot])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize("page_bytes", PAGE_BYTES)
def test_buffered_fallback_when_open_refuses_o_direct(tmp_path, page_bytes):
    store = DiskStore(str(tmp_path), 4, page_bytes, faults=[("direct_io_refused", 1)])
    assert not store.direct_io and store.faults_fired("direct_io_refused") == 1
    assert "refuses O_DIRECT (open: Invalid argument (EINVAL) [injected fault: direct_io_refused]); buffered I/O" in store.direct_io_reason
    generator = torch.Generator().manual_seed(17)
    backing = torch.randint(0, 256, (page_bytes + 1,), dtype=torch.uint8, generator=generator)
    store.write_page(3, (1, 1, 1, 1), backing[1:])
    out = torch.empty(page_bytes + 3, dtype=torch.uint8)[3:]
    store.read_page(3, (1, 1, 1, 1), out)
    assert same_bytes(out, backing[1:])
    with pytest.raises(ValueError, match="unknown fault kind 'nope'"):
        DiskStore(str(tmp_path), 4, page_bytes, faults=[("nope", 1)])


def test_store_on_tmpfs():
    """/dev/shm is tmpfs, which refused O_DIRECT before Linux 6.6; either way the store works."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    store = make_store("/dev/shm", page_bytes=5000)
    page = random_page(5000, torch.uint8, torch.Generator().manual_seed(15))
    store.write_page(1, (0, 0, 0, 0), page)
    out = torch.empty_like(page)
    store.read_page(1, (0, 0, 0, 0), out)
    assert same_bytes(out, page)
    if not store.direct_io:
        assert "refuses O_DIRECT" in store.direct_io_reason
    print(f"\n/dev/shm: direct_io={store.direct_io} {store.direct_io_reason!r}")


def test_checksum_properties():
    generator = torch.Generator().manual_seed(16)
    for size in [0, 1, 7, 8, 9, 63, 64, 65, 100, 4096, 12345]:
        data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
        base = checksum64(data)
        assert checksum64(data.clone()) == base
        assert checksum64(data, seed=1) != base
        if size:
            assert checksum64(data[:-1]) != base
            for k in {0, size // 2, size - 1}:
                for bit in (0, 7):
                    flipped = data.clone()
                    flipped[k] ^= 1 << bit
                    assert checksum64(flipped) != base
    zeros = torch.zeros(64, dtype=torch.uint8)
    assert checksum64(zeros[:63]) != checksum64(zeros)  # the length counts, not only the bytes
    words = torch.arange(16, dtype=torch.int64)
    swapped = words.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checksum64(words) != checksum64(swapped)


def test_checksum_speed():
    data = torch.full((128 << 20,), 0xA5, dtype=torch.uint8)  # the speed does not depend on the bytes
    copy = torch.empty_like(data)
    checksum64(data)  # warm-up
    best_checksum = best_copy = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        checksum64(data)
        best_checksum = min(best_checksum, time.perf_counter() - start)
        start = time.perf_counter()
        copy.copy_(data)
        best_copy = min(best_copy, time.perf_counter() - start)
    gbps = data.nbytes / best_checksum / 1e9
    copy_gbps = data.nbytes / best_copy / 1e9
    print(f"\nchecksum64: {gbps:.2f} GB/s single core (memory copy in the same run: {copy_gbps:.2f} GB/s)")
    assert gbps > 1.0


# ---- the header alone (reads that bypass the host, such as cuFile's) ----

def test_read_header_returns_the_payload_checksum(tmp_path):
    store = make_store(tmp_path, num_slots=4, page_bytes=5000)
    page = random_page(5000, torch.uint8, torch.Generator().manual_seed(0))
    assert not store.slot_in_use(2)
    store.write_page(2, (1, 2, 3, 4), page)
    assert store.slot_in_use(2) and not store.slot_in_use(1)
    assert store.read_header(2, (1, 2, 3, 4)) == checksum64(page)
    assert store.payload_offset(2) == 2 * store.slot_bytes + HEADER_BYTES
    assert store.file_descriptor >= 0


def test_read_header_errors_match_read_page(tmp_path):
    store = make_store(tmp_path, num_slots=4)
    page = random_page(8192, torch.uint8, torch.Generator().manual_seed(1))
    with pytest.raises(StoreError, match="slot 0 .*never written"):
        store.read_header(0, (0, 0, 0, 0))
    store.write_page(0, (0, 1, 2, 3), page)
    with pytest.raises(StoreError, match="tag mismatch: session"):
        store.read_header(0, (0, 9, 2, 3))
    with pytest.raises(StoreError, match="outside"):
        store.read_header(4, (0, 1, 2, 3))
    store.inject_fault("read_eio")
    with pytest.raises(StoreError, match="EIO"):
        store.read_header(0, (0, 1, 2, 3))
    flip_byte(store.path, 30)  # inside the header's fields
    with pytest.raises(StoreError, match="header checksum mismatch"):
        store.read_header(0, (0, 1, 2, 3))
