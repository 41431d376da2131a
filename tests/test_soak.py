"""Soak: thousands of short sessions go through one Engine whose GPU frames and host slots hold a
small part of what is live, so pages are evicted and faulted all the time. Each round tops up
the live sessions (a new one prefills its prompt), switches a batch slot to another session
(unbinding the one there, which may be suspended to the host or the disk; the incoming one may
be resumed or prefetched first), runs a step over the bound slots (rows=None), and frees the
sessions that are done.

The run is bounded by the clock: PAGED_KV_SOAK_SECONDS (default 45) or MAX_ROUNDS, whichever
ends first. What is checked:
- a random CHECK_FRACTION of the steps (each entry, each layer) equals the float64 reference
  over that session's own K/V, and so does every session's last step before it is freed;
- no operation raises (the tiers are sized to hold every live session);
- memory stays flat after a warm-up: process RSS (/proc/self/statm) grows by at most
  RSS_SLACK_BYTES, the pager's metadata by at most METADATA_SLACK_BYTES, and on CUDA torch.cuda.memory_allocated by
  at most CUDA_SLACK_BYTES;
- enough sessions were switched (MIN_SWITCHED_PER_SECOND times the duration);
- at the end nothing leaks: every frame and slot is free, the page table is unmapped and the
  pager's invariants hold.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

import paged_kv
from paged_kv import Engine, Policy, reference

from conftest import DEVICES, engine_dtype as _dtype, engine_tolerance as _tolerance

PAGE_SIZE, LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 16, 2, 2, 4, 64
TENANTS = 3
# A live session's open tail page stays in its GPU frame (suspended or not), so the frames hold
# one page per live session plus room for a step's new pages and the faults it services.
FRAMES, HOST_SLOTS, DISK_SLOTS = 16, 16, 96
LIVE_SESSIONS, MAX_BATCH, MAX_PAGES = 8, 4, 8
SOAK_SECONDS = float(os.environ.get("PAGED_KV_SOAK_SECONDS", "45"))
MAX_ROUNDS = 1_000_000
WARMUP_FRACTION = 0.2  # of the duration, before memory is measured
CHECK_FRACTION = 0.5  # of the steps checked against the reference (plus every session's last)
# Measured on a busy 2-core CPU: about 100 sessions switched per second; the floor leaves 3x margin.
MIN_SWITCHED_PER_SECOND = 30
RSS_SLACK_BYTES = 16 * 2**20
CUDA_SLACK_BYTES = 2**20
# The pager's metadata counts vector capacities: a row's page list may still reach a larger
# capacity after the warm-up (a few hundred bytes per row at most); a per-session leak over
# thousands of sessions would pass this.
METADATA_SLACK_BYTES = 4096


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SoakSession:
    """A session's K/V per layer, unpaged on the CPU, and the decode steps it has left."""

    def __init__(self, tenant, steps_left, dtype):
        self.tenant, self.steps_left = tenant, steps_left
        empty = torch.empty(0, KV_HEADS, HEAD_DIM, dtype=dtype)
        self.keys = [empty] * LAYERS
        self.values = [empty] * LAYERS
        self.switched = False


