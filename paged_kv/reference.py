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


def attention(query, key, value, scale: float | None = None, causal_offset: int | None = None):
    """Exact attention in float64 over contiguous K/V, with grouped query heads.

    Args:
        query: [Q, Hq, D] queries (Q new tokens); key, value: [T, Hkv, D], Hq a multiple of Hkv.
        scale: softmax scale, default 1/sqrt(D).
        causal_offset: when given, query i sits at position causal_offset + i and sees keys at
            positions <= its own; when None every query sees every key.
    Returns:
        output [Q, Hq, D] in query's dtype, and the log-sum-exp [Q, Hq] in float64.
    """
    q, k, v = query.double(), key.double(), value.double()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,thd->hqt", q, k) * scale
    if causal_offset is not None:
        qpos = causal_offset + torch.arange(q.shape[0], device=q.device)[:, None]
        kpos = torch.arange(k.shape[0], device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Q]
    out = torch.einsum("hqt,thd->qhd", torch.exp(scores - lse[..., None]), v)
    return out.to(query.dtype), lse.transpose(0, 1)


def merge_states(outputs, lses):
    """Reference of ops.merge_states in float64: ([N, H, D] in outputs' dtype, float32 [N, H])."""
    lse = torch.logsumexp(lses.double(), dim=0)  # -inf where every partial is empty
    weights = torch.exp(lses.double() - lse).nan_to_num(nan=0.0)  # -inf - -inf: empty rows
    empty = torch.isneginf(lses)[..., None]
    terms = torch.where(empty, 0.0, weights[..., None] * outputs.double())
    return terms.sum(dim=0).to(outputs.dtype), lse.float()
