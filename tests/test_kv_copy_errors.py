"""Every bad input to append_kv and gather_kv gets a clear error naming what is wrong."""

import pytest
import torch

import paged_kv
from conftest import DEVICES, HAS_CUDA, poisoned_pool

PAGE, HEADS, DIM, FRAMES = 16, 2, 8, 4


def _setup(device, dtype=torch.float32):
    pool = poisoned_pool(FRAMES, 2, HEADS, PAGE, DIM, dtype, device)
    table = paged_kv.new_page_table(2, 4, device)
    table[0, 0] = paged_kv.make_pte(paged_kv.Tier.GPU, 1)
    table[0, 1] = paged_kv.make_pte(paged_kv.Tier.HOST, 5)
    table[0, 2] = paged_kv.make_pte(paged_kv.Tier.DISK, 9)
    table[1, 0] = paged_kv.make_pte(paged_kv.Tier.GPU, FRAMES + 10)  # outside the pool
    key = torch.randn(3, HEADS, DIM, dtype=dtype, device=device)
    return pool, table, key


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _append(device, seqs, positions, **overrides):
    pool, table, key = _setup(device)
    args = dict(key=key, value=key.clone(), pool=pool, page_table=table,
                sequences=_i32(seqs, device), positions=_i32(positions, device), layer=0)
    args.update(overrides)
    before = pool.clone()
    try:
        paged_kv.append_kv(**args)
    finally:
        if device == "cpu":
            # CPU validates everything before writing: a failed op leaves the pool untouched.
            assert torch.equal(before.isnan(), pool.isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "seqs, positions, message",
    [
        ([0, 0, 0], [0, 1, 16], r"token 2: position 16 of sequence 0 \(page 1\) has PTE .* \(host slot 5\), which this op cannot read"),
        ([0, 0, 0], [0, 40, 1], r"token 1: position 40 of sequence 0 \(page 2\) has PTE .* \(disk slot 9\)"),
        ([0, 0, 0], [0, 1, 50], r"token 2: position 50 of sequence 0 \(page 3\) has PTE -1 \(unmapped\)"),
        ([0, 0, 0], [0, 1, 64], r"token 2: position 64 of sequence 0 is outside \[0, 64\)"),
        ([0, 0, 0], [-1, 1, 2], r"token 0: position -1 of sequence 0 is outside"),
        ([0, 2, 0], [0, 1, 2], r"token 1: sequence index 2 is outside the page table's 2 rows"),
        ([0, -1, 0], [0, 1, 2], r"token 1: sequence index -1 is outside"),
        ([0, 1, 0], [0, 1, 2], r"token 1: position 1 of sequence 1 \(page 0\) maps to GPU frame 14, outside the pool's 4 frames"),
    ],
)
def test_append_bad_page_table_entries(device, seqs, positions, message):
    with pytest.raises(RuntimeError, match=r"paged_kv.append_kv: " + message):
        _append(device, seqs, positions)


