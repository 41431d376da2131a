"""The pager on CPU pools: frames for new pages, LRU eviction with write-back to the host,
written back at most once, write-through, touch, pins, promote and demote, removal, the page-table
mirror and its dirty rows, clear errors, and the metadata footprint."""

import pytest
import torch

import paged_kv
import paged_kv.store
from paged_kv import Tier
from paged_kv.pager import METADATA_BYTES_PER_PAGE, PagerError
from paged_kv.store import StoreError
from pager_helpers import (append_written, frame_words, make_pager, new_tag, pattern, read_any_copy,
                           sealed_sequence, tier, write_page)

GPU, HOST, DISK = Tier.GPU, Tier.HOST, Tier.DISK


def assert_content(pager, tags, pages=None):
    """Service each listed page (default: all in `tags`) and compare its frame with its pattern."""
    for row, page in pages if pages is not None else sorted(tags):
        pager.service([(row, page)])
        assert torch.equal(frame_words(pager, row, page), pattern(pager, tags[(row, page)])), (row, page)
    pager.check_invariants()


def test_append_maps_open_pages_to_frames():
    pager = make_pager(frames=4)
    row = pager.add_sequence(tenant=3)
    assert pager.append_pages(row, 3) == 0
    table = pager.page_table()
    frames = [paged_kv.pte.pte_index(int(table[row, p])) for p in range(3)]
    assert sorted(frames) == sorted(set(frames)) and all(0 <= f < 4 for f in frames)
    for page in range(3):
        info = pager.page_info(row, page)
        assert info["tier"] == GPU and info["pte"] == int(table[row, page]) and not info["sealed"]
        assert info["tenant"] == 3 and info["host_slot"] == -1 and info["disk_slot"] == -1
    assert (table[row, 3:] == paged_kv.UNMAPPED).all() and (table[1:] == paged_kv.UNMAPPED).all()
    assert pager.append_pages(row, 1) == 3  # seals the three open pages
    assert [pager.page_info(row, p)["sealed"] for p in range(4)] == [True, True, True, False]
    assert pager.free_frames() == 0 and pager.num_pages(row) == 4
    pager.check_invariants()


def test_append_without_sealing_keeps_the_open_pages_writable():
    pager = make_pager(frames=4, host=4)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 1, tags)
    assert append_written(pager, row, 2, tags, seal_open=False) == 1
    # Page 0 stays open beside the new pages: still in its frame, writable, never evicted.
    assert [pager.page_info(row, p)["sealed"] for p in range(3)] == [False] * 3
    assert pager.lru_order(GPU) == [] and pager.free_frames() == 1
    pager.check_invariants()
    tags[(row, 0)] = new_tag()
    write_page(pager, row, 0, tags[(row, 0)])  # the rest of page 0, written after the append
    assert append_written(pager, row, 0, tags, seal_open=False) == 3  # nothing to append
    pager.seal(row, 1)  # seals pages 0 and 1; page 2 stays open
    assert [pager.page_info(row, p)["sealed"] for p in range(3)] == [True, True, False]
    assert pager.lru_order(GPU) == [pager.page_info(row, p)["frame"] for p in (0, 1)]
    assert pager.stats()["pages_moved"]["gpu_to_host"] == 0
    append_written(pager, row, 2, tags, seal_open=False)  # evicts page 0, the least recent
    assert [tier(pager, row, p) for p in range(5)] == [HOST, GPU, GPU, GPU, GPU]
    assert [pager.page_info(row, p)["sealed"] for p in range(5)] == [True, True, False, False, False]
    pager.seal(row, 4)
    assert_content(pager, tags)


def test_drop_open_pages_gives_their_frames_back():
    pager = make_pager(frames=4, host=4)
    tags = {}
    row = sealed_sequence(pager, 2, tags)
    pager.append_pages(row, 2, seal_open=False)  # pages 2 and 3, for tokens that never come
    assert pager.free_frames() == 0
    with pytest.raises(ValueError, match="page 1 is sealed"):
        pager.drop_open_pages(row, 3)
    with pytest.raises(ValueError, match="n must be between 0 and the number of pages"):
        pager.drop_open_pages(row, 5)
    assert pager.num_pages(row) == 4  # refused: nothing changed
    pager.drop_open_pages(row, 2)
    assert pager.num_pages(row) == 2 and pager.free_frames() == 2
    assert (pager.page_table()[row, 2:] == paged_kv.UNMAPPED).all()
    pager.drop_open_pages(row, 0)
    pager.check_invariants()
    assert_content(pager, tags)
    assert pager.append_pages(row, 1) == 2  # the row grows from where it was


