"""Compiled decode of Hugging Face models over paged_kv (CompiledDecoder): the step compiles into
one graph (torch.compile(fullgraph=True) raises on any graph break) that is not recompiled as
the context grows or the reservations change size, and gives the same greedy tokens as eager
paged_kv and as transformers' own sdpa attention. On a GPU, the step replays as CUDA graphs
(mode="reduce-overhead") in bfloat16 with the same tokens as eager. Misuse is refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from paged_kv import FaultError, Policy  # noqa: E402
from paged_kv.integrations.transformers import CompiledDecoder, PagedKVCache  # noqa: E402

from conftest import HAS_CUDA  # noqa: E402

PAGE = 16
PROMPT, NEW = 21, 16  # the decode steps cross a page boundary (token 32)
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, eos_token_id=None)  # no end token: every run makes NEW tokens


def _config(arch):
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, head_dim=64, **COMMON)
    if arch == "mistral":  # a window shorter than the context
        return transformers.MistralConfig(num_key_value_heads=2, head_dim=64, sliding_window=24, **COMMON)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **{**COMMON, "hidden_size": 256})
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 256})
    if arch == "falcon":  # multi-query, through the integration's own Falcon attention class
        return transformers.FalconConfig(vocab_size=96, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         multi_query=True, new_decoder_architecture=False, alibi=False,
                                         eos_token_id=None)
    raise ValueError(arch)


def _models(arch, dtype=torch.float32, device="cpu"):
    """The same random weights under sdpa and under paged_kv."""
    torch.manual_seed(0)
    config = _config(arch)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    paged = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="paged_kv")
    paged.load_state_dict(ref.state_dict())
    return ref.to(device, dtype).eval(), paged.to(device, dtype).eval()


def _cache(model, batch=1, gpu_pages=2, max_tokens=PROMPT + NEW + PAGE, **options):
    """A cache whose frames hold `gpu_pages` pages (so older pages go to host slots, read in
    place), with fault_mode "forbid" as the graph path needs."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    if config.model_type == "falcon":
        kv_heads = 1  # multi-query
    page_bytes = config.num_hidden_layers * 2 * kv_heads * PAGE * head_dim * model.dtype.itemsize
    policy = Policy(page_size=PAGE, gpu_budget=gpu_pages * batch * page_bytes, host_budget=16 * batch * page_bytes,
                    **{"fault_mode": "forbid", **options})
    return PagedKVCache.for_model(model, policy, batch, max_tokens=max_tokens)


def _prompt(batch=1, device="cpu"):
    return torch.randint(0, 96, (batch, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)


def _eager_tokens(ref, paged, ids):
    """Greedy tokens from sdpa with a dense cache and from eager paged_kv (model.generate)."""
    with torch.no_grad():
        mask = torch.ones_like(ids)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        eager = paged.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                               past_key_values=_cache(paged, len(ids)))
    return want, eager


def test_inductor_step_matches_eager_and_sdpa():
    """Inductor on the CPU: it builds the step's C++ in about 20 s on a 2-core machine (5 s with
    its cache warm), worth it for one model, since inductor is the backend that reinplaces the
    ops' mutations (the pool, the fault queue) and the one used in practice; the other
    architectures below use aot_eager (functionalization, eager kernels), about a second each.
    Reservations of 6, 6 and 3 steps, one compile: a recompile would be an error."""
    ref, paged = _models("llama")
    ids = _prompt()
    want, eager = _eager_tokens(ref, paged, ids)
    assert torch.equal(eager, want)
    torch._dynamo.reset()
    decoder = CompiledDecoder(paged, _cache(paged), compile={"backend": "inductor"})
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = decoder.generate(ids, NEW, steps_per_reserve=6)
    assert torch.equal(got, want)
    engine = decoder.cache.engine
    assert engine.stats()["evictions"]["gpu"] > 0  # some of the context was read from host slots
    assert engine.num_tokens(decoder.cache.rows[0]) == PROMPT + NEW - 1
    assert decoder.cache.get_seq_length() == PROMPT + NEW - 1
    engine.pager.check_invariants()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gpt_neox", "falcon"])
def test_other_architectures_compile_whole(arch):
    ref, paged = _models(arch)
    ids = _prompt(batch=2)
    want, eager = _eager_tokens(ref, paged, ids)
    assert torch.equal(eager, want)
    decoder = CompiledDecoder(paged, _cache(paged, batch=2), compile={"backend": "aot_eager"})
    assert torch.equal(decoder.generate(ids, NEW, steps_per_reserve=5), want)


