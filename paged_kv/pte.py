"""Page-table entry encoding, the Python twin of csrc/core/pte.h.

A PTE is one int32: the tier in the top two bits, an index in the other thirty. A table filled
with UNMAPPED (-1) is fully unmapped.
"""

from __future__ import annotations

import enum
import numbers

import torch

TIER_SHIFT = 30
INDEX_MASK = (1 << TIER_SHIFT) - 1
MAX_INDEX = INDEX_MASK
UNMAPPED = -1
PAGE_SIZES = (16, 32, 64, 128, 256)
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # CUDA attention takes no float32


class Tier(enum.IntEnum):
    GPU = 0
    HOST = 1
    DISK = 2
    UNMAPPED = 3


def exact_int(what: str, value) -> int:
    """`value` as an int: Python and NumPy integers pass; bools, floats and tensors, whose int()
    would round or pass silently, are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def make_pte(tier: Tier | int, index: int) -> int:
    """The int32 PTE (as a Python int in [-2**31, 2**31)) for `index` in `tier`."""
    index = exact_int("PTE index", index)
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"PTE index must be in [0, {MAX_INDEX}], got {index}")
    tier = exact_int("PTE tier", tier)
    if tier not in set(Tier):
        raise ValueError(f"PTE tier must be one of {[int(t) for t in Tier]} ({', '.join(t.name for t in Tier)}), got {tier}")
    word = (int(tier) << TIER_SHIFT) | index
    return word - (1 << 32) if word >= (1 << 31) else word


def _int32_word(pte) -> int:
    pte = exact_int("PTE", pte)
    if not -(1 << 31) <= pte < (1 << 31):
        raise ValueError(f"a PTE is an int32, in [-2**31, 2**31), got {pte}")
    return pte


def pte_tier(pte: int) -> Tier:
    return Tier((_int32_word(pte) & 0xFFFFFFFF) >> TIER_SHIFT)


def pte_index(pte: int) -> int:
    return _int32_word(pte) & INDEX_MASK


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
    counts = {"num_frames": num_frames, "num_layers": num_layers, "num_kv_heads": num_kv_heads,
              "head_dim": head_dim}
    counts = {name: exact_int(name, value) for name, value in counts.items()}
    for name, value in counts.items():
        least = 0 if name == "num_frames" else 1
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if dtype not in KV_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in KV_DTYPES]} (the ops' K/V types), got {dtype}")
    return torch.empty(
        (counts["num_frames"], counts["num_layers"], 2, counts["num_kv_heads"], page_size, counts["head_dim"]),
        dtype=dtype, device=device,
    )
