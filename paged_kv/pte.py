"""Page-table entry encoding, the Python twin of csrc/core/pte.h.

A PTE is one int32: the tier in the top two bits, an index in the other thirty. A table filled
with UNMAPPED (-1) is fully unmapped.
"""

from __future__ import annotations

import enum

import torch

TIER_SHIFT = 30
INDEX_MASK = (1 << TIER_SHIFT) - 1
MAX_INDEX = INDEX_MASK
UNMAPPED = -1
PAGE_SIZES = (16, 32, 64, 128, 256)


class Tier(enum.IntEnum):
    GPU = 0
    HOST = 1
    DISK = 2
    UNMAPPED = 3


def make_pte(tier: Tier | int, index: int) -> int:
    """The int32 PTE (as a Python int in [-2**31, 2**31)) for `index` in `tier`."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"PTE index must be in [0, {MAX_INDEX}], got {index}")
    tier = Tier(tier)
    word = (int(tier) << TIER_SHIFT) | index
    return word - (1 << 32) if word >= (1 << 31) else word


def pte_tier(pte: int) -> Tier:
    return Tier((pte & 0xFFFFFFFF) >> TIER_SHIFT)


def pte_index(pte: int) -> int:
    return pte & INDEX_MASK


def new_page_table(max_sequences: int, max_pages: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An int32 [max_sequences, max_pages] page table with every page unmapped."""
    return torch.full((max_sequences, max_pages), UNMAPPED, dtype=torch.int32, device=device)


def new_pool(
    num_frames: int,
    num_layers: int,
    num_kv_heads: int,
    page_size: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A frame pool [num_frames, num_layers, 2, num_kv_heads, page_size, head_dim] (uninitialised)."""
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size}")
    return torch.empty(
        (num_frames, num_layers, 2, num_kv_heads, page_size, head_dim), dtype=dtype, device=device
    )
