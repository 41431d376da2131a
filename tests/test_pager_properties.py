"""Property tests of the pager: random sequences of operations on small CPU pools, with every
page's content checked bit for bit, and the allocator and LRU list against plain models."""

from __future__ import annotations

import collections
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import paged_kv
from paged_kv import Tier
from paged_kv.pager import PagerError, PagerInternalError
from pager_helpers import append_written, make_pager, new_tag, pattern, read_any_copy, write_page

_C = paged_kv._library._C

MAX_SEQUENCES, MAX_PAGES = 3, 8


class PagerMachine(RuleBasedStateMachine):
    """Drives one pager through random calls. `tags` maps every live page to the pattern
    written into it; a page that ever reads back different bytes was lost or corrupted."""

    @initialize(frames=st.integers(2, 5), host=st.integers(0, 6), disk=st.sampled_from([0, 0, 2, 4, 8]),
                write_through=st.booleans(), bounce=st.booleans())
    def start(self, frames, host, disk, write_through, bounce):
        if disk:
            host = max(host, 1)  # pages reach the disk through the host
            self.folder = tempfile.mkdtemp(prefix="paged_kv_pager_test.")
        self.pager = make_pager(frames=frames, host=host, disk=disk, folder=getattr(self, "folder", None),
                                max_sequences=MAX_SEQUENCES, max_pages=MAX_PAGES,
                                write_through=write_through and host > 0, bounce_through_host_slots=bounce)
        self.tags = {}
        self.tick = 0

    # ---- helpers ----

    def live_rows(self):
        return [r for r in range(MAX_SEQUENCES) if self.pager.is_live(r)]

    def live_pages(self):
        return sorted(self.tags)

    def pick(self, data, items, max_size=None):
        if not items:
            return []
        return data.draw(st.lists(st.sampled_from(items), max_size=max_size or len(items)))

    def expected(self, row, page):
        return pattern(self.pager, self.tags[(row, page)])

    def check_copy(self, row, page):
        """Compare the copy the page's PTE names (GPU frame, host slot or disk slot)."""
        words = read_any_copy(self.pager, row, page)
        assert torch.equal(words, self.expected(row, page)), (row, page, self.pager.page_info(row, page))

    # ---- rules ----

    @rule(tenant=st.integers(0, 3))
    def add_sequence(self, tenant):
        if len(self.live_rows()) < MAX_SEQUENCES:
            row = self.pager.add_sequence(tenant)
            assert self.pager.num_pages(row) == 0 and self.pager.tenant(row) == tenant

    def open_pages(self, row):
        return [p for p in range(self.pager.num_pages(row)) if not self.pager.page_info(row, p)["sealed"]]

    @rule(data=st.data(), n=st.integers(1, 3), seal_open=st.booleans())
    def append_pages(self, data, n, seal_open):
        rows = [r for r in self.live_rows() if self.pager.num_pages(r) + n <= MAX_PAGES]
        if not rows:
            return
        row = data.draw(st.sampled_from(rows))
        was_open = self.open_pages(row)
        first = self.pager.num_pages(row)
        try:
            append_written(self.pager, row, n, self.tags, seal_open=seal_open)
        except PagerError:
            # No frames or no room below: allowed, and nothing may be lost. Without seal_open
            # the call changes nothing at all.
            assert self.pager.num_pages(row) == first
            if not seal_open:
                assert self.open_pages(row) == was_open
            return
        # The open pages are sealed only when asked; the new ones are open either way.
        assert self.open_pages(row) == (was_open if not seal_open else []) + list(range(first, first + n))

    @rule(data=st.data())
    def rewrite_open_page(self, data):
        """Write an open page again (a later layer or token of a step): it must stay in its frame,
        and the copies made when it is sealed must hold these bytes."""
        pages = [(r, p) for r in self.live_rows() for p in self.open_pages(r)]
        if pages:
            row, page = data.draw(st.sampled_from(pages))
            self.tags[(row, page)] = new_tag()
            write_page(self.pager, row, page, self.tags[(row, page)])

    @rule(data=st.data())
    def seal(self, data):
        pages = self.live_pages()
        if pages:
            row, page = data.draw(st.sampled_from(pages))
            try:
                self.pager.seal(row, page)
            except PagerError:
                pass  # write-through with the host full
            assert self.pager.page_info(row, page)["sealed"]

    @rule(data=st.data())
    def service(self, data):
        limit = self.pager.max_serviceable()
        batch = self.pick(data, self.live_pages(), max_size=max(limit, 1))
        try:
            self.pager.service(batch)
        except PagerError:
            assert len(set(batch)) > 0
            return
        for row, page in batch:
            info = self.pager.page_info(row, page)
            assert info["tier"] == Tier.GPU and info["pins"] == 0
            assert torch.equal(self.pager.pool.view(torch.int32)[info["frame"]], self.expected(row, page))

    @rule(data=st.data(), tier=st.sampled_from([Tier.HOST, Tier.DISK]))
    def demote(self, data, tier):
        pages = [p for p in self.live_pages()
                 if self.pager.page_info(*p)["sealed"] and self.pager.page_info(*p)["pins"] == 0]
        batch = self.pick(data, pages)
        try:
            self.pager.demote(batch, tier)
        except ValueError as e:
            config = self.pager.config
            assert ("no disk slots" in str(e) and config["num_disk_slots"] == 0) or (
                "no host slots" in str(e) and config["num_host_slots"] == 0)
            return
        except PagerError:
            return
        for row, page in batch:
            assert self.pager.page_info(row, page)["tier"] >= tier

    @rule(data=st.data(), tier=st.sampled_from([Tier.GPU, Tier.HOST]))
    def promote(self, data, tier):
        batch = self.pick(data, self.live_pages(), max_size=max(self.pager.max_serviceable(), 1))
        try:
            self.pager.promote(batch, tier)
        except PagerError:
            return
        for row, page in batch:
            assert self.pager.page_info(row, page)["tier"] <= tier

    @rule(data=st.data())
    def touch(self, data):
        self.tick += 1
        batch = self.pick(data, self.live_pages())
        self.pager.touch(batch, self.tick)
        for row, page in batch:
            assert self.pager.page_info(row, page)["last_use"] == self.tick

    @rule(data=st.data())
    def remove_sequence(self, data):
        rows = self.live_rows()
        if rows:
            row = data.draw(st.sampled_from(rows))
            self.pager.remove_sequence(row)
            self.tags = {k: v for k, v in self.tags.items() if k[0] != row}
            assert (self.pager.page_table()[row] == paged_kv.UNMAPPED).all()

    @rule()
    def verify_all(self):
        """Service every live page in batches and compare each with its pattern."""
        verify_every_page(self.pager, self.tags)

    # ---- after every step ----

    @invariant()
    def consistent(self):
        if not hasattr(self, "pager"):
            return
        self.pager.check_invariants()
        table = self.pager.page_table()
        frames = [self.pager.page_info(*p)["frame"] for p in self.tags]
        frames = [f for f in frames if f >= 0]
        assert len(frames) == len(set(frames)), "a frame is owned twice"
        slots = [self.pager.page_info(*p)["host_slot"] for p in self.tags]
        slots = [s for s in slots if s >= 0]
        assert len(slots) == len(set(slots)), "a host slot is owned twice"
        for row, page in self.tags:
            info = self.pager.page_info(row, page)
            assert int(table[row, page]) == info["pte"]
            self.check_copy(row, page)
            if not info["sealed"]:  # being written: its only copy is its frame
                assert info["tier"] == Tier.GPU and not info["host_valid"] and not info["disk_valid"]
            elif info["host_valid"]:  # every lower copy is the page as sealed
                words = self.pager.host_pool.view(torch.int32)[info["host_slot"]]
                assert torch.equal(words, self.expected(row, page)), (row, page, info)

    def teardown(self):
        if hasattr(self, "pager"):
            for row in self.live_rows():
                n = self.pager.num_pages(row)
                if n:
                    try:
                        self.pager.seal(row, n - 1)
                    except PagerError:
                        pass
            verify_every_page(self.pager, self.tags)
            self.pager.check_invariants()
            del self.pager  # deletes the disk store's file
        if hasattr(self, "folder"):
            shutil.rmtree(self.folder)