def test_write_through_copies_a_page_left_open_only_when_sealed():
    pager = make_pager(frames=3, host=4, write_through=True)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags, seal_open=False)
    info = pager.page_info(row, 0)
    assert not info["sealed"] and not info["host_valid"] and pager.stats()["write_throughs"] == 0
    tags[(row, 0)] = new_tag()
    write_page(pager, row, 0, tags[(row, 0)])  # the last writes to page 0 come after the append
    pager.seal(row, 0)
    info = pager.page_info(row, 0)
    assert info["sealed"] and info["host_valid"] and pager.stats()["write_throughs"] == 1
    # The host copy is the page as it was when sealed, not as it was when page 1 was appended.
    assert torch.equal(pager.host_pool.view(torch.int32)[info["host_slot"]], pattern(pager, tags[(row, 0)]))
    assert not pager.page_info(row, 1)["sealed"] and not pager.page_info(row, 1)["host_valid"]
    append_written(pager, row, 1, tags)  # the default seals page 1 (written through) first
    assert pager.page_info(row, 1)["host_valid"] and pager.stats()["write_throughs"] == 2
    append_written(pager, row, 1, tags)  # seals page 2 (written through), evicts page 0 without a write
    assert tier(pager, row, 0) == HOST and pager.stats()["pages_moved"]["gpu_to_host"] == 3
    assert pager.stats()["evictions_without_write"] == 1
    assert_content(pager, tags)


def test_append_without_sealing_needs_frames_beside_the_open_pages():
    pager = make_pager(frames=3, host=4)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 2, tags)
    pager.take_dirty_rows()
    # Both open pages keep their frames, so two new pages do not fit; nothing changes.
    with pytest.raises(PagerError, match="append_pages of 2 pages to sequence 0 needs 2 GPU frames, "
                                         "but only 1 are free and 0 can be evicted"):
        pager.append_pages(row, 2, seal_open=False)
    assert pager.num_pages(row) == 2 and pager.free_frames() == 1 and pager.take_dirty_rows() == []
    assert not pager.page_info(row, 0)["sealed"] and not pager.page_info(row, 1)["sealed"]
    pager.check_invariants()
    # Sealing them first frees a frame to evict.
    assert append_written(pager, row, 2, tags) == 2
    assert [tier(pager, row, p) for p in range(4)] == [HOST, GPU, GPU, GPU]
    assert_content(pager, tags, pages=[(row, 0)])
    pager.seal(row, 3)
    assert_content(pager, tags)


def test_append_pages_checks_its_arguments():
    pager = make_pager(frames=2, host=2, max_sequences=2, max_pages=4)
    row = pager.add_sequence()
    pager.append_pages(row, 1)
    for bad in (None, 0, 1, "no"):
        with pytest.raises(TypeError, match="seal_open must be a bool"):
            pager.append_pages(row, 1, seal_open=bad)
    with pytest.raises(TypeError):
        pager.append_pages(row, 1, False)  # keyword only
    with pytest.raises(ValueError, match="cannot append -1 pages to sequence 0"):
        pager.append_pages(row, -1, seal_open=False)
    with pytest.raises(ValueError, match="cannot append 4 pages to sequence 0, which has 1 of at most 4"):
        pager.append_pages(row, 4, seal_open=False)
    with pytest.raises(ValueError, match="row 1 holds no sequence"):
        pager.append_pages(1, 1, seal_open=False)
    assert pager.num_pages(row) == 1 and not pager.page_info(row, 0)["sealed"]
    pager.check_invariants()


