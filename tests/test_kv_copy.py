"""append_kv and gather_kv against the plain PyTorch reference, on CPU and CUDA."""

import pytest
import torch

import paged_kv
from paged_kv import reference
from conftest import DEVICES, DTYPES, HAS_CUDA, PAGE_SIZES, SEEDS, poisoned_pool, random_page_table, same_bits

HEAD_DIMS = [64, 128, 40]


def _random_tokens(lengths, page_size, generator):
    """Every position of every sequence once, in a random order: [T] sequences and positions."""
    seqs = torch.cat([torch.full((n,), s, dtype=torch.int32) for s, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
    order = torch.randperm(seqs.numel(), generator=generator)
    return seqs[order], pos[order]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_append_then_gather_matches_reference(device, dtype, page_size, seed):
    g = torch.Generator().manual_seed(seed * 1000 + page_size)
    num_layers = int(torch.randint(1, 4, (1,), generator=g))
    num_kv_heads = int(torch.randint(1, 5, (1,), generator=g))
    head_dim = HEAD_DIMS[int(torch.randint(0, len(HEAD_DIMS), (1,), generator=g))]
    num_seqs = int(torch.randint(1, 4, (1,), generator=g))
    # Lengths include 1 and lengths that end mid-page.
    lengths = [1] + [int(torch.randint(1, 3 * page_size, (1,), generator=g)) for _ in range(num_seqs - 1)]
    pages = [(n + page_size - 1) // page_size for n in lengths]
    num_frames = sum(pages) + 3
    layer = int(torch.randint(0, num_layers, (1,), generator=g))

    table = random_page_table(num_seqs, pages, num_frames, g, device)
    seqs, pos = _random_tokens(lengths, page_size, g)
    key = torch.randn(len(seqs), num_kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(len(seqs), num_kv_heads, head_dim, generator=g).to(dtype)

    pool = poisoned_pool(num_frames, num_layers, num_kv_heads, page_size, head_dim, dtype, device)
    expected = pool.cpu().clone()
    paged_kv.append_kv(key.to(device), value.to(device), pool, table, seqs.to(device), pos.to(device), layer)
    reference.append_kv(key, value, expected, table.cpu(), seqs, pos, layer)
    # Bit-exact, NaN included: untouched rows stay poisoned, written rows hold the input.
    assert same_bits(pool.cpu(), expected)

    for s, n in enumerate(lengths):
        subset = torch.randperm(pages[s], generator=g)[: max(1, pages[s] // 2 + 1)].to(torch.int32)
        k_out, v_out = paged_kv.gather_kv(pool, table, s, subset.to(device), layer)
        k_ref, v_ref = reference.gather_kv(expected, table.cpu(), s, subset, layer)
        assert k_out.shape == (len(subset) * page_size, num_kv_heads, head_dim)
        torch.testing.assert_close(k_out.cpu(), k_ref, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(v_out.cpu(), v_ref, rtol=0, atol=0, equal_nan=True)
        # The written part of each page is finite and equals what went in.
        full_k, full_v = paged_kv.gather_kv(pool, table, s, torch.arange(pages[s], dtype=torch.int32, device=device), layer)
        mask = seqs == s
        order = pos[mask].long()
        assert torch.isfinite(full_k[:n].float()).all()
        torch.testing.assert_close(full_k.cpu()[order], key[mask], rtol=0, atol=0)
        torch.testing.assert_close(full_v.cpu()[order], value[mask], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_append_from_strided_projection(device, dtype):
    """K and V sliced out of a fused QKV projection (non-contiguous views) are read correctly."""
    g = torch.Generator().manual_seed(7)
    tokens, hq, hkv, d, page_size = 37, 4, 2, 64, 16
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    key = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    value = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    assert not key.is_contiguous()
    pages = (tokens + page_size - 1) // page_size
    table = random_page_table(1, [pages], pages + 2, g, device)
    pool = poisoned_pool(pages + 2, 2, hkv, page_size, d, dtype, device)
    seqs = torch.zeros(tokens, dtype=torch.int32, device=device)
    pos = torch.arange(tokens, dtype=torch.int32, device=device)
    paged_kv.append_kv(key, value, pool, table, seqs, pos, 1)
    k_out, v_out = paged_kv.gather_kv(pool, table, 0, torch.arange(pages, dtype=torch.int32, device=device), 1)
    torch.testing.assert_close(k_out[:tokens], key, rtol=0, atol=0)
    torch.testing.assert_close(v_out[:tokens], value, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    pool = poisoned_pool(2, 1, 1, 16, 8, torch.float32, device)
    table = paged_kv.new_page_table(1, 1, device)
    empty = torch.empty(0, 1, 8, device=device)
    none = torch.empty(0, dtype=torch.int32, device=device)
    paged_kv.append_kv(empty, empty, pool, table, none, none, 0)
    k, v = paged_kv.gather_kv(pool, table, 0, none, 0)
    assert k.shape == (0, 1, 8) and v.shape == (0, 1, 8)
    assert torch.isnan(pool).all()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_pool_over_4gib_offsets():
    """Frames past 4 GiB of pool are addressed correctly (64-bit offsets)."""
    page_size, heads, d = 256, 8, 128
    frame_bytes = 2 * heads * page_size * d * 2  # one layer, bf16: 1 MiB
    num_frames = (5 << 30) // frame_bytes
    pool = paged_kv.new_pool(num_frames, 1, heads, page_size, d, torch.bfloat16, "cuda")
    table = paged_kv.new_page_table(1, 1, "cuda")
    table[0, 0] = paged_kv.make_pte(paged_kv.Tier.GPU, num_frames - 1)
    key = torch.randn(page_size, heads, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(page_size, dtype=torch.int32, device="cuda")
    paged_kv.append_kv(key, -key, pool, table, torch.zeros_like(pos), pos, 0)
    torch.testing.assert_close(pool[num_frames - 1, 0, 0].transpose(0, 1), key, rtol=0, atol=0)
    k, v = paged_kv.gather_kv(pool, table, 0, torch.zeros(1, dtype=torch.int32, device="cuda"), 0)
    torch.testing.assert_close(v, -key, rtol=0, atol=0)