def verify_every_page(pager, tags):
    """Bring each live page to the GPU (in batches of max_serviceable(), or one at a time when a
    batch does not fit) and compare its frame with its pattern. A page that cannot be brought
    in (the tiers too full to swap it up) is compared where it is."""
    pending = sorted(tags)
    while pending:
        batch, pending = pending[: max(pager.max_serviceable(), 1)], pending[max(pager.max_serviceable(), 1):]
        try:
            pager.service(batch)
        except PagerError as e:
            assert "all tiers are full" in str(e) or "hold open or pinned pages" in str(e), e
            pager.check_invariants()
            if len(batch) > 1:
                pending = batch + pending
                pending, batch = pending[1:], pending[:1]
                try:
                    pager.service(batch)
                except PagerError:
                    pass
        for row, page in batch:
            words = read_any_copy(pager, row, page)
            assert torch.equal(words, pattern(pager, tags[(row, page)])), (row, page)
        pager.check_invariants()


PagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PAGER_EXAMPLES", 200)), stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPagerMachine = PagerMachine.TestCase


# ---- building blocks against plain models ----


@given(capacity=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from(["alloc", "alloc_at", "release"]), st.integers(0, 7),
                              st.integers(0, 3)), max_size=60))
@settings(max_examples=100, deadline=None)
def test_index_allocator_matches_a_model(capacity, ops):
    """Allocation from the free list, allocation of a given index and release, against a dict of
    owners; taking an owned index or releasing a free one (or someone else's) raises."""
    alloc = _C._IndexAllocator("frame", capacity)
    owners = {}
    for op, index, owner in ops:
        index %= capacity
        if op == "alloc":
            if len(owners) == capacity:
                with pytest.raises(PagerInternalError, match="empty pool"):
                    alloc.allocate(owner)
                continue
            got = alloc.allocate(owner)
            assert got not in owners
            owners[got] = owner
        elif op == "alloc_at":
            if index in owners:
                with pytest.raises(PagerInternalError, match="already owned"):
                    alloc.allocate_at(index, owner)
            else:
                alloc.allocate_at(index, owner)
                owners[index] = owner
        elif index not in owners:
            with pytest.raises(PagerInternalError, match="already free"):
                alloc.release(index, owner)
        elif owners[index] != owner:
            with pytest.raises(PagerInternalError, match="but its owner key is"):
                alloc.release(index, owner)
        else:
            alloc.release(index, owner)
            del owners[index]
        assert alloc.check() == ""
        assert alloc.num_free() == capacity - len(owners)
        for i in range(capacity):
            assert alloc.owner(i) == owners.get(i, -1)


@given(ops=st.lists(st.tuples(st.sampled_from(["push", "remove", "touch"]), st.integers(0, 9),
                              st.booleans()), max_size=80))
@settings(max_examples=100, deadline=None)
def test_lru_list_matches_a_model(ops):
    """push_back, remove and touch against an OrderedDict; misuse raises."""
    lru = _C._LruList(10)
    model = collections.OrderedDict()
    for op, node, dirty in ops:
        if op == "push" and node not in model:
            lru.push_back(node, dirty)
            model[node] = dirty
        elif op == "remove" and node in model:
            lru.remove(node)
            del model[node]
        elif op == "touch" and node in model:
            lru.touch(node)
            model.move_to_end(node)
        elif op == "push":
            with pytest.raises(PagerInternalError):
                lru.push_back(node, dirty)
        else:
            with pytest.raises(PagerInternalError):
                lru.remove(node) if op == "remove" else lru.touch(node)
        assert lru.check() == ""
        assert lru.order() == list(model)
        assert lru.front() == (next(iter(model)) if model else -1)
        assert lru.size() == len(model) and lru.num_dirty() == sum(model.values())