def test_lru_eviction_writes_back_to_host_and_keeps_content():
    pager = make_pager(frames=3, host=8)
    tags = {}
    row = pager.add_sequence()
    for _ in range(6):
        append_written(pager, row, 1, tags)
        pager.check_invariants()
    # The three oldest pages went to host slots, oldest first; the newest three hold the frames.
    assert [tier(pager, row, p) for p in range(6)] == [HOST] * 3 + [GPU] * 3
    stats = pager.stats()
    assert stats["pages_moved"]["gpu_to_host"] == 3 and stats["evictions"]["gpu"] == 3
    assert stats["bytes_moved"]["gpu_to_host"] == 3 * pager.page_bytes
    for page in range(3):
        slot = pager.page_info(row, page)["host_slot"]
        assert torch.equal(pager.host_pool.view(torch.int32)[slot], pattern(pager, tags[(row, page)]))
    assert_content(pager, tags)


def test_sealed_page_is_written_back_at_most_once():
    pager = make_pager(frames=2, host=4)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)  # evicts page 0: written to the host once
    assert pager.stats()["pages_moved"]["gpu_to_host"] == 1
    for _ in range(4):  # bring page 0 back and push it out again, several times
        pager.seal(row, 2)
        assert pager.service([(row, 0)]) == 1
        assert tier(pager, row, 0) == GPU and pager.page_info(row, 0)["host_valid"]
        pager.service([(row, 1)])
        pager.service([(row, 2)])
        pager.check_invariants()
    stats = pager.stats()
    # Pages 0, 1 and 2 were each written once, however often they moved.
    assert stats["pages_moved"]["gpu_to_host"] == 3
    assert stats["evictions_without_write"] > 0
    assert_content(pager, tags)


def test_write_through_writes_at_seal_and_eviction_is_free():
    pager = make_pager(frames=2, host=4, write_through=True)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 1, tags)
    assert pager.stats()["pages_moved"]["gpu_to_host"] == 0  # open: not written yet
    pager.seal(row, 0)
    info = pager.page_info(row, 0)
    assert info["tier"] == GPU and info["host_valid"] and pager.stats()["write_throughs"] == 1
    slot = info["host_slot"]
    assert torch.equal(pager.host_pool.view(torch.int32)[slot], pattern(pager, tags[(row, 0)]))
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)  # seals page 1 (written through), evicts page 0
    stats = pager.stats()
    assert tier(pager, row, 0) == HOST
    assert stats["write_throughs"] == 2 and stats["pages_moved"]["gpu_to_host"] == 2
    assert stats["evictions_without_write"] == 1
    assert_content(pager, tags)


def test_touch_picks_the_least_recently_used_victim():
    pager = make_pager(frames=3, host=4)
    tags = {}
    row = sealed_sequence(pager, 3, tags)
    pager.touch([(row, 0)], tick=10)
    assert pager.page_info(row, 0)["last_use"] == 10
    assert pager.lru_order(GPU) == [pager.page_info(row, p)["frame"] for p in (1, 2, 0)]
    append_written(pager, row, 1, tags)
    assert [tier(pager, row, p) for p in range(4)] == [GPU, HOST, GPU, GPU]
    assert_content(pager, tags)


def test_prefix_reach_and_touch():
    """prefixes_reachable reads the tiers of pages 0 .. n - 1 of each row (host pages count only
    when the kernel reads host memory); touch_prefixes touches those pages as touch() would."""
    pager = make_pager(frames=4, host=4)
    tags = {}
    a, b = pager.add_sequence(), pager.add_sequence()
    append_written(pager, a, 3, tags)
    pager.seal(a, 2)
    append_written(pager, b, 1, tags)
    assert pager.prefixes_reachable([a, b], [3, 1], host_readable=False)
    pager.demote([(a, 1)], HOST)
    assert pager.prefixes_reachable([a], [1], host_readable=False)  # page 1 is not read
    assert not pager.prefixes_reachable([b, a], [1, 2], host_readable=False)
    assert pager.prefixes_reachable([b, a], [1, 2], host_readable=True)
    assert pager.prefixes_reachable([a], [0], host_readable=False)
    with pytest.raises(Exception, match="prefixes_reachable"):
        pager.prefixes_reachable([a], [4], host_readable=True)  # past the sequence's pages
    with pytest.raises(Exception, match="page counts"):
        pager.prefixes_reachable([a, b], [1], host_readable=True)
    pager.touch_prefixes([a, a], [1, 1], tick=7)
    assert pager.page_info(a, 0)["last_use"] == 7 and pager.page_info(a, 2)["last_use"] != 7
    assert pager.lru_order(GPU)[-1] == pager.page_info(a, 0)["frame"]
    assert_content(pager, tags)


