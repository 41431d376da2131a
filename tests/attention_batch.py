"""Random batches for the attention tests.

K/V of every real token is written with paged_kv.append_kv into a NaN-poisoned pool, so unused
frames, the tail of each sequence's last page, the other layers and the frames of a sequence
outside the batch all stay NaN: any read of them shows up in the result.
"""

from __future__ import annotations

import dataclasses

import torch

import paged_kv
from conftest import poisoned_pool


def _randint(low, high, g):
    """A random int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def random_specs(g, batch, page_size, max_chunk=40):
    """(kv_len, num_queries) of `batch` entries: decode steps (one query after a history),
    extend chunks (several queries after a history) and prefills (no history), with lengths
    ending anywhere in a page. With two or more entries the first has length 1."""
    specs = []
    for _ in range(batch):
        kind = _randint(0, 2, g)
        if kind == 0:
            history, queries = _randint(0, 3 * page_size, g), 1
        elif kind == 1:
            history, queries = _randint(1, 2 * page_size, g), _randint(2, max_chunk, g)
        else:
            history, queries = 0, _randint(1, max_chunk, g)
        specs.append((history + queries, queries))
    if batch > 1:
        specs[0] = (1, 1)
    return specs


@dataclasses.dataclass
class Batch:
    query: torch.Tensor  # [N, Hq, D]
    pool: torch.Tensor  # [F, L, 2, Hkv, P, D], NaN where no token was written
    page_table: torch.Tensor  # int32 [max_sequences, max_pages], on the pool's device
    sequences: torch.Tensor
    query_starts: torch.Tensor
    kv_lens: torch.Tensor
    layer: int
    max_query_len: int
    specs: list  # (kv_len, num_queries) per entry
    rows: list  # page-table row per entry
    free_frames: list  # frames no page maps

    @property
    def page_size(self):
        return self.pool.shape[4]

    def args(self):
        """Positional arguments of paged_kv.attention."""
        return (self.query, self.pool, self.page_table, self.sequences, self.query_starts,
                self.kv_lens, self.layer, self.max_query_len)

    def needed_pages(self, window=0, sinks=0):
        """Sorted (row, page) of every page some query of the batch can see."""
        needed = set()
        for row, (kv_len, queries) in zip(self.rows, self.specs):
            if queries == 0:
                continue
            first_query = kv_len - queries
            for page in range((kv_len + self.page_size - 1) // self.page_size):
                lo, hi = page * self.page_size, min((page + 1) * self.page_size, kv_len)
                if not window or lo < sinks or hi - 1 > first_query - window:
                    needed.add((row, page))
        return sorted(needed)


def make_batch(device, dtype, page_size, head_dim, num_q_heads, num_kv_heads, specs, g,
               num_layers=2, spare_frames=0):
    """A batch of `specs` entries in distinct random rows, its pages in random frames, with
    `spare_frames` unused frames (NaN) to service faults into."""
    batch = len(specs)
    max_sequences = batch + 2  # one row for a sequence outside the batch, one left unmapped
    order = torch.randperm(max_sequences, generator=g).tolist()
    rows, bystander = order[:batch], order[batch]
    pages = [(kv_len + page_size - 1) // page_size for kv_len, _ in specs]
    bystander_pages = 2
    max_pages = max(pages + [bystander_pages]) + 1
    num_frames = sum(pages) + bystander_pages + spare_frames + 1
    frames = torch.randperm(num_frames, generator=g).tolist()

    table = paged_kv.new_page_table(max_sequences, max_pages)
    for row, n in zip(rows + [bystander], pages + [bystander_pages]):
        for page in range(n):
            table[row, page] = paged_kv.make_pte(paged_kv.Tier.GPU, frames.pop())
    table = table.to(device)
    pool = poisoned_pool(num_frames, num_layers, num_kv_heads, page_size, head_dim, dtype, device)
    layer = _randint(0, num_layers - 1, g)

    token_rows = torch.cat([torch.full((kv_len,), row, dtype=torch.int32) for row, (kv_len, _) in zip(rows, specs)])
    positions = torch.cat([torch.arange(kv_len, dtype=torch.int32) for kv_len, _ in specs])
    key = torch.randn(len(positions), num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    value = torch.randn(len(positions), num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    paged_kv.append_kv(key, value, pool, table, token_rows.to(device), positions.to(device), layer)

    counts = [queries for _, queries in specs]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    query = torch.randn(starts[-1], num_q_heads, head_dim, generator=g).to(dtype).to(device)
    return Batch(
        query=query,
        pool=pool,
        page_table=table,
        sequences=torch.tensor(rows, dtype=torch.int32, device=device),
        query_starts=torch.tensor(starts, dtype=torch.int32, device=device),
        kv_lens=torch.tensor([kv_len for kv_len, _ in specs], dtype=torch.int32, device=device),
        layer=layer,
        max_query_len=max(counts + [1]),
        specs=list(specs),
        rows=rows,
        free_frames=frames,
    )