@pytest.mark.parametrize("device", DEVICES)
def test_append_bad_arguments(device):
    pool, table, key = _setup(device)
    seqs, pos = _i32([0, 0, 0], device), _i32([0, 1, 2], device)
    cases = [
        (dict(key=key.half()), r"key must have the pool's dtype Float, got Half"),
        (dict(key=key[:, :1]), r"key must be \[num_tokens, 2, 8\] to match the pool"),
        (dict(value=key[:2]), r"key has 3 tokens but value has 2"),
        (dict(key=key.transpose(1, 2).contiguous().transpose(1, 2)), r"key must be contiguous along head_dim"),
        (dict(positions=pos.long()), r"positions must be int32, got Long"),
        (dict(sequences=seqs[:2]), r"sequences must have 3 entries \(one per token\), got 2"),
        (dict(key=None), r"paged_kv.append_kv: key must be a tensor, got None"),
        (dict(positions=None), r"paged_kv.append_kv: positions must be a tensor, got None"),
        (dict(page_table=None), r"paged_kv.append_kv: page_table must be a tensor, got None"),
        (dict(pool=None), r"paged_kv.append_kv: pool must be a tensor, got None"),
        (dict(page_table=table.long()), r"page_table must be int32"),
        (dict(page_table=table[0]), r"page_table must be \[max_sequences, max_pages\]"),
        (dict(pool=pool[:, :, :, :, :, :4].contiguous()), r"key must be \[num_tokens, 2, 4\]"),
        (dict(pool=pool[0]), r"pool must be \[num_frames, num_layers, 2, num_kv_heads, page_size, head_dim\]"),
        (dict(pool=pool.to(torch.int32)), r"pool must be float16, bfloat16 or float32"),
        (dict(layer=2), r"layer must be in \[0, 2\), got 2"),
        (dict(layer=-1), r"layer must be in \[0, 2\), got -1"),
    ]
    for override, message in cases:
        args = dict(key=key, value=key.clone(), pool=pool, page_table=table, sequences=seqs, positions=pos, layer=0)
        args.update(override)
        with pytest.raises(RuntimeError, match=message):
            paged_kv.append_kv(**args)
    bad_page = torch.empty(FRAMES, 1, 2, HEADS, 24, DIM, device=device)
    with pytest.raises(RuntimeError, match=r"page size \(pool dimension 4\) must be 16, 32, 64, 128 or 256, got 24"):
        paged_kv.append_kv(key, key, bad_page, table, seqs, pos, 0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_wrong_device():
    pool, table, key = _setup("cuda")
    seqs, pos = _i32([0, 0, 0], "cuda"), _i32([0, 1, 2], "cuda")
    with pytest.raises(RuntimeError, match=r"key must be on the pool's device cuda:0, got cpu"):
        paged_kv.append_kv(key.cpu(), key, pool, table, seqs, pos, 0)
    with pytest.raises(RuntimeError, match=r"page_table must be on the pool's device"):
        paged_kv.append_kv(key, key, pool, table.cpu(), seqs, pos, 0)
    with pytest.raises(RuntimeError, match=r"positions must be on the pool's device"):
        paged_kv.append_kv(key, key, pool, table, seqs, pos.cpu(), 0)
    with pytest.raises(RuntimeError, match=r"pages must be on the pool's device"):
        paged_kv.gather_kv(pool, table, 0, pos.cpu(), 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "pages, message",
    [
        ([0, 1], r"requested page 1: page 1 of sequence 0 has PTE .* \(host slot 5\), which this op cannot read"),
        ([2], r"requested page 0: page 2 of sequence 0 has PTE .* \(disk slot 9\)"),
        ([0, 3], r"requested page 1: page 3 of sequence 0 has PTE -1 \(unmapped\)"),
        ([4], r"requested page 0: logical page 4 of sequence 0 is outside the page table's 4 columns"),
        ([0, -2], r"requested page 1: logical page -2 of sequence 0 is outside"),
    ],
)
def test_gather_bad_pages(device, pages, message):
    pool, table, _ = _setup(device)
    with pytest.raises(RuntimeError, match=r"paged_kv.gather_kv: " + message):
        paged_kv.gather_kv(pool, table, 0, _i32(pages, device), 0)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_bad_arguments(device):
    pool, table, _ = _setup(device)
    with pytest.raises(RuntimeError, match=r"paged_kv.gather_kv: page 0 of sequence 1 maps to GPU frame 14|requested page 0: page 0 of sequence 1 maps to GPU frame 14"):
        paged_kv.gather_kv(pool, table, 1, _i32([0], device), 0)
    with pytest.raises(RuntimeError, match=r"sequence must be in \[0, 2\), got 2"):
        paged_kv.gather_kv(pool, table, 2, _i32([0], device), 0)
    with pytest.raises(RuntimeError, match=r"pages must be int32, got Long"):
        paged_kv.gather_kv(pool, table, 0, torch.zeros(1, dtype=torch.long, device=device), 0)
    with pytest.raises(RuntimeError, match=r"layer must be in \[0, 2\), got 5"):
        paged_kv.gather_kv(pool, table, 0, _i32([0], device), 5)
    with pytest.raises(RuntimeError, match=r"paged_kv.gather_kv: pages must be a tensor, got None"):
        paged_kv.gather_kv(pool, table, 0, None, 0)


def test_meta_tensors_among_real_ones_are_refused():
    # One meta tensor sends the call to the fake kernel: it must refuse, not skip the write or
    # hand back uninitialised memory as if the op had run.
    pool, table, key = _setup("cpu")
    seqs, pos = _i32([0, 0, 0], "cpu"), _i32([0, 1, 2], "cpu")
    before = pool.clone()
    with pytest.raises(RuntimeError, match=r"paged_kv.append_kv: key must be on the device of pool \(cpu\), got meta"):
        paged_kv.append_kv(key.to("meta"), key, pool, table, seqs, pos, 0)
    assert torch.equal(pool.nan_to_num(), before.nan_to_num())
    with pytest.raises(RuntimeError, match=r"paged_kv.gather_kv: pages must be on the device of pool \(cpu\), got meta"):
        paged_kv.gather_kv(pool, table, 0, _i32([0], "cpu").to("meta"), 0)
    # All on meta (shape inference) still works, and a pool of the wrong rank is named there too.
    meta_pool, meta_table, meta_pages = pool.to("meta"), table.to("meta"), _i32([0, 1], "cpu").to("meta")
    k, v = paged_kv.gather_kv(meta_pool, meta_table, 0, meta_pages, 0)
    assert k.shape == v.shape == (2 * PAGE, HEADS, DIM) and k.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"paged_kv.gather_kv: pool must have 6 dimensions, got 5"):
        paged_kv.gather_kv(meta_pool[0], meta_table, 0, meta_pages, 0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_deferred_checks_report_on_next_check():
    """With synchronous checks off the op does not wait; the error surfaces at check_errors()
    and the bad page's output rows are NaN, never another page's data."""
    pool, table, _ = _setup("cuda")
    with pytest.raises(RuntimeError, match=r"requested page 1: page 1 of sequence 0 has PTE"):
        with paged_kv.deferred_checks():
            k, _ = paged_kv.gather_kv(pool, table, 0, _i32([0, 1], "cuda"), 0)
    assert torch.isnan(k[PAGE:]).all()
    # The error was consumed: the next good call succeeds.
    paged_kv.gather_kv(pool, table, 0, _i32([0], "cuda"), 0)
    paged_kv.check_errors()


@pytest.mark.skipif(not paged_kv.build_info()["cuda"], reason="needs a CUDA build (the setting lives in its library)")
def test_deferred_checks_are_the_calling_threads():
    """Deferring checks in one thread leaves another thread's ops checking synchronously."""
    import threading

    seen = []
    with paged_kv.deferred_checks():
        assert not paged_kv.ops.sync_checks()
        worker = threading.Thread(target=lambda: seen.append(paged_kv.ops.sync_checks()))
        worker.start()
        worker.join()
    assert seen == [True] and paged_kv.ops.sync_checks()