def test_pinned_page_is_never_evicted():
    pager = make_pager(frames=2, host=4)
    tags = {}
    row = sealed_sequence(pager, 2, tags)
    pager.pin([(row, 0)])
    append_written(pager, row, 1, tags)
    assert tier(pager, row, 0) == GPU and tier(pager, row, 1) == HOST
    assert pager.max_serviceable() == 0  # one frame pinned, one open
    with pytest.raises(PagerError, match="hold open or pinned pages"):
        pager.service([(row, 1)])
    pager.check_invariants()
    pager.unpin([(row, 0)])
    assert pager.max_serviceable() == 1
    pager.service([(row, 1)])
    assert tier(pager, row, 0) == HOST
    assert_content(pager, tags)


def test_service_streams_batches_of_max_serviceable():
    pager = make_pager(frames=4, host=16)
    tags = {}
    row = pager.add_sequence()
    for _ in range(12):  # one page at a time: each append seals the last, the frames turn over
        append_written(pager, row, 1, tags)
    pager.seal(row, 11)
    faults = [(row, p) for p in range(12) if tier(pager, row, p) != GPU]
    assert len(faults) == 8 and pager.max_serviceable() == 4
    with pytest.raises(PagerError, match="max_serviceable"):
        pager.service(faults)
    pager.check_invariants()
    seen = 0
    while faults:
        batch, faults = faults[: pager.max_serviceable()], faults[pager.max_serviceable():]
        assert pager.service(batch) == len(batch)
        for row_, page in batch:
            assert torch.equal(frame_words(pager, row_, page), pattern(pager, tags[(row_, page)]))
        seen += len(batch)
        pager.check_invariants()
    assert seen == 8 and pager.stats()["faults_serviced"] == 8
    assert pager.stats()["service_seconds"] > 0


def test_service_counts_only_missing_pages_and_accepts_tensors_and_duplicates():
    pager = make_pager(frames=2, host=4)
    tags = {}
    row = pager.add_sequence()
    for _ in range(3):
        append_written(pager, row, 1, tags)
    pager.seal(row, 2)
    pages = torch.tensor([[row, 0], [row, 2], [row, 0]], dtype=torch.int32)
    missing = sum(tier(pager, row, p) != GPU for p in (0, 2))
    assert pager.service(pages) == missing
    assert tier(pager, row, 0) == GPU and tier(pager, row, 2) == GPU
    assert pager.service(pages) == 0
    pager.check_invariants()


def test_demote_and_promote_between_gpu_and_host():
    pager = make_pager(frames=4, host=4)
    tags = {}
    row = sealed_sequence(pager, 3, tags)
    pager.demote([(row, 0), (row, 1)], HOST)
    assert [tier(pager, row, p) for p in range(3)] == [HOST, HOST, GPU]
    assert pager.free_frames() == 3
    pager.demote([(row, 0)], HOST)  # already there: nothing moves
    assert pager.stats()["pages_moved"]["gpu_to_host"] == 2
    pager.promote([(row, 0)], GPU)
    assert tier(pager, row, 0) == GPU and pager.page_info(row, 0)["host_valid"]
    pager.demote([(row, 0)], HOST)  # its host copy is valid: no second write
    assert pager.stats()["pages_moved"]["gpu_to_host"] == 2
    pager.promote([(row, 0), (row, 1), (row, 2)], HOST)  # at or above the host: nothing moves
    assert [tier(pager, row, p) for p in range(3)] == [HOST, HOST, GPU]
    assert_content(pager, tags)


