"""attention under torch.library.opcheck, torch.compile(fullgraph=True) and CUDA graph capture."""

import pytest
import torch

import paged_kv
from paged_kv import reference
from paged_kv.ops import new_fault_queue
from attention_batch import make_batch
from conftest import DEVICES, DTYPES, HAS_CUDA


def _batch(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_batch(device, dtype, 16, 64, 4, 2, [(1, 1), (37, 1), (50, 6)], g, spare_frames=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "faults-host-telemetry"])
def test_opcheck(device, dtype, extras):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes float16 and bfloat16")
    batch = _batch(device, dtype)
    kwargs = dict(scale=0.2, window=30, sinks=2)
    if extras:
        # One page on disk (a fault), one page in the host pool (zero-copy; CPU only, because
        # opcheck copies its arguments into pageable memory, which the GPU cannot read and the
        # CUDA op rejects), telemetry on.
        table = batch.page_table.cpu()
        row = batch.rows[2]
        if device == "cpu":
            frame = paged_kv.pte.pte_index(int(table[row, 1]))
            kwargs.update(host_pool=batch.pool[frame : frame + 1].clone())
            table[row, 1] = paged_kv.make_pte(paged_kv.Tier.HOST, 0)
        table[row, 2] = paged_kv.make_pte(paged_kv.Tier.DISK, 7)
        batch.page_table = table.to(device)
        queue, count = new_fault_queue(4, device)
        kwargs.update(
            fault_queue=queue,
            fault_count=count,
            telemetry=torch.zeros(table.shape, device=device),
        )
    torch.library.opcheck(torch.ops.paged_kv.attention.default, batch.args(), kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fullgraph(device):
    """Attention between other ops compiles with no graph break, gives the eager result and
    updates telemetry and the fault queue in place."""
    dtype = torch.bfloat16
    batch = _batch(device, dtype, seed=3)
    table = batch.page_table.cpu()
    table[batch.rows[2], 0] = paged_kv.make_pte(paged_kv.Tier.DISK, 3)
    batch.page_table = table.to(device)

    def step(query, pool, page_table, sequences, query_starts, kv_lens, queue, count, telemetry):
        out, lse = paged_kv.attention(
            query * 2, pool, page_table, sequences, query_starts, kv_lens, batch.layer,
            batch.max_query_len, fault_queue=queue, fault_count=count, telemetry=telemetry,
            return_lse=True)
        return out.float().sum(dim=-1) + lse

    def fresh_state():
        queue, count = new_fault_queue(4, device)
        return queue, count, torch.zeros(table.shape, device=device)

    inputs = (batch.query, batch.pool, batch.page_table, batch.sequences, batch.query_starts,
              batch.kv_lens)
    eager_state, compiled_state = fresh_state(), fresh_state()
    expected = step(*inputs, *eager_state)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*inputs, *compiled_state)
    torch.testing.assert_close(got, expected)
    for eager, compiled in zip(eager_state, compiled_state):
        torch.testing.assert_close(compiled, eager)
    assert int(compiled_state[1].item()) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_decode_step_in_cuda_graph():
    """One captured decode step replayed after the query and the lengths change in place (the
    new token's K/V appended outside the graph) matches eager attention."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(11)
    # Room in the last page of each sequence for the tokens the steps append.
    batch = make_batch("cuda", dtype, 16, 128, 8, 2, [(40, 1), (70, 1), (3, 1)], g)
    query, kv_lens = batch.query.clone(), batch.kv_lens.clone()

    def args():
        return (query, batch.pool, batch.page_table, batch.sequences, batch.query_starts, kv_lens,
                batch.layer, 1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            paged_kv.attention(*args())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = paged_kv.attention(*args(), return_lse=True)

    for _ in range(3):
        key = torch.randn(3, 2, 128, generator=g).to(dtype).cuda()
        paged_kv.append_kv(key, -key, batch.pool, batch.page_table, batch.sequences, kv_lens,
                           batch.layer)
        kv_lens.add_(1)
        query.copy_(torch.randn(query.shape, generator=g).to(dtype))
        graph.replay()
        want_out, want_lse = paged_kv.attention(*args(), return_lse=True)
        paged_kv.check_errors()
        torch.testing.assert_close(out, want_out, rtol=2 * 2**-8, atol=2 * 2**-8)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)
        ref_out, _, _, _ = reference.paged_attention(
            query, batch.pool, batch.page_table, batch.sequences, batch.query_starts, kv_lens,
            batch.layer)
        torch.testing.assert_close(out.cpu(), ref_out, rtol=2 * 2**-8, atol=2 * 2**-8)
