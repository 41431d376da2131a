"""Autograd: merge_states' backward against a float64 reference; backward through the ops
without one raises (instead of a gradient silently lost), and their forward runs as before."""

import warnings

import pytest
import torch

import paged_kv
from attention_batch import make_batch
from conftest import DEVICES, DTYPES, same_bits

GRAD_TOLERANCE = {torch.float16: 2 * 2**-11, torch.bfloat16: 2 * 2**-8, torch.float32: 1e-5}


def _merge_float64(outputs, lses):
    """merge_states in float64 torch operations (differentiable): an empty partial (lse -inf)
    has weight 0 and its output, NaN or not, is left out."""
    empty = torch.isneginf(lses)
    # Rows with no keys at all are kept out of logsumexp and exp (their gradients would be NaN).
    no_keys = empty.all(dim=0)
    lse = torch.logsumexp(torch.where(no_keys, 0.0, lses), dim=0).masked_fill(no_keys, float("-inf"))
    safe = torch.where(empty, 0.0, lses - torch.where(no_keys, 0.0, lse))
    weights = torch.where(empty, 0.0, torch.exp(safe))
    out = (weights[..., None] * torch.where(empty[..., None], 0.0, outputs)).sum(dim=0)
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_backward_matches_float64(device, dtype):
    """Gradients of outputs and LSEs, through both results, with an empty partial whose output
    is NaN and a row whose every partial is empty (gradients 0 there)."""
    g = torch.Generator().manual_seed(11)
    outputs = torch.randn(3, 4, 2, 16, generator=g).to(dtype)
    lses = torch.randn(3, 4, 2, generator=g) * 3
    outputs[1, 0, 0] = float("nan")
    lses[1, 0, 0] = float("-inf")
    lses[:, 2, 1] = float("-inf")
    grad_out = torch.randn(4, 2, 16, generator=g)
    grad_lse = torch.randn(4, 2, generator=g)

    o = outputs.to(device, copy=True).requires_grad_()
    l = lses.to(device, copy=True).requires_grad_()
    out, lse = paged_kv.merge_states(o, l)
    torch.autograd.backward([out, lse], [grad_out.to(device).to(dtype), grad_lse.to(device)])

    o64 = outputs.double().requires_grad_()
    l64 = lses.double().requires_grad_()
    out64, lse64 = _merge_float64(o64, l64)
    torch.autograd.backward([out64, lse64], [grad_out.to(dtype).double(), grad_lse.double()])

    assert o.grad.dtype == dtype and l.grad.dtype == torch.float32
    tol = GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(o.grad.cpu().double(), o64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(l.grad.cpu().double(), l64.grad, rtol=1e-4, atol=1e-4)
    assert torch.equal(o.grad[1, 0, 0].cpu(), torch.zeros(16, dtype=dtype))
    assert torch.equal(l.grad[:, 2, 1].cpu(), torch.zeros(3))
    assert l.grad.abs().sum() > 0 and o.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_backward_through_lse_alone(device):
    """Only the LSE used: the outputs get no gradient (none or zeros), the LSEs their softmax
    weights."""
    lses = torch.tensor([[[0.0]], [[1.0]]], device=device).requires_grad_()
    outputs = torch.randn(2, 1, 1, 8, device=device).requires_grad_()
    _, lse = paged_kv.merge_states(outputs, lses)
    lse.sum().backward()
    want = torch.softmax(torch.tensor([0.0, 1.0]), dim=0).view(2, 1, 1)
    torch.testing.assert_close(lses.grad.cpu(), want)
    assert outputs.grad is None or torch.equal(outputs.grad, torch.zeros_like(outputs))


def _batch(device, dtype):
    g = torch.Generator().manual_seed(5)
    return make_batch(device, dtype, 16, 64, 4, 2, [(40, 1), (21, 3)], g)


def _attention(batch, **overrides):
    args = dict(zip(["query", "pool", "page_table", "sequences", "query_starts", "kv_lens",
                     "layer", "max_query_len"], batch.args()))
    args.update(overrides)
    return paged_kv.attention(**args, return_lse=True)


NO_BACKWARD = "has no backward: a gradient cannot flow through it"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("argument", ["query", "pool", "host_pool"])
def test_attention_backward_raises(device, argument):
    """With an input that requires grad the forward runs and gives the same results, which
    require grad; backward through either raises (torch's fallback warned and dropped the
    gradient). Under no_grad and inference_mode, or detached, nothing requires grad."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    batch = _batch(device, dtype)
    want_out, want_lse = _attention(batch)
    if argument == "host_pool":  # host slots (pinned beside a GPU pool) no page maps to here
        slots = batch.pool.to("cpu", copy=True)
        leaf = (slots.pin_memory() if device == "cuda" else slots).requires_grad_()
    else:
        leaf = getattr(batch, argument).clone().requires_grad_()
    out, lse = _attention(batch, **{argument: leaf})
    assert out.requires_grad and lse.requires_grad
    assert same_bits(out.detach(), want_out) and same_bits(lse.detach(), want_lse)
    for result in (out, lse):
        with pytest.raises(RuntimeError, match=f"paged_kv.attention {NO_BACKWARD}"):
            result.sum().backward(retain_graph=True)
    assert leaf.grad is None
    for scope in (torch.no_grad, torch.inference_mode):
        with scope():
            out, lse = _attention(batch, **{argument: leaf})
        assert not out.requires_grad and not lse.requires_grad
        assert same_bits(out, want_out) and same_bits(lse, want_lse)
    out, _ = _attention(batch, **{argument: leaf.detach()})
    assert not out.requires_grad and same_bits(out, want_out)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_kv_backward_raises(device):
    batch = _batch(device, torch.float32 if device == "cpu" else torch.float16)
    pages = torch.tensor([0, 1], dtype=torch.int32, device=device)
    want_k, want_v = paged_kv.gather_kv(batch.pool, batch.page_table, batch.rows[0], pages, batch.layer)
    pool = batch.pool.clone().requires_grad_()
    k, v = paged_kv.gather_kv(pool, batch.page_table, batch.rows[0], pages, batch.layer)
    assert k.requires_grad and v.requires_grad
    assert same_bits(k.detach(), want_k) and same_bits(v.detach(), want_v)
    with pytest.raises(RuntimeError, match=f"paged_kv.gather_kv {NO_BACKWARD}"):
        k.nan_to_num().sum().backward()
    with torch.no_grad():
        k, _ = paged_kv.gather_kv(pool, batch.page_table, batch.rows[0], pages, batch.layer)
    assert not k.requires_grad and same_bits(k, want_k)


@pytest.mark.parametrize("device", DEVICES)
def test_append_kv_copies_values_of_keys_requiring_grad(device):
    """append_kv returns nothing to backpropagate through: it writes the values, warns that no
    gradient will reach them, and the pool stays without a gradient history (which would keep
    every step's graph alive). Under no_grad it does not warn."""
    batch = _batch(device, torch.float32 if device == "cpu" else torch.float16)
    key = torch.randn(2, 2, 64, dtype=batch.pool.dtype, device=device).requires_grad_()
    positions = torch.tensor([0, 1], dtype=torch.int32, device=device)
    args = (batch.pool, batch.page_table, batch.sequences[:1].repeat(2), positions, batch.layer)
    with pytest.warns(UserWarning, match="append_kv: key requires grad, but the pool takes values only"):
        paged_kv.append_kv(key, key.detach() * 2, *args)
    with pytest.warns(UserWarning, match="append_kv: value requires grad"):
        paged_kv.append_kv(key.detach(), key * 2, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            paged_kv.append_kv(key, key * 2, *args)
    assert not batch.pool.requires_grad and batch.pool.grad_fn is None
    frame = paged_kv.pte.pte_index(int(batch.page_table[batch.rows[0], 0]))
    written = batch.pool[frame, batch.layer, :, :, :2].transpose(1, 2)  # [2 (K, V), tokens, H, D]
    assert torch.equal(written[0], key.detach()) and torch.equal(written[1], 2 * key.detach())


# AOTAutograd traces the joint graph in anomaly mode, which warns with the forward's trace.
@pytest.mark.filterwarnings("ignore:Error detected in torch")
def test_compiled_attention_with_a_query_requiring_grad_raises():
    """Under torch.compile, AOTAutograd traces the backward of a graph whose inputs require
    grad when it compiles: the compile raises there, naming the op, before any backward is
    asked for; under no_grad it compiles and runs."""
    batch = _batch("cpu", torch.float32)
    compiled = torch.compile(lambda q: paged_kv.attention(q, *batch.args()[1:]), fullgraph=True)
    with torch.no_grad():
        want = compiled(batch.query.clone().requires_grad_())
    assert same_bits(want, paged_kv.attention(*batch.args()))
    with pytest.raises(Exception, match=f"paged_kv.attention {NO_BACKWARD}"):
        compiled(batch.query.clone().requires_grad_())