def test_remove_sequence_frees_everything():
    pager = make_pager(frames=3, host=4, max_sequences=3)
    tags = {}
    a = pager.add_sequence(tenant=1)
    b = pager.add_sequence(tenant=2)
    append_written(pager, a, 2, tags)
    append_written(pager, b, 1, tags)
    pager.seal(a, 1)
    append_written(pager, b, 1, tags)  # evicts a's page 0 to the host
    pager.take_dirty_rows()
    pager.remove_sequence(a)
    pager.check_invariants()
    assert pager.take_dirty_rows() == [a]
    assert (pager.page_table()[a] == paged_kv.UNMAPPED).all()
    assert not pager.is_live(a) and pager.free_host_slots() == 4 and pager.free_frames() == 1
    with pytest.raises(ValueError, match="holds no sequence"):
        pager.num_pages(a)
    pager.remove_sequence(b)
    assert pager.free_frames() == 3 and pager.free_host_slots() == 4
    assert (pager.page_table() == paged_kv.UNMAPPED).all()
    assert pager.add_sequence(tenant=5, row=a) == a and pager.tenant(a) == 5
    assert pager.num_pages(a) == 0
    pager.check_invariants()


def test_page_table_mirror_and_sync_table():
    pager = make_pager(frames=2, host=4, max_sequences=3)
    device_table = paged_kv.new_page_table(3, 32)
    tags = {}
    r0 = pager.add_sequence()
    r1 = pager.add_sequence()
    append_written(pager, r0, 1, tags)
    pager.seal(r0, 0)
    assert pager.sync_table(device_table) == 1  # only row r0 changed
    append_written(pager, r1, 1, tags)
    append_written(pager, r1, 1, tags)  # evicts r0's page
    assert pager.take_dirty_rows() == [r0, r1]
    assert pager.take_dirty_rows() == []
    pager.service([(r0, 0)])
    assert pager.sync_table(device_table) == 2
    assert torch.equal(device_table, pager.page_table())
    assert pager.sync_table(device_table) == 0
    fresh = paged_kv.new_page_table(3, 32)
    assert pager.sync_table(fresh, all_rows=True) == 3 and torch.equal(fresh, pager.page_table())
    for row, page in [(r0, 0), (r1, 0), (r1, 1)]:
        assert pager.pte(row, page) == int(fresh[row, page])
    with pytest.raises(RuntimeError, match=r"must be \[3, 32\]"):
        pager.sync_table(paged_kv.new_page_table(2, 32))
    with pytest.raises(RuntimeError, match="int32"):
        pager.sync_table(torch.zeros(3, 32, dtype=torch.int64))


def test_remove_and_reuse_keeps_other_pages_intact():
    pager = make_pager(frames=3, host=6, max_sequences=4)
    tags = {}
    rows = [pager.add_sequence(tenant=t) for t in range(3)]
    for _ in range(3):
        for row in rows:
            append_written(pager, row, 1, tags)
    for row in rows:
        pager.seal(row, 2)
    pager.remove_sequence(rows[1])
    tags = {k: v for k, v in tags.items() if k[0] != rows[1]}
    again = pager.add_sequence(tenant=7)
    assert again == rows[1]
    append_written(pager, again, 2, tags)
    pager.seal(again, 1)
    assert_content(pager, tags)


# ---- the disk tier ----


def test_demote_to_disk_and_back_writes_each_tier_once(tmp_path):
    pager = make_pager(frames=4, host=4, disk=8, folder=tmp_path)
    tags = {}
    row = pager.add_sequence(tenant=2)
    append_written(pager, row, 3, tags)
    pager.seal(row, 2)
    pager.demote([(row, 0), (row, 1)], DISK)
    assert [tier(pager, row, p) for p in range(3)] == [DISK, DISK, GPU]
    assert pager.free_host_slots() == 4 and pager.free_frames() == 3
    for page in (0, 1):  # the disk slots hold the pages under their tags
        assert torch.equal(read_any_copy(pager, row, page), pattern(pager, tags[(row, page)]))
    moved = pager.stats()["pages_moved"]
    assert moved["gpu_to_host"] == 2 and moved["host_to_disk"] == 2
    pager.promote([(row, 0)], HOST)
    assert tier(pager, row, 0) == HOST and pager.page_info(row, 0)["disk_valid"]
    pager.promote([(row, 0), (row, 1)], GPU)
    assert tier(pager, row, 1) == GPU and pager.page_info(row, 1)["disk_valid"]
    pager.demote([(row, 0), (row, 1), (row, 2)], DISK)  # only page 2 is written
    moved = pager.stats()["pages_moved"]
    assert moved["disk_to_host"] == 1 and moved["disk_to_gpu"] == 1
    assert moved["gpu_to_host"] == 3 and moved["host_to_disk"] == 3
    assert [tier(pager, row, p) for p in range(3)] == [DISK, DISK, DISK]
    assert_content(pager, tags)


