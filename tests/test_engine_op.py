"""torch.ops.paged_kv.engine_attention: the engine's attention step as one operator, with the
fault service inside it; called directly, under torch.library.opcheck and inside
torch.compile(fullgraph=True), over contexts ten times the GPU frames."""

from __future__ import annotations

import pytest
import torch

from paged_kv import Tier, engine_op

from conftest import DEVICES
from test_engine import HEAD_DIM, LAYERS, PAGE_SIZE, Q_HEADS, Model, _engine, _generator, _policy, _tiers


def _filled(device, zero_copy=False, rows=(0,), length=10 * 6 * PAGE_SIZE):
    """An engine whose one sequence spans ten times its 6 GPU frames (the rest on host)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    engine = _engine(_policy(dtype, host_pages=2 * 64, zero_copy=zero_copy), device)
    model = Model(engine, _generator("engine_op", device, zero_copy))
    for _ in rows:
        engine.new_sequence()
    model.fill(list(rows), length, 3 * PAGE_SIZE)
    return engine, model


def _query(model, n):
    return torch.randn(n, Q_HEADS, HEAD_DIM, generator=model.g).to(model.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_op_services_faults_and_is_exact(device):
    engine, model = _filled(device)
    with engine:
        assert _tiers(engine, 0).count(Tier.HOST) > len(_tiers(engine, 0)) // 2
        before = engine.stats()["fault_services"]
        for layer in range(LAYERS):
            query = _query(model, 1)
            out, lse = torch.ops.paged_kv.engine_attention(
                query.to(device), engine.pool, engine.page_table, engine.op_id, [0], [0, 1], layer)
            model.check(query, [0], [0, 1], layer, out, lse)
        assert engine.stats()["fault_services"] == before + LAYERS


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_services_faults_without_graph_break(device):
    """A decode step (query projection, attention over a context mostly on host, output
    arithmetic) compiles whole; each call services its faults and matches eager."""
    engine, model = _filled(device)
    with engine:
        weight = torch.randn(Q_HEADS * HEAD_DIM, Q_HEADS * HEAD_DIM, generator=model.g).to(model.dtype).to(device)
        weight /= (Q_HEADS * HEAD_DIM) ** 0.5

        def step(x, layer: int):
            query = (x @ weight).view(1, Q_HEADS, HEAD_DIM)
            out, lse = torch.ops.paged_kv.engine_attention(
                query, engine.pool, engine.page_table, engine.op_id, [0], [0, 1], layer)
            return query, out, lse, out * 2 + 1

        compiled = torch.compile(step, fullgraph=True)
        for layer in range(LAYERS):
            x = torch.randn(1, Q_HEADS * HEAD_DIM, generator=model.g).to(model.dtype).to(device)
            services = engine.stats()["fault_services"]
            query, out, lse, after = compiled(x, layer)
            assert engine.stats()["fault_services"] == services + 1, "the compiled call serviced no faults"
            model.check(query.cpu(), [0], [0, 1], layer, out, lse)
            want = step(x, layer)
            for got, expected in zip((query, out, lse, after), want):
                torch.testing.assert_close(got, expected)


# opcheck runs an op on copies of its tensors (test_schema, test_faketensor, the aot tests); this
# op refuses any pool or table but its engine's own, which its pager writes, so only the
# autograd-registration check applies as is. The fake kernel is compared with the real op below,
# and the compiled test above runs the op under functionalization, as the aot tests would.
@pytest.mark.parametrize("length", [4 * PAGE_SIZE, 10 * 6 * PAGE_SIZE], ids=["resident", "faulting"])
def test_opcheck_autograd_registration(length):
    engine, model = _filled("cpu", length=length)
    with engine:
        torch.library.opcheck(torch.ops.paged_kv.engine_attention.default,
                              (_query(model, 1), engine.pool, engine.page_table, engine.op_id, [0], [0, 1], 1),
                              test_utils=("test_autograd_registration",))


@pytest.mark.parametrize("n", [1, 5])
def test_fake_kernel_matches_the_op(n):
    from torch._subclasses.fake_tensor import FakeTensorMode

    engine, model = _filled("cpu")
    with engine:
        query = _query(model, n)
        if n > 1:  # a chunk of n queries needs n tokens written after the history
            engine.append(0, torch.randn(n - 1, 2, HEAD_DIM), torch.randn(n - 1, 2, HEAD_DIM), 0)
        args = (engine.pool, engine.page_table, engine.op_id, [0], [0, n], 0)
        real = torch.ops.paged_kv.engine_attention(query, *args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (query, *args)]
            fake = torch.ops.paged_kv.engine_attention(*fake_args)
        for r, f in zip(real, fake):
            assert (f.shape, f.dtype, f.device, f.stride()) == (r.shape, r.dtype, r.device, r.stride())


def test_opcheck_schema_runs_refuse_copies():
    """What the skipped opcheck utilities would do, run on copies, is a clear error."""
    engine, model = _filled("cpu", length=4 * PAGE_SIZE)
    with engine:
        with pytest.raises(Exception, match="pool must be engine .* own pool"):
            torch.library.opcheck(torch.ops.paged_kv.engine_attention.default,
                                  (_query(model, 1), engine.pool, engine.page_table, engine.op_id, [0], [0, 1], 0),
                                  test_utils=("test_schema",))


def test_bad_engine_and_tensors_are_clear_errors():
    engine, model = _filled("cpu", length=2 * PAGE_SIZE)
    query = _query(model, 1)
    with engine:
        with pytest.raises(ValueError, match="pool must be engine .* own pool"):
            torch.ops.paged_kv.engine_attention(query, engine.pool.clone(), engine.page_table, engine.op_id,
                                                [0], [0, 1], 0)
        with pytest.raises(ValueError, match="page_table must be engine .* own page_table"):
            torch.ops.paged_kv.engine_attention(query, engine.pool, engine.page_table.clone(), engine.op_id,
                                                [0], [0, 1], 0)
        with pytest.raises(ValueError, match="Engine.attention: query_starts needs"):
            torch.ops.paged_kv.engine_attention(query, engine.pool, engine.page_table, engine.op_id,
                                                [0], [0], 0)
        pool, table, op_id = engine.pool, engine.page_table, engine.op_id
    with pytest.raises(ValueError, match=f"no open Engine has op_id {op_id}"):
        torch.ops.paged_kv.engine_attention(query, pool, table, op_id, [0], [0, 1], 0)
    with pytest.raises(ValueError, match="no open Engine has op_id -5"):
        engine_op.lookup(-5)
