"""Every bad input to attention gets a clear error naming what is wrong.

The CUDA op never synchronises, so errors found in device data (rows, lengths, PTEs) surface at
the next paged_kv.check_errors(); every call here is followed by one.
"""

import pytest
import torch

import paged_kv
from paged_kv import reference
from paged_kv.ops import new_fault_queue
from conftest import DEVICES, HAS_CUDA, poisoned_pool

PAGE, KV_HEADS, Q_HEADS, DIM, FRAMES, LAYERS = 16, 2, 4, 64, 4, 2


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _setup(device, dtype=None):
    """Float32 on the CPU, bfloat16 on CUDA (its kernel takes no float32) unless `dtype` says.
    Row 0: pages 0-2 in frames 1-3, page 3 on disk. Row 1: page 0 in frame 0, page 1 in host
    slot 5, page 2 in frame 14 (outside the pool), page 3 unmapped. Row 2: unmapped."""
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    pool = poisoned_pool(FRAMES, LAYERS, KV_HEADS, PAGE, DIM, dtype, device)
    pool[:, 0] = torch.randn(pool[:, 0].shape, generator=g).to(dtype).to(device)
    table = paged_kv.new_page_table(3, 4)
    for page in range(3):
        table[0, page] = paged_kv.make_pte(paged_kv.Tier.GPU, page + 1)
    table[0, 3] = paged_kv.make_pte(paged_kv.Tier.DISK, 9)
    table[1, 0] = paged_kv.make_pte(paged_kv.Tier.GPU, 0)
    table[1, 1] = paged_kv.make_pte(paged_kv.Tier.HOST, 5)
    table[1, 2] = paged_kv.make_pte(paged_kv.Tier.GPU, FRAMES + 10)
    query = torch.randn(3, Q_HEADS, DIM, generator=g).to(dtype).to(device)
    return dict(query=query, pool=pool, page_table=table.to(device), sequences=_i32([0, 1], device),
                query_starts=_i32([0, 1, 3], device), kv_lens=_i32([40, 10], device), layer=0,
                max_query_len=2)


def _call(device, args):
    try:
        return paged_kv.attention(**args)
    finally:
        paged_kv.check_errors()  # device-data errors of the CUDA op surface here


def test_setup_is_valid():
    _call("cpu", _setup("cpu"))