class Soak:
    def __init__(self, engine, rng, generator):
        self.engine, self.rng, self.g = engine, rng, generator
        self.dtype, self.device = engine.dtype, engine.device
        self.sessions: dict[int, SoakSession] = {}
        self.created = self.freed = self.switched = 0
        self.steps = self.steps_checked = 0
        self.suspended = self.resumed = self.prefetched = 0

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def new_session(self):
        row = self.engine.new_sequence(self.rng.randrange(TENANTS))
        self.sessions[row] = SoakSession(self.engine.pager.tenant(row), self.rng.randint(2, 6), self.dtype)
        self.created += 1
        self.step([(row, self.rng.randint(PAGE_SIZE + 1, 4 * PAGE_SIZE + 8))], bound=False, check=self.rng.random() < CHECK_FRACTION)

    def free_session(self, row):
        self.engine.free_sequence(row)
        del self.sessions[row]
        self.freed += 1

    def switch(self):
        """Empty a random batch slot (its session may be suspended) and bind another session
        there (it may be resumed or prefetched first)."""
        engine, rng = self.engine, self.rng
        slot = rng.randrange(MAX_BATCH)
        out = engine.unbind(slot)
        if out is not None and rng.random() < 0.3:
            engine.suspend(out, rng.choice(["host", "disk"]))
            self.suspended += 1
        bound = set(engine.bound())
        waiting = [r for r in self.sessions if r not in bound and r != out]
        if not waiting:
            return
        row = rng.choice(waiting)
        action = rng.random()
        if action < 0.2:
            engine.resume(row, rng.choice(["gpu", "host"]))
            self.resumed += 1
        engine.bind(slot, row)
        if action > 0.8:
            engine.prefetch()
            self.prefetched += 1
        session = self.sessions[row]
        self.switched += not session.switched
        session.switched = True

    def step(self, entries, bound, check):
        """Entry (row, q) appends q tokens to every layer; each layer attends them."""
        engine = self.engine
        rows = [row for row, _ in entries]
        if bound:
            assert engine.bound() == rows
        starts = [0]
        for _, q in entries:
            starts.append(starts[-1] + q)
        for layer in range(LAYERS):
            for row, q in entries:
                key, value = self._randn(q, KV_HEADS, HEAD_DIM), self._randn(q, KV_HEADS, HEAD_DIM)
                engine.append(row, key.to(self.device), value.to(self.device), layer)
                session = self.sessions[row]
                session.keys[layer] = torch.cat([session.keys[layer], key])
                session.values[layer] = torch.cat([session.values[layer], value])
            query = self._randn(starts[-1], Q_HEADS, HEAD_DIM)
            out, lse = engine.attention(query.to(self.device), None if bound else rows, starts, layer,
                                        return_lse=True)
            if check:
                self.check(query, entries, starts, layer, out.cpu(), lse.cpu())
        self.steps += 1
        self.steps_checked += check

    def check(self, query, entries, starts, layer, out, lse):
        tol = _tolerance(self.dtype)
        for b, (row, q) in enumerate(entries):
            session = self.sessions[row]
            keys, values = session.keys[layer], session.values[layer]
            lo, hi = starts[b], starts[b + 1]
            ref_out, ref_lse = reference.attention(query[lo:hi], keys, values, causal_offset=keys.shape[0] - q)
            torch.testing.assert_close(out[lo:hi].double(), ref_out.double(), **tol,
                                       msg=lambda m: f"session in row {row}, layer {layer}: {m}")
            torch.testing.assert_close(lse[lo:hi].double(), ref_lse, rtol=tol["rtol"], atol=max(tol["atol"], 1e-4))

    def round(self):
        engine, rng = self.engine, self.rng
        if len(self.sessions) < LIVE_SESSIONS:
            self.new_session()
        self.switch()
        bound = engine.bound()
        if not bound:
            return
        room = MAX_PAGES * PAGE_SIZE
        entries = []
        for row in bound:
            q = 1 if rng.random() < 0.85 else rng.randint(2, PAGE_SIZE // 2)
            entries.append((row, min(q, room - engine.num_tokens(row))))
        assert all(q > 0 for _, q in entries)
        done = [row for row in bound if self.sessions[row].steps_left == 1]
        self.step(entries, bound=True, check=bool(done) or rng.random() < CHECK_FRACTION)
        for row in bound:
            self.sessions[row].steps_left -= 1
        for row in done:
            self.free_session(row)


@pytest.mark.parametrize("device", DEVICES)
def test_soak_sessions_switch_page_and_leak_nothing(device, tmp_path, one_thread):
    dtype = _dtype(device)
    page_bytes = LAYERS * 2 * KV_HEADS * PAGE_SIZE * HEAD_DIM * torch.empty((), dtype=dtype).element_size()
    policy = Policy(page_size=PAGE_SIZE, gpu_budget=FRAMES * page_bytes, host_budget=HOST_SLOTS * page_bytes,
                    disk_budget=DISK_SLOTS * page_bytes, disk_path=str(tmp_path), io_backend="posix",
                    zero_copy=False)
    # The tiers hold every live session (each is at most MAX_PAGES pages), so nothing is refused.
    assert FRAMES + HOST_SLOTS + DISK_SLOTS >= LIVE_SESSIONS * MAX_PAGES
    rng = random.Random(2024)
    cuda = device == "cuda"
    with Engine(policy, num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype, device=device,
                max_sequences=LIVE_SESSIONS, max_pages=MAX_PAGES, max_batch=MAX_BATCH) as engine:
        soak = Soak(engine, rng, torch.Generator().manual_seed(2024))
        began = time.monotonic()
        deadline = began + SOAK_SECONDS
        warm_at = began + WARMUP_FRACTION * SOAK_SECONDS
        warm = None  # (rss, metadata bytes, cuda bytes) once warmed up
        rss_peak = cuda_peak = 0
        rounds = 0
        while rounds < MAX_ROUNDS and time.monotonic() < deadline:
            soak.round()
            rounds += 1
            if rounds % 50:
                continue
            engine.pager.check_invariants()
            if cuda:
                torch.cuda.synchronize()
            now = (_rss_bytes(), engine.pager.bytes_of_metadata(), torch.cuda.memory_allocated() if cuda else 0)
            if warm is None:
                if time.monotonic() >= warm_at:
                    warm = now
                continue
            rss_peak, cuda_peak = max(rss_peak, now[0]), max(cuda_peak, now[2])
            assert now[1] - warm[1] <= METADATA_SLACK_BYTES, f"pager metadata grew from {warm[1]} to {now[1]} bytes"
        elapsed = time.monotonic() - began
        stats = engine.stats()

        for row in list(soak.sessions):
            soak.free_session(row)
        engine.pager.check_invariants()
        assert engine.bound() == [] and engine.batch_rows.tolist() == [-1] * MAX_BATCH
        assert engine.pager.free_frames() == engine.num_frames
        assert engine.pager.free_host_slots() == engine.num_host_slots
        assert engine.pager.free_disk_slots() == engine.num_disk_slots
        assert all(v == 0 for t in range(TENANTS) for v in engine.usage(t).values())
        assert bool((engine.page_table.cpu() == paged_kv.UNMAPPED).all())
        assert bool((engine.pager.page_table() == paged_kv.UNMAPPED).all())

    print(f"\nsoak: {elapsed:.1f} s, {rounds} rounds, {soak.created} sessions created, {soak.switched} switched, "
          f"{soak.freed} freed; {soak.steps} steps ({soak.steps_checked} checked); suspended {soak.suspended}, "
          f"resumed {soak.resumed}, prefetched {soak.prefetched}; evictions {stats['evictions']}, "
          f"faults {stats['faults_seen']}; RSS {warm[0] / 2**20:.1f} MiB after warm-up, "
          f"peak {rss_peak / 2**20:.1f} MiB after")
    assert warm is not None and rss_peak > 0, "the run ended before memory was measured after the warm-up"
    assert rss_peak - warm[0] <= RSS_SLACK_BYTES, f"RSS grew by {(rss_peak - warm[0]) / 2**20:.1f} MiB"
    if cuda:
        assert cuda_peak - warm[2] <= CUDA_SLACK_BYTES, f"CUDA memory grew by {cuda_peak - warm[2]} bytes"
    if rounds < MAX_ROUNDS:  # ended by the clock
        assert soak.switched >= MIN_SWITCHED_PER_SECOND * SOAK_SECONDS
    assert soak.freed == soak.created and soak.steps_checked >= CHECK_FRACTION / 2 * soak.steps
    # Paging was constant: every switched session's pages were evicted and faulted back.
    assert stats["evictions"]["gpu"] >= soak.switched and stats["faults_seen"] >= soak.switched
    assert stats["evictions"]["host"] > 0 and stats["pages_moved"]["disk_to_gpu"] + stats["pages_moved"]["disk_to_host"] > 0