def test_pressure_flows_gpu_to_host_to_disk(tmp_path):
    pager = make_pager(frames=2, host=2, disk=16, folder=tmp_path, max_sequences=2)
    tags = {}
    rows = [pager.add_sequence(tenant=t) for t in (0, 1)]
    for _ in range(5):
        for row in rows:
            append_written(pager, row, 1, tags)
            pager.check_invariants()
    for row in rows:
        pager.seal(row, 4)
    tiers = [tier(pager, r, p) for r in rows for p in range(5)]
    assert tiers.count(GPU) == 2 and tiers.count(HOST) == 2 and tiers.count(DISK) == 6
    for row, page in tags:
        assert torch.equal(read_any_copy(pager, row, page), pattern(pager, tags[(row, page)]))
    stats = pager.stats()
    assert stats["evictions"]["host"] == stats["pages_moved"]["host_to_disk"] == 6
    # Every page comes back through the one frame pair, disk pages bounced through the host.
    assert_content(pager, tags)
    stats = pager.stats()
    assert stats["pages_moved"]["disk_to_gpu"] >= 6
    # With room on disk no copy is ever dropped, so each of the 10 pages reached it at most once.
    assert stats["pages_moved"]["host_to_disk"] <= 10 and stats["evictions"]["disk"] == 0
    assert stats["bytes_moved"]["disk_to_gpu"] == stats["pages_moved"]["disk_to_gpu"] * pager.page_bytes


def test_full_disk_drops_copies_of_pages_resident_higher_up(tmp_path):
    pager = make_pager(frames=2, host=2, disk=2, folder=tmp_path)
    tags = {}
    row = pager.add_sequence()
    for _ in range(4):
        append_written(pager, row, 1, tags)
    pager.seal(row, 3)
    pager.demote([(row, 0), (row, 1)], DISK)  # the disk is now full
    pager.promote([(row, 0)], HOST)  # page 0's disk copy becomes droppable
    pager.demote([(row, 2)], DISK)  # needs a disk slot: page 0's copy goes
    assert pager.stats()["evictions"]["disk"] == 1
    assert not pager.page_info(row, 0)["disk_valid"] and tier(pager, row, 0) == HOST
    assert tier(pager, row, 2) == DISK
    assert_content(pager, tags)


def test_disk_read_failure_leaves_the_page_on_disk(tmp_path):
    pager = make_pager(frames=2, host=2, disk=4, folder=tmp_path)
    tags = {}
    row = sealed_sequence(pager, 2, tags)
    pager.demote([(row, 0)], DISK)
    pager.disk_store.inject_fault("read_eio")
    with pytest.raises(StoreError, match="reading pages from disk failed"):
        pager.service([(row, 0)])
    pager.check_invariants()
    info = pager.page_info(row, 0)
    assert info["tier"] == DISK and info["pins"] == 0
    assert pager.free_frames() == 1 and pager.free_host_slots() == 2
    assert pager.service([(row, 0)]) == 1  # the fault fired once
    assert_content(pager, tags)


def test_disk_write_failure_leaves_the_page_on_the_host(tmp_path):
    pager = make_pager(frames=2, host=1, disk=4, folder=tmp_path)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)  # page 0 -> the host slot
    pager.disk_store.inject_fault("write_eio")
    with pytest.raises(StoreError, match="writing pages back to disk failed"):
        append_written(pager, row, 1, tags)  # page 0 must go to disk to make room for page 1
    pager.check_invariants()
    assert tier(pager, row, 0) == HOST and not pager.page_info(row, 0)["disk_valid"]
    assert pager.free_disk_slots() == 4 and pager.num_pages(row) == 3
    append_written(pager, row, 1, tags)
    assert tier(pager, row, 0) == DISK
    assert_content(pager, tags)


