import re

import pytest
import torch

import paged_kv

if paged_kv.LIBRARY_ERROR:
    raise RuntimeError(paged_kv.LIBRARY_ERROR)

HAS_CUDA = torch.cuda.is_available() and paged_kv.build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build"))]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
PAGE_SIZES = list(paged_kv.PAGE_SIZES)
SEEDS = [0, 1]


def pytest_addoption(parser):
    parser.addoption("--share", metavar="K/N", default=None,
                     help="run only the K-th of N shares of the selected tests: every N-th test from "
                          "the K-th, so the shares of one run take about the same time")


@pytest.hookimpl(trylast=True)  # after -k and -m, so the shares split what those select
def pytest_collection_modifyitems(config, items):
    share = config.getoption("--share")
    if share is None:
        return
    match = re.fullmatch(r"(\d+)/(\d+)", share)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise pytest.UsageError(f"--share {share!r}: expected K/N with 1 <= K <= N")
    k, n = int(match[1]), int(match[2])
    kept = [item for i, item in enumerate(items) if i % n == k - 1]
    dropped = [item for i, item in enumerate(items) if i % n != k - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def engine_dtype(device):
    """The K/V dtype the engine tests use: float32 on the CPU, bfloat16 on CUDA."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def engine_tolerance(dtype):
    """float32 near-exact; a low precision twice its unit roundoff."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    u = torch.finfo(dtype).eps / 2
    return dict(rtol=2 * u, atol=2 * u)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: on a small CPU, threads only contend (a
    float64 reference step takes ten times longer with two threads than with one on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poisoned_pool(num_frames, num_layers, num_kv_heads, page_size, head_dim, dtype, device):
    """A pool filled with NaN, so any read of memory nothing wrote shows up in the result."""
    pool = paged_kv.new_pool(num_frames, num_layers, num_kv_heads, page_size, head_dim, dtype, device)
    return pool.fill_(float("nan"))


def random_page_table(max_sequences, pages_per_sequence, num_frames, generator, device):
    """Maps pages_per_sequence[s] pages of each sequence to distinct random frames."""
    assert sum(pages_per_sequence) <= num_frames
    table = paged_kv.new_page_table(max_sequences, max(max(pages_per_sequence), 1))
    frames = torch.randperm(num_frames, generator=generator).tolist()
    for s, n in enumerate(pages_per_sequence):
        for p in range(n):
            table[s, p] = paged_kv.make_pte(paged_kv.Tier.GPU, frames.pop())
    return table.to(device)


def same_bits(a, b):
    """Bitwise equality (NaN payloads included) of two tensors of one dtype."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


@pytest.fixture(params=["default", "mma"])
def prefill_kernel(request, monkeypatch):
    """Runs a test with the default prefill kernel (wgmma on Hopper) and, on CUDA, again with the
    portable mma.sync one that other GPUs use (PAGED_KV_PREFILL_KERNEL=mma)."""
    if request.param == "mma":
        device = request.node.callspec.params.get("device")
        if device != "cuda":
            pytest.skip("the prefill kernel choice is a CUDA matter")
        monkeypatch.setenv("PAGED_KV_PREFILL_KERNEL", "mma")
    return request.param
