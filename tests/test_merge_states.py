"""merge_states: partial attention states merged by LSE equal attention over all keys."""

import pytest
import torch

import paged_kv
from paged_kv import reference
from conftest import DEVICES, DTYPES, HAS_CUDA

# Error bound relative to the output's scale, by dtype: the output is rounded once to the dtype,
# so twice its unit roundoff covers the rounding of inputs and result.
TOLERANCE = {torch.float16: 2 * 2**-11, torch.bfloat16: 2 * 2**-8, torch.float32: 1e-5}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_states", [1, 2, 5])
def test_split_attention_merges_to_full_attention(device, dtype, num_states):
    """Attention over disjoint key chunks, merged, equals attention over all keys."""
    g = torch.Generator().manual_seed(num_states)
    queries, hq, hkv, d, keys = 3, 8, 2, 64, 200
    q = torch.randn(queries, hq, d, generator=g)
    k = torch.randn(keys, hkv, d, generator=g)
    v = torch.randn(keys, hkv, d, generator=g)
    cuts = sorted(torch.randperm(keys - 1, generator=g)[: num_states - 1].add(1).tolist())
    bounds = [0] + cuts + [keys]
    parts = [reference.attention(q, k[a:b], v[a:b]) for a, b in zip(bounds, bounds[1:])]
    outputs = torch.stack([o for o, _ in parts]).to(dtype).to(device)
    lses = torch.stack([lse for _, lse in parts]).float().to(device)

    out, lse = paged_kv.merge_states(outputs, lses)
    want, want_lse = reference.attention(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (queries, hq, d) and lse.shape == (queries, hq)
    err = (out.double().cpu() - want).norm() / want.norm()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=1e-6, atol=1e-5)
    ref_out, ref_lse = reference.merge_states(outputs.cpu(), lses.cpu())
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_states_are_ignored(device):
    """A partial with lse -inf contributes nothing, even if its output is NaN; all-empty rows
    give 0 and -inf."""
    outputs = torch.randn(3, 4, 2, 16, device=device)
    lses = torch.randn(3, 4, 2, device=device)
    outputs[1] = float("nan")
    lses[1] = float("-inf")
    lses[:, 3, 1] = float("-inf")
    out, lse = paged_kv.merge_states(outputs, lses)
    keep = torch.tensor([0, 2])
    want, want_lse = paged_kv.merge_states(outputs[keep], lses[keep])
    torch.testing.assert_close(out[:3], want[:3])
    torch.testing.assert_close(lse[:3], want_lse[:3])
    assert torch.equal(out[3, 1], torch.zeros(16, device=device))
    assert lse[3, 1] == float("-inf")
    assert torch.isfinite(out[:3]).all() and torch.isfinite(out[3, 0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_lse_makes_the_row_nan(device, dtype):
    """A partial with a NaN LSE (a NaN score in its keys) makes its row's output and LSE NaN,
    whether it comes first, last, or beside empty partials; the other rows are untouched."""
    g = torch.Generator().manual_seed(7)
    outputs = torch.randn(3, 5, 2, 16, generator=g).to(dtype)
    lses = torch.randn(3, 5, 2, generator=g)
    lses[0, 0, 0] = float("nan")  # first of three
    lses[2, 1, 1] = float("nan")  # last of three
    lses[:, 2, 0] = torch.tensor([float("-inf"), float("nan"), float("-inf")])  # beside empties
    lses[:, 3, 1] = float("nan")
    nan_rows = torch.zeros(5, 2, dtype=torch.bool)
    nan_rows[0, 0] = nan_rows[1, 1] = nan_rows[2, 0] = nan_rows[3, 1] = True

    out, lse = paged_kv.merge_states(outputs.to(device), lses.to(device))
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(torch.isnan(lse), nan_rows)
    assert torch.isnan(out[nan_rows]).all()
    ref_out, ref_lse = reference.merge_states(outputs, lses)
    assert torch.equal(torch.isnan(ref_lse), nan_rows)
    assert torch.isfinite(out[~nan_rows]).all()
    torch.testing.assert_close(out[~nan_rows].float(), ref_out[~nan_rows].float(), rtol=0,
                               atol=TOLERANCE[dtype])
    torch.testing.assert_close(lse[~nan_rows], ref_lse[~nan_rows])


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_bad_inputs(device):
    o = torch.randn(2, 3, 4, 8, device=device)
    l = torch.randn(2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match=r"merge_states: outputs must be \[num_states, num_queries"):
        paged_kv.merge_states(o[0], l)
    with pytest.raises(RuntimeError, match=r"lses must be \[2, 3, 4\] to match outputs"):
        paged_kv.merge_states(o, l[:, :2])
    with pytest.raises(RuntimeError, match=r"lses must be float32, got Half"):
        paged_kv.merge_states(o, l.half())
    with pytest.raises(RuntimeError, match=r"outputs must be float16, bfloat16 or float32, got Double"):
        paged_kv.merge_states(o.double(), l)
    with pytest.raises(RuntimeError, match=r"at least one state"):
        paged_kv.merge_states(o[:0], l[:0])
    with pytest.raises(RuntimeError, match=r"merge_states: lses must be a tensor, got None"):
        paged_kv.merge_states(o, None)
    with pytest.raises(RuntimeError, match=r"merge_states: outputs must be a tensor, got None"):
        paged_kv.merge_states(None, l)
    # One meta tensor among real ones reaches the fake kernel, which refuses it.
    with pytest.raises(RuntimeError, match=r"merge_states: lses must be on the device of outputs"):
        paged_kv.merge_states(o, l.to("meta"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_merge_states_wrong_device():
    with pytest.raises(RuntimeError, match=r"lses must be on outputs' device cuda:0, got cpu"):
        paged_kv.merge_states(torch.randn(2, 3, 4, 8, device="cuda"), torch.randn(2, 3, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_opcheck(device, dtype):
    outputs = torch.randn(3, 5, 4, 32, device=device).to(dtype)
    lses = torch.randn(3, 5, 4, device=device)
    torch.library.opcheck(torch.ops.paged_kv.merge_states.default, (outputs, lses))


def test_merge_states_compiled():
    outputs, lses = torch.randn(2, 5, 4, 32), torch.randn(2, 5, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda o, l: paged_kv.merge_states(o * 2, l)[0] + 1, fullgraph=True)
    torch.testing.assert_close(compiled(outputs, lses), paged_kv.merge_states(outputs * 2, lses)[0] + 1)