def test_disk_tier_full_is_a_clear_error(tmp_path):
    pager = make_pager(frames=2, host=1, disk=1, folder=tmp_path)
    tags = {}
    row = pager.add_sequence()
    for _ in range(4):
        append_written(pager, row, 1, tags)  # 2 on the GPU, 1 on the host, 1 on disk
    with pytest.raises(PagerError, match=r"all tiers are full.*disk slots: 1 of 1 in use"):
        append_written(pager, row, 1, tags)
    pager.check_invariants()
    assert pager.num_pages(row) == 4


# ---- errors ----


def test_bad_rows_and_pages_are_clear_errors():
    pager = make_pager(frames=2, host=2, max_sequences=2, max_pages=4)
    row = pager.add_sequence()
    pager.append_pages(row, 2)
    with pytest.raises(ValueError, match="row 5 is outside the page table's 2 rows"):
        pager.append_pages(5, 1)
    with pytest.raises(ValueError, match="row 1 holds no sequence"):
        pager.service([(1, 0)])
    with pytest.raises(ValueError, match="page 2 of sequence 0 does not exist"):
        pager.service([(row, 2)])
    with pytest.raises(ValueError, match="page -1 of sequence 0 does not exist"):
        pager.touch([(row, -1)], 1)
    with pytest.raises(ValueError, match="already holds a sequence"):
        pager.add_sequence(row=row)
    with pytest.raises(ValueError, match="cannot append 3 pages to sequence 0, which has 2 of at most 4"):
        pager.append_pages(row, 3)
    with pytest.raises(ValueError, match="tenant must be >= 0"):
        pager.add_sequence(tenant=-1)
    for tenant in (2**40, "x", True):
        with pytest.raises(ValueError, match=r"tenant must be >= 0 and below 2\*\*31 \(an int\)"):
            pager.add_sequence(tenant=tenant)
    with pytest.raises(ValueError, match="open"):
        pager.demote([(row, 1)], HOST)
    pager.seal(row, 0)
    pager.pin([(row, 0)])
    with pytest.raises(ValueError, match="pinned"):
        pager.demote([(row, 0)], HOST)
    pager.unpin([(row, 0)])
    with pytest.raises(ValueError, match="not pinned|pinned 0 times"):
        pager.unpin([(row, 0)])
    with pytest.raises(ValueError, match="the tier must be the GPU or the host"):
        pager.promote([(row, 0)], DISK)
    with pytest.raises(ValueError, match="the tier must be the host or the disk"):
        pager.demote([(row, 0)], GPU)
    with pytest.raises(ValueError, match="no disk slots"):
        pager.demote([(row, 0)], DISK)
    with pytest.raises(RuntimeError, match=r"pages must be \[n, 2\]"):
        pager.service(torch.zeros(3, dtype=torch.int64))
    pager.remove_sequence(row)
    with pytest.raises(ValueError, match="holds no sequence"):
        pager.remove_sequence(row)
    pager.add_sequence()
    pager.add_sequence()
    with pytest.raises(PagerError, match="all 2 page-table rows hold sequences"):
        pager.add_sequence()
    pager.check_invariants()