# (overrides, CPU message, CUDA message when the CUDA op words it differently)
DEVICE_DATA_CASES = [
    (dict(sequences=[0, 3]), r"batch entry 1: sequence index 3 is outside the page table's 3 rows", None),
    (dict(sequences=[-1, 1]), r"batch entry 0: sequence index -1 is outside the page table's 3 rows", None),
    (dict(query_starts=[1, 1, 3]), r"query_starts\[0\] must be 0, got 1", None),
    (dict(query_starts=[0, 1, 2]), r"query_starts\[2\] \(the last entry\) must equal the number of queries 3, got 2", None),
    (dict(query_starts=[0, 4, 3], max_query_len=4),
     r"batch entry 1: sequence 1 has -1 queries, which must be in \[0, min\(max_query_len, KV length\)\] \(KV length 10\)",
     # Blocks check their entries in any order: entry 0 (past the last query) may report first.
     r"has -?\d+ queries, which must be in \[0, min\(max_query_len, KV length\)\]"),
    (dict(max_query_len=1), r"batch entry 1: sequence 1 has 2 queries, which must be in \[0, min\(max_query_len, KV length\)\] \(KV length 10\)", None),
    (dict(kv_lens=[40, 1]), r"batch entry 1: sequence 1 has 2 queries, .* \(KV length 1\)", None),
    (dict(kv_lens=[65, 10]), r"batch entry 0: KV length 65 of sequence 0 is outside \[0, 64\] \(the page table has 4 pages of 16 tokens per sequence\)", None),
    (dict(kv_lens=[-1, 10]), r"batch entry 0: KV length -1 of sequence 0 is outside \[0, 64\]", None),
    (dict(kv_lens=[40, 20]), r"batch entry 1: page 1 of sequence 1 has PTE \d+ \(host slot 5\), which this call cannot read and no fault queue was given to record it in", None),
    (dict(kv_lens=[64, 10]), r"batch entry 0: page 3 of sequence 0 has PTE -?\d+ \(disk slot 9\), which this call cannot read", None),
    (dict(sequences=[0, 2]), r"batch entry 1: page 0 of sequence 2 has PTE -1 \(unmapped\), which this call cannot read", None),
    (dict(kv_lens=[40, 40], host_slots=8), r"batch entry 1: page 2 of sequence 1 maps to GPU frame 14, outside the pool's 4 frames", None),
    (dict(kv_lens=[40, 20], host_slots=2), r"batch entry 1: page 1 of sequence 1 maps to host slot 5, outside the host pool's 2 slots", None),
    (dict(kv_lens=[40, 20], host_slots=0), r"batch entry 1: page 1 of sequence 1 maps to host slot 5, outside the host pool's 0 slots", None),
    # A fault queue turns unreadable pages into faults, never bad frames into reads.
    (dict(kv_lens=[64, 40], queue=True), r"batch entry 1: page 2 of sequence 1 maps to GPU frame 14, outside the pool's 4 frames", None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overrides, message, cuda_message", DEVICE_DATA_CASES)
def test_bad_device_data(device, overrides, message, cuda_message):
    args = _setup(device)
    overrides = dict(overrides)
    host_slots = overrides.pop("host_slots", None)
    if host_slots is not None:
        host_pool = torch.zeros((host_slots,) + tuple(args["pool"].shape[1:]), dtype=args["pool"].dtype)
        args["host_pool"] = host_pool.pin_memory() if device == "cuda" else host_pool
    telemetry = torch.full(args["page_table"].shape, 0.5, device=device)
    args["telemetry"] = telemetry
    queue, count = new_fault_queue(8, device)
    if overrides.pop("queue", False):
        args.update(fault_queue=queue, fault_count=count)
    for name, value in overrides.items():
        args[name] = _i32(value, device) if isinstance(value, list) else value
    if device == "cuda" and cuda_message is not None:
        message = cuda_message
    with pytest.raises(RuntimeError, match=r"paged_kv.attention: .*" + message):
        _call(device, args)
    if device == "cpu":
        # CPU validates everything before writing: a failed call records nothing.
        assert int(count.item()) == 0 and torch.equal(queue, torch.full_like(queue, -1))
        assert torch.equal(telemetry, torch.full_like(telemetry, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_pages_no_query_sees_are_ignored(device):
    """Pages outside every window are neither read nor checked nor faulted."""
    args = _setup(device)
    table = args["page_table"].cpu()
    table[1, 0] = paged_kv.make_pte(paged_kv.Tier.GPU, 99)  # outside the pool, but unseen
    table[1, 2] = paged_kv.make_pte(paged_kv.Tier.GPU, 2)
    args.update(page_table=table.to(device), kv_lens=_i32([40, 40], device), window=4)
    queue, count = new_fault_queue(4, device)
    out = _call(device, dict(args, fault_queue=queue, fault_count=count))
    assert int(count.item()) == 0
    ref_out, _, ref_faults, _ = reference.paged_attention(
        args["query"], args["pool"], args["page_table"], args["sequences"], args["query_starts"],
        args["kv_lens"], 0, window=4)
    assert ref_faults == []
    tol = 1e-5 if out.dtype == torch.float32 else 2 * 2.0 ** -8  # twice bfloat16's unit roundoff
    torch.testing.assert_close(out.cpu(), ref_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    good = _setup(device, torch.float32)  # argument checks come before the CUDA dtype check
    pool, query, table = good["pool"], good["query"], good["page_table"]
    queue, count = new_fault_queue(4, device)
    telemetry = torch.zeros(table.shape, device=device)
    host_pool = torch.zeros((2,) + tuple(pool.shape[1:]))
    if device == "cuda":
        host_pool = host_pool.pin_memory()
    cases = [
        (dict(pool=pool[0]), r"pool must be \[num_frames, num_layers, 2, num_kv_heads, page_size, head_dim\]"),
        (dict(pool=pool.to(torch.int32)), r"pool must be float16, bfloat16 or float32"),
        (dict(pool=pool.transpose(0, 1)), r"pool must be contiguous"),
        (dict(page_table=table.long()), r"page_table must be int32, got Long"),
        (dict(page_table=table[0]), r"page_table must be \[max_sequences, max_pages\]"),
        (dict(layer=2), r"layer must be in \[0, 2\), got 2"),
        (dict(layer=-1), r"layer must be in \[0, 2\), got -1"),
        (dict(pool=pool[..., :40].contiguous(), query=query[..., :40]), r"head_dim must be 64, 128 or 256, got 40"),
        (dict(query=query[0]), r"query must be \[total_queries, num_q_heads, head_dim\]"),
        (dict(query=query.half()), r"query must have the pool's dtype Float, got Half"),
        (dict(query=torch.cat([query, query], dim=2)), r"query head_dim 128 does not match the pool's 64"),
        (dict(query=query.transpose(1, 2).contiguous().transpose(1, 2)), r"query must be contiguous along head_dim"),
        (dict(query=query[:, :3]), r"query heads \(3\) must be a positive multiple of the pool's KV heads \(2\)"),
        (dict(sequences=good["sequences"][None]), r"sequences must be one-dimensional"),
        (dict(sequences=good["sequences"].long()), r"sequences must be int32, got Long"),
        (dict(query_starts=good["query_starts"][:2]), r"query_starts must be \[batch \+ 1\] = \[3\], got \[2\]"),
        (dict(query_starts=good["query_starts"].long()), r"query_starts must be int32, got Long"),
        (dict(kv_lens=good["kv_lens"][:1]), r"kv_lens must have 2 entries \(one per batch entry\), got 1"),
        (dict(kv_lens=good["kv_lens"].long()), r"kv_lens must be int32, got Long"),
        (dict(max_query_len=0), r"max_query_len must be at least 1, got 0"),
        (dict(scale=0.0), r"scale must be positive and finite, got 0"),
        (dict(scale=-1.0), r"scale must be positive and finite, got -1"),
        (dict(scale=float("inf")), r"scale must be positive and finite, got inf"),
        (dict(scale=float("nan")), r"scale must be positive and finite, got nan"),
        (dict(scale=1e39), r"scale must be positive and finite, got 1e\+39 \(not as a float32\)"),
        (dict(scale=1e-50), r"scale must be positive and finite, got 1e-50 \(not as a float32\)"),
        (dict(window=-1), r"window must be 0 \(none\) or positive, got -1"),
        (dict(window=8, sinks=-1), r"sinks must be 0 or positive, got -1"),
        (dict(sinks=4), r"sinks only make sense with a sliding window \(window > 0\); got sinks=4"),
        (dict(host_pool=host_pool.half()), r"host_pool must have the pool's dtype Float, got Half"),
        (dict(host_pool=host_pool[:, :1]), r"host_pool must be \[num_slots, 2, 2, 2, 16, 64\] to match the pool, got"),
        (dict(host_pool=torch.zeros((2, 2, 2, 2, 64, 16)).transpose(4, 5)), r"host_pool must be contiguous"),
        (dict(fault_queue=queue), r"fault_queue and fault_count must be given together"),
        (dict(fault_count=count), r"fault_queue and fault_count must be given together"),
        (dict(fault_queue=queue[:, 0], fault_count=count), r"fault_queue must be int32 \[capacity, 2\], got Int \[4\]"),
        (dict(fault_queue=queue.long(), fault_count=count), r"fault_queue must be int32 \[capacity, 2\], got Long"),
        (dict(fault_queue=torch.zeros(2, 4, dtype=torch.int32, device=device).t(), fault_count=count), r"fault_queue must be contiguous"),
        (dict(fault_queue=queue, fault_count=count.long()), r"fault_count must be int32 with one element, got Long"),
        (dict(fault_queue=queue, fault_count=queue[0]), r"fault_count must be int32 with one element, got Int \[2\]"),
        (dict(telemetry=telemetry.double()), r"telemetry must be float32, got Double"),
        (dict(telemetry=telemetry[:, :2]), r"telemetry must be \[3, 4\] like the page table, got \[3, 2\]"),
        (dict(telemetry=torch.zeros(4, 3, device=device).t()), r"telemetry must be contiguous"),
    ]
    # None for a tensor the op needs is named as such, not read as an empty tensor.
    cases += [(dict([(name, None)]), name + " must be a tensor, got None")
              for name in ("query", "pool", "page_table", "sequences", "query_starts", "kv_lens")]
    for override, message in cases:
        args = dict(good)
        args.update(override)
        with pytest.raises(RuntimeError, match=r"paged_kv.attention: " + message):
            _call(device, args)


def test_cpu_kernel_refuses_a_negative_fault_count():
    # The faults of the call would go unrecorded while the count read back as fewer. (The CUDA
    # op cannot read the count without a synchronisation; read_faults refuses it there.)
    args = _setup("cpu")
    queue, count = new_fault_queue(4, "cpu")
    count.fill_(-1)
    with pytest.raises(RuntimeError, match=r"paged_kv.attention: fault_count is -1: it must start at 0"):
        _call("cpu", dict(args, fault_queue=queue, fault_count=count))
    assert count.item() == -1 and bool((queue == -1).all())  # nothing was written


def test_read_faults_refuses_what_it_cannot_read():
    queue, count = new_fault_queue(4, "cpu")
    count.fill_(-1)
    with pytest.raises(RuntimeError, match=r"read_faults: fault_count is -1"):
        paged_kv.ops.read_faults(queue, count)
    count.fill_(0)
    with pytest.raises(ValueError, match=r"read_faults: fault_queue must be \[capacity, 2\], got \[8\]"):
        paged_kv.ops.read_faults(queue.view(-1), count)
    with pytest.raises(ValueError, match=r"read_faults: fault_count must hold one element, got \[2\]"):
        paged_kv.ops.read_faults(queue, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"read_faults: fault_count must be an int32 \[1\] tensor"):
        paged_kv.ops.read_faults(queue, count.float())
    with pytest.raises(TypeError, match=r"read_faults: fault_queue must be an int32 \[capacity, 2\] tensor"):
        paged_kv.ops.read_faults(None, count)
    for capacity, error in ((None, TypeError), (True, TypeError), (2.5, TypeError), (0, ValueError)):
        with pytest.raises(error, match=r"new_fault_queue: capacity must be"):
            new_fault_queue(capacity, "cpu")


def test_a_meta_tensor_among_real_ones_is_refused():
    # One meta tensor sends the call to the fake kernel, which must not hand back uninitialised
    # memory as if the op had run.
    args = _setup("cpu")
    queue, count = new_fault_queue(4, "cpu")
    for name, extra in (("kv_lens", {}), ("fault_count", dict(fault_queue=queue, fault_count=count))):
        call = dict(args, **extra)
        call[name] = call[name].to("meta")
        with pytest.raises(RuntimeError, match=rf"paged_kv.attention: {name} must be on the device of pool \(cpu\), got meta"):
            _call("cpu", call)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_wrong_device_and_memory():
    good = _setup("cuda", torch.bfloat16)
    queue, count = new_fault_queue(4, "cuda")
    telemetry = torch.zeros(good["page_table"].shape, device="cuda")
    host_pool = torch.zeros((2,) + tuple(good["pool"].shape[1:]), dtype=torch.bfloat16)
    cases = [
        (dict(query=good["query"].cpu()), r"query must be on the pool's device cuda:0, got cpu"),
        (dict(page_table=good["page_table"].cpu()), r"page_table must be on the pool's device"),
        (dict(sequences=good["sequences"].cpu()), r"sequences must be on the pool's device"),
        (dict(query_starts=good["query_starts"].cpu()), r"query_starts must be on the pool's device"),
        (dict(kv_lens=good["kv_lens"].cpu()), r"kv_lens must be on the pool's device"),
        (dict(fault_queue=queue.cpu(), fault_count=count), r"fault_queue must be on the pool's device"),
        (dict(fault_queue=queue, fault_count=count.cpu()), r"fault_count must be on the pool's device"),
        (dict(telemetry=telemetry.cpu()), r"telemetry must be on the pool's device"),
        (dict(host_pool=host_pool.cuda()), r"a host_pool on the GPU must be a mapped view of pinned host "
                                           r"memory \(paged_kv.ops.mapped_host_view\); this one is GPU memory"),
        (dict(host_pool=host_pool), r"host_pool must be in pinned memory for the GPU to read it"),
    ]
    for override, message in cases:
        args = dict(good)
        args.update(override)
        with pytest.raises(RuntimeError, match=r"paged_kv.attention: " + message):
            _call("cuda", args)
    on_cpu = _setup("cpu", torch.bfloat16)
    view = paged_kv.ops.mapped_host_view(torch.zeros((2,) + tuple(on_cpu["pool"].shape[1:]),
                                                     dtype=torch.bfloat16).pin_memory())
    with pytest.raises(RuntimeError, match=r"host_pool must be a pinned CPU tensor or its mapped view on the "
                                           r"pool's device cpu \(paged_kv.ops.mapped_host_view\), got a tensor on cuda:0"):
        _call("cpu", dict(on_cpu, host_pool=view))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_mapped_host_view_refuses_what_it_cannot_map():
    from paged_kv.ops import mapped_host_view

    with pytest.raises(RuntimeError, match=r"paged_kv.mapped_host_view: the tensor must be in pinned"):
        mapped_host_view(torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"expects a CPU tensor in pinned memory, got one on cuda:0"):
        mapped_host_view(torch.zeros(4, device="cuda"))
    with pytest.raises(RuntimeError, match=r"no CUDA device 64 \("):
        mapped_host_view(torch.zeros(4).pin_memory(), 64)
    with pytest.raises(ValueError, match=r"device must be a CUDA device, got cpu"):
        mapped_host_view(torch.zeros(4).pin_memory(), "cpu")
    with pytest.raises(TypeError, match=r"host must be a torch.Tensor, got list"):
        mapped_host_view([1.0])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_rejects_float32():
    with pytest.raises(RuntimeError, match=r"paged_kv.attention: .*(float16|bfloat16|Float)"):
        _call("cuda", _setup("cuda", torch.float32))
