"""Plain PyTorch references for the paged_kv ops: slow, obvious, and the ground truth of tests."""

from __future__ import annotations

import math

import torch

from paged_kv.pte import Tier, pte_index, pte_tier


def _frame_of(page_table: torch.Tensor, sequence: int, page: int) -> int:
    pte = int(page_table[sequence, page])
    if pte_tier(pte) != Tier.GPU:
        raise ValueError(f"page {page} of sequence {sequence} is not in a GPU frame (PTE {pte})")
    return pte_index(pte)


def append_kv(key, value, pool, page_table, sequences, positions, layer) -> None:
    """Reference of ops.append_kv: one token at a time, in order."""
    page_size = pool.shape[4]
    for t in range(key.shape[0]):
        seq, pos = int(sequences[t]), int(positions[t])
        frame = _frame_of(page_table, seq, pos // page_size)
        pool[frame, layer, 0, :, pos % page_size, :] = key[t]
        pool[frame, layer, 1, :, pos % page_size, :] = value[t]


def gather_kv(pool, page_table, sequence, pages, layer):
    """Reference of ops.gather_kv: [N * P, H, D] key and value."""
    keys, values = [], []
    for page in pages.tolist():
        frame = _frame_of(page_table, sequence, page)
        keys.append(pool[frame, layer, 0].transpose(0, 1))  # [P, H, D]
        values.append(pool[frame, layer, 1].transpose(0, 1))
    h, d = pool.shape[3], pool.shape[5]
    if not keys:
        empty = pool.new_empty((0, h, d))
        return empty, empty.clone()
    return torch.cat(keys).contiguous(), torch.cat(values).contiguous()


def _attention_float64(query, key, value, scale, causal_offset, window, sinks, key_mask):
    """Float64 attention: output [Q, Hq, D], log-sum-exp [Q, Hq] and probabilities [Hq, Q, T].
    A query that sees no key gets output 0, log-sum-exp -inf and probabilities 0."""
    q, k, v = query.double(), key.double(), value.double()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if window and causal_offset is None:
        raise ValueError("a sliding window needs query positions (causal_offset)")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,thd->hqt", q, k) * scale
    allowed = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
    if causal_offset is not None:
        qpos = causal_offset + torch.arange(q.shape[0], device=q.device)[:, None]
        kpos = torch.arange(k.shape[0], device=q.device)[None, :]
        allowed &= kpos <= qpos
        if window:
            allowed &= (kpos > qpos - window) | (kpos < sinks)
    if key_mask is not None:
        allowed &= key_mask.to(q.device)[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Q], -inf where a query sees no key
    no_key = torch.isneginf(lse)[..., None]
    probs = torch.where(no_key, 0.0, torch.exp(scores - torch.where(no_key, 0.0, lse[..., None])))
    if torch.isfinite(v).all():
        out = torch.einsum("hqt,thd->qhd", probs, v)
    else:
        # A NaN or inf value reaches only the queries that see its key: a weight of 0 times NaN
        # would carry it to every query, so each query sums over the keys it sees.
        out = q.new_zeros(q.shape)
        for i in range(q.shape[0]):
            seen = allowed[i]
            out[i] = torch.einsum("ht,thd->hd", probs[:, i, seen], v[seen])
    return out, lse.transpose(0, 1), probs


def attention(
    query,
    key,
    value,
    scale: float | None = None,
    causal_offset: int | None = None,
    window: int = 0,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
):
    """Exact attention in float64 over contiguous K/V, with grouped query heads.

    Args:
        query: [Q, Hq, D] queries (Q new tokens); key, value: [T, Hkv, D], Hq a multiple of Hkv.
        scale: softmax scale, default 1/sqrt(D).
        causal_offset: when given, query i sits at position causal_offset + i and sees keys at
            positions <= its own; when None every query sees every key.
        window, sinks: with window > 0 (needs causal_offset), a query at position p sees only
            keys k > p - window, plus the sink keys k < sinks.
        key_mask: bool [T]; keys where it is False are seen by no query.
    Returns:
        output [Q, Hq, D] in query's dtype, and the log-sum-exp [Q, Hq] in float64. A query that
        sees no key gets output 0 and log-sum-exp -inf.
    """
    out, lse, _ = _attention_float64(query, key, value, scale, causal_offset, window, sinks, key_mask)
    return out.to(query.dtype), lse


def _page_source(pool, host_pool, page_table, row, page):
    """The [L, 2, H, P, D] data of a page, or None when this call cannot read it (a fault)."""
    pte = int(page_table[row, page])
    tier, index = pte_tier(pte), pte_index(pte)
    if tier == Tier.GPU:
        if index >= pool.shape[0]:
            raise ValueError(f"page {page} of sequence {row} maps to frame {index}, outside the pool")
        return pool[index]
    if tier == Tier.HOST and host_pool is not None:
        if index >= host_pool.shape[0]:
            raise ValueError(f"page {page} of sequence {row} maps to slot {index}, outside the host pool")
        return host_pool[index]
    return None


def paged_attention(
    query,
    pool,
    page_table,
    sequences,
    query_starts,
    kv_lens,
    layer,
    scale=None,
    window=0,
    sinks=0,
    host_pool=None,
    faults=True,
):
    """Reference of ops.attention in float64, one batch entry and one page at a time.

    Follows the contract of ops.attention: tier-0 pages are read from `pool`, tier-1 pages from
    `host_pool` when given; any other page that some query can see is a fault (skipped, listed)
    when `faults` is True (a fault queue was given) and a ValueError otherwise.

    Returns:
        output [N, Hq, D] in query's dtype, log-sum-exp float64 [N, Hq] (-inf for a query that
        sees no readable key), the faults as a sorted list of (row, page), and the telemetry the
        call adds: float64 [max_sequences, max_pages], for each entry and page read, the softmax
        mass the entry's newest query put on the page, summed over query heads.
    """
    query, pool, page_table = query.cpu(), pool.cpu(), page_table.cpu()
    sequences, query_starts, kv_lens = sequences.cpu(), query_starts.cpu(), kv_lens.cpu()
    n, hq, d = query.shape
    hkv, page_size = pool.shape[3], pool.shape[4]
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float64)
    telemetry = torch.zeros(page_table.shape, dtype=torch.float64)
    faulted = set()
    for b in range(sequences.shape[0]):
        row, kv_len = int(sequences[b]), int(kv_lens[b])
        begin, end = int(query_starts[b]), int(query_starts[b + 1])
        if end == begin:
            continue
        first_query = kv_len - (end - begin)  # position of the entry's oldest query
        positions = torch.arange(kv_len)
        seen = torch.ones(kv_len, dtype=torch.bool)  # by some query of the entry
        if window:
            seen = (positions > first_query - window) | (positions < sinks)
        keys = torch.zeros(kv_len, hkv, d, dtype=torch.float64)
        values = torch.zeros_like(keys)
        readable = torch.zeros(kv_len, dtype=torch.bool)
        pages_read = []
        for page in range((kv_len + page_size - 1) // page_size):
            lo, hi = page * page_size, min((page + 1) * page_size, kv_len)
            if not seen[lo:hi].any():
                continue  # no query sees it: neither read nor faulted
            source = _page_source(pool, host_pool, page_table, row, page)
            if source is None:
                if not faults:
                    raise ValueError(f"page {page} of sequence {row} is not readable and faults are off")
                faulted.add((row, page))
                continue
            keys[lo:hi] = source[layer, 0, :, : hi - lo].transpose(0, 1).double()
            values[lo:hi] = source[layer, 1, :, : hi - lo].transpose(0, 1).double()
            readable[lo:hi] = True
            pages_read.append(page)
        mask = readable & seen
        keys[~mask] = 0  # never read, so whatever the pool holds there (NaN) stays out
        values[~mask] = 0
        o, l, probs = _attention_float64(query[begin:end], keys, values, scale, first_query, window, sinks, mask)
        out[begin:end], lse[begin:end] = o, l
        # [T], summed over query heads; a head whose softmax is NaN (a NaN score) adds nothing.
        newest = probs[:, -1, :].nan_to_num(nan=0.0).sum(dim=0)
        for page in pages_read:
            telemetry[row, page] += newest[page * page_size : (page + 1) * page_size].sum()
    return out.to(query.dtype), lse, sorted(faulted), telemetry


def merge_states(outputs, lses):
    """Reference of ops.merge_states in float64: ([N, H, D] in outputs' dtype, float32 [N, H])."""
    lse = torch.logsumexp(lses.double(), dim=0)  # -inf where every partial is empty, NaN after a NaN
    weights = torch.where(torch.isneginf(lse), 0.0, torch.exp(lses.double() - lse))
    empty = torch.isneginf(lses)[..., None]
    terms = torch.where(empty, 0.0, weights[..., None] * outputs.double())
    return terms.sum(dim=0).to(outputs.dtype), lse.float()
