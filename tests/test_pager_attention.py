"""The fault protocol end to end on CPU: a context several times larger than the GPU frames,
paged_kv.attention with a fault queue, the faults serviced by the pager in batches of at most
max_serviceable(), attention re-run over each batch's pages alone, and the partial states merged
with paged_kv.merge_states: exact attention over the whole context (against the float64
reference over an unpaged copy of the same K/V)."""

from __future__ import annotations

import zlib

import pytest
import torch

import paged_kv
from paged_kv import Tier, reference
from paged_kv.ops import new_fault_queue, read_faults
from paged_kv.store import DiskStore

PAGE_SIZE, LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 16, 2, 2, 4, 64
DTYPE = torch.float32


def _generator(*params):
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


class Context:
    """Sequences written token page by token page through the pager into a NaN-poisoned pool,
    and the same K/V in an unpaged reference pool (page i of row r in its own frame)."""

    def __init__(self, lengths, frames, host_slots, g, disk_slots=0, folder=None, **pager_options):
        max_pages = max((n + PAGE_SIZE - 1) // PAGE_SIZE for n in lengths)
        self.lengths = lengths
        self.pool = paged_kv.new_pool(frames, LAYERS, KV_HEADS, PAGE_SIZE, HEAD_DIM, DTYPE).fill_(float("nan"))
        self.host_pool = paged_kv.new_pool(host_slots, LAYERS, KV_HEADS, PAGE_SIZE, HEAD_DIM, DTYPE).fill_(float("nan"))
        store = None
        if disk_slots:
            store = DiskStore(str(folder), disk_slots, self.pool[0].numel() * self.pool.element_size())
        self.pager = paged_kv.Pager(self.pool, self.host_pool, max_sequences=len(lengths),
                                    max_pages=max_pages, disk_store=store, **pager_options)
        self.table = paged_kv.new_page_table(len(lengths), max_pages)
        self.ref_pool = paged_kv.new_pool(len(lengths) * max_pages, LAYERS, KV_HEADS, PAGE_SIZE, HEAD_DIM,
                                          DTYPE).fill_(float("nan"))
        self.ref_table = paged_kv.new_page_table(len(lengths), max_pages)
        rows = [self.pager.add_sequence(tenant=i) for i in range(len(lengths))]
        assert rows == list(range(len(lengths)))
        for row, length in enumerate(lengths):
            for page in range((length + PAGE_SIZE - 1) // PAGE_SIZE):
                self.ref_table[row, page] = paged_kv.make_pte(Tier.GPU, row * max_pages + page)
        # Interleave the sequences page by page, as a serving loop would.
        for page in range(max_pages):
            for row, length in enumerate(lengths):
                lo, hi = page * PAGE_SIZE, min((page + 1) * PAGE_SIZE, length)
                if lo >= hi:
                    continue
                assert self.pager.append_pages(row, 1) == page
                self.pager.sync_table(self.table)
                self._write(row, lo, hi, g)

    def _write(self, row, lo, hi, g):
        n = hi - lo
        sequences = torch.full((n,), row, dtype=torch.int32)
        positions = torch.arange(lo, hi, dtype=torch.int32)
        for layer in range(LAYERS):
            key = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g, dtype=DTYPE)
            value = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g, dtype=DTYPE)
            paged_kv.append_kv(key, value, self.pool, self.table, sequences, positions, layer)
            paged_kv.append_kv(key, value, self.ref_pool, self.ref_table, sequences, positions, layer)

    def tiers(self):
        return {(r, p): Tier(self.pager.page_info(r, p)["tier"])
                for r in range(len(self.lengths)) for p in range(self.pager.num_pages(r))}