def test_bad_configurations(tmp_path):
    pool = paged_kv.new_pool(2, 1, 1, 16, 8, torch.float32)
    host = paged_kv.new_pool(2, 1, 1, 16, 8, torch.float32)
    no_host = paged_kv.Pager(pool, None, max_sequences=1, max_pages=2)
    row = no_host.add_sequence()
    no_host.append_pages(row, 1)
    no_host.seal(row, 0)
    with pytest.raises(ValueError, match="no host slots"):
        no_host.demote([(row, 0)], HOST)
    with pytest.raises(ValueError, match="write_through writes sealed pages to host slots"):
        paged_kv.Pager(pool, None, max_sequences=1, max_pages=1, write_through=True)
    with pytest.raises(ValueError, match="max_pages must be in"):
        paged_kv.Pager(pool, host, max_sequences=1, max_pages=0)
    with pytest.raises(ValueError, match="num_frames must be in"):
        paged_kv.Pager(pool, host, max_sequences=1, max_pages=1, num_frames=0)
    with pytest.raises(RuntimeError, match="num_frames 3 exceeds the pool's 2 frames"):
        paged_kv.Pager(pool, host, max_sequences=1, max_pages=1, num_frames=3)
    with pytest.raises(ValueError, match="a disk tier needs at least one host slot"):
        store = paged_kv.store.DiskStore(str(tmp_path), 2, pool[0].numel() * 4)
        paged_kv.Pager(pool, None, disk_store=store, max_sequences=1, max_pages=1)
    with pytest.raises(RuntimeError, match="disk store holds pages of 100 bytes"):
        paged_kv.Pager(pool, host, disk_store=paged_kv.store.DiskStore(str(tmp_path), 2, 100),
                       max_sequences=1, max_pages=1)
    with pytest.raises(RuntimeError, match="num_disk_slots 2 needs a disk store"):
        paged_kv.Pager(pool, host, max_sequences=1, max_pages=1, num_disk_slots=2)
    with pytest.raises(RuntimeError, match="host_pool's dtype"):
        paged_kv.Pager(pool, host.half(), max_sequences=1, max_pages=1)
    with pytest.raises(RuntimeError, match=r"host_pool must be \[S, L, 2, H, P, D\]"):
        paged_kv.Pager(pool, paged_kv.new_pool(2, 1, 2, 16, 8, torch.float32), max_sequences=1, max_pages=1)


def test_all_tiers_full_names_the_tiers():
    pager = make_pager(frames=2, host=1)
    tags = {}
    row = pager.add_sequence()
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)
    append_written(pager, row, 1, tags)  # page 0 -> the only host slot
    with pytest.raises(PagerError, match=r"all tiers are full.*GPU frames: 2 of 2.*host slots: 1 of 1.*disk slots: 0 of 0"):
        append_written(pager, row, 1, tags)  # page 1 has nowhere to go
    pager.check_invariants()
    # Nothing was lost: the failed append changed no page's residency but sealing page 2.
    assert [tier(pager, row, p) for p in range(3)] == [HOST, GPU, GPU]
    assert pager.num_pages(row) == 3
    pager.remove_sequence(row)
    pager.check_invariants()


def test_append_beyond_frames_of_open_pages_fails_before_sealing():
    pager = make_pager(frames=3, host=4)
    row = pager.add_sequence()
    pager.append_pages(row, 2)
    pager.pin([(row, 0)])
    with pytest.raises(PagerError, match="append_pages of 3 pages to sequence 0 needs 3 GPU frames"):
        pager.append_pages(row, 3)
    assert not pager.page_info(row, 1)["sealed"]
    pager.check_invariants()


# ---- footprint ----


def test_metadata_bytes_per_page():
    assert METADATA_BYTES_PER_PAGE == 32 == paged_kv.pager._library._C.Pager.metadata_bytes_per_page
    pager = make_pager(frames=8, host=8, max_sequences=2, max_pages=64)
    row = pager.add_sequence()
    pager.append_pages(row, 8)
    before = pager.bytes_of_metadata()
    pager.append_pages(row, 8)  # evicts eight pages to the host, grows the row's metadata
    grown = pager.bytes_of_metadata() - before
    assert 0 < grown <= 8 * 32 * 2  # the page vector at most doubles its capacity


def test_metadata_is_under_a_thousandth_of_the_kv_it_manages():
    """Pages of 1 MiB (4 layers, 2 KV heads, 256 tokens, head_dim 128, float16): the pager's
    whole footprint, page-table mirror included, is far below 0.1% of the KV bytes."""
    pool = paged_kv.new_pool(8, 4, 2, 256, 128, torch.float16)
    host = paged_kv.new_pool(24, 4, 2, 256, 128, torch.float16)
    pager = paged_kv.Pager(pool, host, max_sequences=8, max_pages=64)
    assert pager.page_bytes == 1 << 20
    for _ in range(4):
        row = pager.add_sequence()
        pager.append_pages(row, 8)
        pager.seal(row, 7)
    managed = 32 * pager.page_bytes
    assert pager.bytes_of_metadata() < managed / 1000
    pager.check_invariants()