def test_steps_one_by_one_match_eager_logits():
    """reserve / step / commit by hand, eagerly (compile=False): the logits of every step match
    eager paged_kv's, and the cache reports the tokens run so far while steps are reserved."""
    _, paged = _models("llama")
    ids = _prompt()
    eager_cache = _cache(paged)
    decoder = CompiledDecoder(paged, _cache(paged), compile=False)
    with torch.no_grad():
        # prefill computes the last position's logits alone (logits_to_keep=1), so the reference does too
        want = paged(ids, past_key_values=eager_cache, logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(decoder.prefill(ids), want, rtol=0, atol=0)
        token = want.argmax(-1, keepdim=True)
        decoder.reserve(4)
        for step in range(4):
            assert decoder.cache.get_seq_length() == PROMPT + step
            want = paged(token, past_key_values=eager_cache).logits[:, -1]
            torch.testing.assert_close(decoder.step(token), want, rtol=1e-5, atol=1e-5)
            token = want.argmax(-1, keepdim=True)
        decoder.commit()
    assert decoder.cache.get_seq_length() == PROMPT + 4


def test_clear_errors():
    ref, paged = _models("llama")
    ids = _prompt()
    with pytest.raises(ValueError, match="the cache's Policy.fault_mode must be 'forbid'.*got 'service'"):
        CompiledDecoder(paged, _cache(paged, fault_mode="service"))
    with pytest.raises(TypeError, match="CompiledDecoder needs a PagedKVCache, got DynamicCache"):
        CompiledDecoder(paged, transformers.DynamicCache(config=paged.config))
    with pytest.raises(ValueError, match="attention implementation is 'sdpa'"):
        CompiledDecoder(ref, _cache(paged))
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        CompiledDecoder(paged, _cache(paged), compile="inductor")

    decoder = CompiledDecoder(paged, _cache(paged), compile=False)
    token = decoder.prefill(ids).argmax(-1, keepdim=True)
    with pytest.raises(RuntimeError, match=r"no reserved step left: call reserve\(steps\) first"):
        decoder.step(token)
    with pytest.raises(RuntimeError, match="no steps are reserved"):
        decoder.commit()
    decoder.reserve(2)
    with pytest.raises(RuntimeError, match="2 reserved steps are not committed yet"):
        decoder.reserve(1)
    with pytest.raises(RuntimeError, match="reserved steps are running; commit"):
        decoder.prefill(ids)
    with pytest.raises(ValueError, match=r"input_ids must be a \[1, 1\] tensor"):
        decoder.step(ids)
    # The model's own forward would add a token the reservation does not count: refused, and
    # the reserved steps go on as if it had not been tried.
    for tokens in (ids, token):
        with pytest.raises(RuntimeError, match=r"the model runs through CompiledDecoder.step\(\) alone"), \
                torch.no_grad():
            paged(tokens, past_key_values=decoder.cache)
    with pytest.raises(RuntimeError, match="another CompiledDecoder has reserved steps on this cache"):
        CompiledDecoder(paged, decoder.cache, compile=False).reserve(1)
    decoder.step(token)
    with pytest.raises(RuntimeError, match="1 of the 2 reserved steps have not run"):
        decoder.commit()
    decoder.step(token)
    with pytest.raises(RuntimeError, match="all 2 reserved steps have run; commit"):
        decoder.step(token)
    decoder.commit()
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        decoder.generate(ids, 0)
    decoder.reserve(1)
    decoder.cache.engine.close()
    with pytest.raises(RuntimeError, match="Engine is closed"):
        decoder.step(token)


def test_reserve_refuses_pages_out_of_reach():
    """Without zero-copy reads the whole context must fit the frames for a step: reserve() says
    which pages cannot be brought in, before any step runs."""
    _, paged = _models("llama")
    decoder = CompiledDecoder(paged, _cache(paged, gpu_pages=2, zero_copy=False), compile=False)
    decoder.prefill(_prompt())
    decoder.reserve(4)  # two pages: in the frames
    for _ in range(4):
        decoder.step(torch.tensor([[3]]))
    decoder.commit()
    for _ in range(2):  # a refused reservation leaves the tokens as they were: it can be retried
        with pytest.raises(FaultError, match=r"cannot be brought within the kernel's reach: \(row 0, page 0\)"):
            decoder.reserve(8)  # a third page: one must leave the frames
    assert decoder.cache.get_seq_length() == PROMPT + 4 and decoder.cache.decoder is None


def _forced_logits(decoder, ids, tokens):
    """Logits of the prompt's last position and of each step fed `tokens` (teacher forcing), so
    that one near-tie cannot send two runs down different paths: [steps + 1, B, vocab]."""
    out = [decoder.prefill(ids)]
    decoder.reserve(tokens.shape[1])
    for i in range(tokens.shape[1]):
        out.append(decoder.step(tokens[:, i:i + 1]))
    decoder.commit()
    return torch.stack(out).float()


def _compiled(paged, cache, compile, run, emulate_eager=False):
    """run(decoder) with a CompiledDecoder compiled afresh over cache(); raises if the step was
    not captured (when compile asks for CUDA graphs) or was compiled twice."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    skips = counters["inductor"]["cudagraph_skips"]
    decoder = CompiledDecoder(paged, cache(), compile=compile)
    with torch._dynamo.config.patch(error_on_recompile=True), \
            torch._inductor.config.patch(emulate_precision_casts=emulate_eager):
        out = run(decoder)
    assert counters["inductor"]["cudagraph_skips"] == skips, "the step was not captured as a CUDA graph"
    decoder.cache.engine.pager.check_invariants()
    return out, decoder


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_graphs_match_eager_in_bfloat16():
    """CUDA graphs in bfloat16, with Policy(fault_mode="forbid", zero_copy=False) (every page the
    step reads is in a GPU frame), 48 tokens over 5 pages, one compile each. The greedy
    tokens are eager paged_kv's exactly with the "cudagraphs" backend (eager kernels, captured)
    and with mode="reduce-overhead" when inductor rounds as eager does (emulate_precision_casts).
    With inductor's own roundings, reduce-overhead gives exactly the tokens of the same kernels
    without CUDA graphs, and against eager every step's logits (fed eager's tokens, so that one
    near-tie cannot send the runs apart) agree within bfloat16's error and pick the same token
    wherever eager's best two are further apart than that."""
    _, paged = _models("llama", torch.bfloat16, "cuda")
    ids = _prompt(device="cuda")
    new = 48

    def cache():
        return _cache(paged, gpu_pages=8, max_tokens=PROMPT + new + PAGE, zero_copy=False)

    def compiled(compile, run, emulate_eager=False):
        return _compiled(paged, cache, compile, run, emulate_eager)[0]

    def generate(decoder):
        return decoder.generate(ids, new, steps_per_reserve=16)  # reservations of 16, 16 and 15

    with torch.no_grad():
        eager = paged.generate(ids, max_new_tokens=new, do_sample=False, past_key_values=cache())
    assert torch.equal(generate(CompiledDecoder(paged, cache(), compile=False)), eager)

    assert torch.equal(compiled({"backend": "cudagraphs"}, generate), eager)
    assert torch.equal(compiled({"mode": "reduce-overhead"}, generate, emulate_eager=True), eager)

    graphs = compiled({"mode": "reduce-overhead"}, generate)
    assert torch.equal(graphs, compiled({}, generate))  # inductor's kernels without CUDA graphs
    fed = eager[:, PROMPT:-1]
    want = _forced_logits(CompiledDecoder(paged, cache(), compile=False), ids, fed)
    got = compiled({"mode": "reduce-overhead"}, lambda decoder: _forced_logits(decoder, ids, fed))
    tol = 2 ** -6 * want.abs().max().item()  # a few bfloat16 roundings of the largest logit
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    best = want.topk(2, -1).values
    clear = best[..., 0] - best[..., 1] > 2 * tol
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert clear.float().mean() > 0.5, "too few steps with a clear best token to compare"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_graphs_read_host_slots_in_place():
    """CUDA graphs with zero-copy reads: frames for 2 of the 5 pages the context grows to, the
    older pages read in place from pinned host slots through their mapped view (a CUDA tensor,
    so inductor captures the step). The greedy tokens under mode="reduce-overhead", rounding as
    eager does, are eager paged_kv's (the same frames and host slots) exactly; the steps were
    captured, and pages left the frames while they ran. The "cudagraphs" backend, which copies
    that view into a buffer of its own when it records the step, is refused."""
    _, paged = _models("llama", torch.bfloat16, "cuda")
    ids = _prompt(device="cuda")
    new = 48

    def cache():
        return _cache(paged, gpu_pages=2, max_tokens=PROMPT + new + PAGE, zero_copy=True)

    def generate(decoder):
        return decoder.generate(ids, new, steps_per_reserve=16)  # each reservation fits 2 frames

    with torch.no_grad():
        eager_cache = cache()
        eager = paged.generate(ids, max_new_tokens=new, do_sample=False, past_key_values=eager_cache)
    assert eager_cache.engine.stats()["evictions"]["gpu"] >= 3  # pages 0 to 2 went to host slots
    got, decoder = _compiled(paged, cache, {"mode": "reduce-overhead"}, generate, emulate_eager=True)
    assert torch.equal(got, eager)
    engine = decoder.cache.engine
    assert engine.stats()["evictions"]["gpu"] >= 3
    assert engine.num_tokens(decoder.cache.rows[0]) == PROMPT + new - 1
    with pytest.raises(ValueError, match=r"the 'cudagraphs' backend copies the host slots .* use "
                                         r"compile=\{'mode': 'reduce-overhead'\}, which keeps them in place, "
                                         r"or Policy\(zero_copy=False\)"):
        CompiledDecoder(paged, cache(), compile={"backend": "cudagraphs"})
