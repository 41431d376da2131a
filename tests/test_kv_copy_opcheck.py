"""torch.library.opcheck for every op, and the ops inside torch.compile(fullgraph=True)."""

import pytest
import torch

import paged_kv
from conftest import DEVICES, DTYPES, random_page_table


def _inputs(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    page_size, heads, dim, layers = 16, 2, 64, 2
    lengths = [5, 40]
    pages = [(n + page_size - 1) // page_size for n in lengths]
    table = random_page_table(len(lengths), pages, sum(pages) + 1, g, device)
    pool = torch.randn(sum(pages) + 1, layers, 2, heads, page_size, dim, generator=g).to(dtype).to(device)
    seqs = torch.tensor([0] * 5 + [1] * 40, dtype=torch.int32, device=device)
    pos = torch.tensor(list(range(5)) + list(range(40)), dtype=torch.int32, device=device)
    key = torch.randn(45, heads, dim, generator=g).to(dtype).to(device)
    value = torch.randn(45, heads, dim, generator=g).to(dtype).to(device)
    return key, value, pool, table, seqs, pos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    key, value, pool, table, seqs, pos = _inputs(device, dtype)
    torch.library.opcheck(torch.ops.paged_kv.append_kv.default, (key, value, pool, table, seqs, pos, 1))
    pages = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.paged_kv.gather_kv.default, (pool, table, 1, pages, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fullgraph(device):
    """A decode-style step (append then gather, with arithmetic around it) compiles with no
    graph break and gives the eager result."""
    key, value, pool, table, seqs, pos = _inputs(device, torch.float32, seed=3)
    pages = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)

    def step(key, value, pool, table, seqs, pos, pages):
        paged_kv.append_kv(key * 2, value + 1, pool, table, seqs, pos, 1)
        k, v = paged_kv.gather_kv(pool, table, 1, pages, 1)
        return (k[:40] * v[:40]).sum(dim=-1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    pool_eager = pool.clone()
    expected = step(key, value, pool_eager, table, seqs, pos, pages)
    got = compiled(key, value, pool, table, seqs, pos, pages)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(pool, pool_eager)
