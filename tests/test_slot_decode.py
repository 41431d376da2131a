"""SlotDecoder: decode steps over the bound batch slots with no host work inside a step. Eager
and (on CUDA) graph-replayed steps match dense attention over each sequence's own tokens; a page
that leaves the kernel's reach between reserve() and commit() is raised after the steps."""

from __future__ import annotations

import pytest
import torch

import paged_kv
from paged_kv import Engine, FaultError, Policy, Tier
from paged_kv.slot_decode import SlotDecoder

from conftest import DEVICES

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, PAGE = 2, 2, 4, 64, 16


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _engine(device, gpu_pages=8, host_pages=32, disk_pages=0, tmp_path=None, **options):
    element = torch.empty((), dtype=_dtype(device)).element_size()
    page_bytes = LAYERS * 2 * KV_HEADS * PAGE * HEAD_DIM * element
    policy = Policy(page_size=PAGE, gpu_budget=gpu_pages * page_bytes, host_budget=host_pages * page_bytes,
                    disk_budget=disk_pages * page_bytes, disk_path=str(tmp_path) if disk_pages else None,
                    fault_mode="forbid", **options)
    return Engine(policy, num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=_dtype(device),
                  device=device, max_sequences=4, max_pages=16, max_batch=3)


class Sessions:
    """Sequences in an engine with their K/V kept unpaged, per layer, for a dense reference."""

    def __init__(self, engine, g):
        self.engine, self.g = engine, g
        self.kv = {}

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g).to(self.engine.dtype)

    def new(self, tokens):
        row = self.engine.new_sequence()
        self.kv[row] = [([], []) for _ in range(LAYERS)]
        for start in range(0, tokens, PAGE):  # a page per step, so the frames need not hold it all
            n = min(PAGE, tokens - start)
            for layer in range(LAYERS):
                k, v = self.randn(n, KV_HEADS, HEAD_DIM), self.randn(n, KV_HEADS, HEAD_DIM)
                self.engine.append(row, k.to(self.engine.device), v.to(self.engine.device), layer)
                self.kv[row][layer][0].append(k)
                self.kv[row][layer][1].append(v)
        return row

    def record(self, rows, layer, key, value):
        for b, row in enumerate(rows):
            self.kv[row][layer][0].append(key[b:b + 1].cpu())
            self.kv[row][layer][1].append(value[b:b + 1].cpu())

    def check(self, rows, layer, query, out):
        group = Q_HEADS // KV_HEADS
        for b, row in enumerate(rows):
            k = torch.cat(self.kv[row][layer][0]).double().repeat_interleave(group, 1)
            v = torch.cat(self.kv[row][layer][1]).double().repeat_interleave(group, 1)
            scores = torch.einsum("hd,khd->hk", query[b].cpu().double(), k) / HEAD_DIM ** 0.5
            want = torch.einsum("hk,khd->hd", scores.softmax(-1), v)
            tol = 1e-5 if self.engine.dtype == torch.float32 else 2 * 2 ** -8
            torch.testing.assert_close(out[b].cpu().double(), want, rtol=tol, atol=tol)


def _inputs(sessions, batch):
    return (sessions.randn(batch, Q_HEADS, HEAD_DIM), sessions.randn(batch, KV_HEADS, HEAD_DIM),
            sessions.randn(batch, KV_HEADS, HEAD_DIM))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero_copy", "copies"])