def _attention(ctx, query, table, batch, layer, host_pool=None):
    sequences, query_starts, kv_lens, max_query_len = batch
    queue, count = new_fault_queue(sum(ctx.pager.num_pages(r) for r in range(len(ctx.lengths))) + 1, "cpu")
    out, lse = paged_kv.attention(query, ctx.pool, table, sequences, query_starts, kv_lens, layer,
                                  max_query_len, host_pool=host_pool, fault_queue=queue,
                                  fault_count=count, return_lse=True)
    return out, lse, [tuple(f) for f in read_faults(queue, count).tolist()]


def _batch(lengths, queries):
    """Batch tensors for one entry per sequence with `queries[i]` new queries."""
    starts = [0]
    for q in queries:
        starts.append(starts[-1] + q)
    return (torch.arange(len(lengths), dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int32), max(queries))


TIERS = {
    # name: (host slots, disk slots, bounce disk reads through host slots)
    "host": (32, 0, False),
    "host+disk": (8, 64, False),
    "host+disk, bounce": (8, 64, True),
}


@pytest.mark.parametrize("tiers", list(TIERS))
@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("write_through", [False, True])
def test_faults_serviced_in_batches_give_exact_attention(tmp_path, tiers, zero_copy, write_through):
    g = _generator("pager-attention", tiers, zero_copy, write_through)
    lengths, queries = [150, 97, 163], [1, 5, 1]  # decode, an extend chunk, decode
    host_slots, disk_slots, bounce = TIERS[tiers]
    ctx = Context(lengths, frames=5, host_slots=host_slots, g=g, disk_slots=disk_slots, folder=tmp_path,
                  write_through=write_through, bounce_through_host_slots=bounce)
    total_pages = sum((n + PAGE_SIZE - 1) // PAGE_SIZE for n in lengths)
    assert total_pages >= 5 * 5  # the context is several times the GPU frames
    if disk_slots:
        assert list(ctx.tiers().values()).count(Tier.DISK) >= total_pages - 5 - host_slots
    ctx.pager.check_invariants()
    ctx.pager.sync_table(ctx.table)
    batch = _batch(lengths, queries)
    query = torch.randn(sum(queries), Q_HEADS, HEAD_DIM, generator=g, dtype=DTYPE)
    host_pool = ctx.host_pool if zero_copy else None

    for layer in range(LAYERS):
        where = ctx.tiers()
        out, lse, faults = _attention(ctx, query, ctx.table, batch, layer, host_pool)
        off_gpu = sorted(p for p, t in where.items() if t != Tier.GPU and not (zero_copy and t == Tier.HOST))
        assert faults == off_gpu
        outs, lses = [out], [lse]
        # Stream the faults through the frames; each batch is attended over its pages alone.
        batches = 0
        while faults:
            limit = ctx.pager.max_serviceable()
            assert limit >= 1
            serviced, faults = faults[:limit], faults[limit:]
            assert ctx.pager.service(serviced) == len(serviced)
            only = paged_kv.new_page_table(*ctx.table.shape)
            for row, page in serviced:
                only[row, page] = ctx.pager.pte(row, page)
                assert paged_kv.pte.pte_tier(int(only[row, page])) == Tier.GPU
            out, lse, _ = _attention(ctx, query, only, batch, layer)  # its faults: pages done before
            outs.append(out)
            lses.append(lse)
            batches += 1
            ctx.pager.check_invariants()
        assert batches >= 2 or zero_copy
        merged, merged_lse = paged_kv.merge_states(torch.stack(outs), torch.stack(lses))
        ref_out, ref_lse, ref_faults, _ = reference.paged_attention(
            query, ctx.ref_pool, ctx.ref_table, *batch[:3], layer)
        assert ref_faults == []
        torch.testing.assert_close(merged.double(), ref_out.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
        ctx.pager.sync_table(ctx.table)

    stats = ctx.pager.stats()
    if not zero_copy or disk_slots:  # with zero-copy and no disk, every page is readable in place
        assert stats["faults_serviced"] > 0
    if disk_slots:
        assert stats["pages_moved"]["disk_to_gpu"] > 0
    if write_through:
        assert stats["pages_moved"]["gpu_to_host"] == stats["write_throughs"]