def test_eager_steps_match_dense_attention(device, zero_copy):
    with _engine(device, zero_copy=zero_copy) as engine:
        sessions = Sessions(engine, torch.Generator().manual_seed(1))
        a, b = sessions.new(2 * PAGE + 9), sessions.new(PAGE - 3)
        engine.suspend(a, "host")
        engine.bind(1, a)
        engine.bind(0, b)
        decoder = SlotDecoder(engine)
        for _ in range(2):  # the second round crosses page boundaries
            decoder.reserve(PAGE // 2 + 3)
            assert Tier.DISK not in [Tier(engine.pager.page_info(a, p)["tier"]) for p in range(engine.pager.num_pages(a))]
            for _ in range(PAGE // 2 + 3):
                for layer in range(LAYERS):
                    q, k, v = (t.to(device) for t in _inputs(sessions, 2))
                    out = decoder.step(q, k, v, layer)
                    sessions.record(engine.bound(), layer, k, v)
                    sessions.check(engine.bound(), layer, q, out)
            decoder.commit(PAGE // 2 + 3)
        assert engine.num_tokens(a) == 2 * PAGE + 9 + 2 * (PAGE // 2 + 3)
        engine.pager.check_invariants()
        # The engine's own steps go on from the decoder's bookkeeping.
        for layer in range(LAYERS):
            q, k, v = (t.to(device) for t in _inputs(sessions, 1))
            engine.append(a, k, v, layer)
            sessions.record([a], layer, k, v)
            sessions.check([a], layer, q, engine.attention(q, [a], [0, 1], layer))


@pytest.mark.parametrize("device", DEVICES)
def test_a_page_moved_away_is_raised_after_the_steps(device, tmp_path):
    with _engine(device, disk_pages=32, tmp_path=tmp_path) as engine:
        sessions = Sessions(engine, torch.Generator().manual_seed(2))
        a = sessions.new(3 * PAGE + 1)
        engine.bind(0, a)
        decoder = SlotDecoder(engine)
        decoder.reserve(2)
        engine.pager.demote([(a, 1)], Tier.DISK)  # out of reach behind the decoder's back
        engine.pager.sync_table(engine.page_table)
        for _ in range(2):
            for layer in range(LAYERS):
                decoder.step(*(t.to(device) for t in _inputs(sessions, 1)), layer)
        with pytest.raises(FaultError, match=r"4 page read\(s\) in the last 2 step\(s\).*\(row 0, page 1\)"):
            decoder.commit(2)
        assert engine.num_tokens(a) == 3 * PAGE + 3  # the tokens were written all the same
        decoder.reserve(1)  # brings the page back within reach
        assert engine.pager.page_info(a, 1)["tier"] != Tier.DISK
        engine.pager.check_invariants()


def test_reserve_refuses_what_cannot_be_reached_and_errors():
    with _engine("cpu", gpu_pages=3, zero_copy=False) as engine:
        sessions = Sessions(engine, torch.Generator().manual_seed(3))
        a = sessions.new(5 * PAGE)
        engine.suspend(a, "host")
        decoder = SlotDecoder(engine)
        with pytest.raises(ValueError, match="no batch slot is bound"):
            decoder.reserve(1)
        engine.bind(0, a)
        with pytest.raises(FaultError, match=r"page\(s\) of the bound sequences cannot be brought within"):
            decoder.reserve(1)
        # refused: the page added for the new token is gone and gave its frame back (the frames
        # in use hold pages of the sequence that prefetch brought up)
        assert engine.pager.num_pages(a) == 5
        on_gpu = sum(engine.pager.page_info(a, p)["tier"] == Tier.GPU for p in range(5))
        assert engine.pager.free_frames() + on_gpu == engine.num_frames == 3
        assert int(engine.page_table[a, 5]) == engine.pager.page_table()[a, 5] == paged_kv.UNMAPPED
        engine.pager.check_invariants()
        with pytest.raises(RuntimeError, match="call reserve\\(\\) before the steps"):
            decoder.step(*_inputs(sessions, 1), 0)
    with _engine("cpu") as engine:
        sessions = Sessions(engine, torch.Generator().manual_seed(4))
        engine.bind(0, sessions.new(3))
        decoder = SlotDecoder(engine)
        with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
            decoder.reserve(0)
        decoder.reserve(2)
        with pytest.raises(RuntimeError, match="2 reserved steps are not committed yet"):
            decoder.reserve(1)
        with pytest.raises(ValueError, match="the batch is the 1 bound slot"):
            decoder.step(*_inputs(sessions, 2), 0)
        with pytest.raises(ValueError, match="2 steps were reserved, got 1"):
            decoder.commit(1)
    with Engine(Policy(page_size=PAGE), num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.float32,
                device="cpu", max_sequences=1, max_pages=1) as engine:
        with pytest.raises(ValueError, match="fault_mode must be 'forbid'"):
            SlotDecoder(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_steps_replay_exactly():
    """A whole decode step (every layer) captured once in a CUDA graph and replayed for many
    tokens, with the inputs copied in place, matches dense attention at every step; one host
    synchronisation per commit."""
    with _engine("cuda", zero_copy=True) as engine:
        sessions = Sessions(engine, torch.Generator().manual_seed(5))
        rows = [sessions.new(PAGE + 5), sessions.new(3 * PAGE - 1)]
        engine.suspend(rows[1], "host")
        for slot, row in enumerate(rows):
            engine.bind(slot, row)
        decoder = SlotDecoder(engine)
        steps = 2 * PAGE
        static = [tuple(t.cuda() for t in _inputs(sessions, 2)) for _ in range(LAYERS)]

        def step():
            return [decoder.step(q, k, v, layer) for layer, (q, k, v) in enumerate(static)]

        decoder.reserve(steps + 2)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: two real steps (recorded)
            for _ in range(2):
                for layer, (q, k, v) in enumerate(static):
                    decoder.step(q, k, v, layer)
                    sessions.record(engine.bound(), layer, k, v)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        # Capture records the kernels without running them: no token was written.
        for _ in range(steps):
            for layer in range(LAYERS):
                for t, new in zip(static[layer], _inputs(sessions, 2)):
                    t.copy_(new)
            graph.replay()
            for layer, (q, k, v) in enumerate(static):
                sessions.record(engine.bound(), layer, k, v)
                sessions.check(engine.bound(), layer, q, outs[layer])
        decoder.commit(steps + 2)
        assert engine.num_tokens(rows[0]) == PAGE + 5 + steps + 2
        engine.pager.check_invariants()
