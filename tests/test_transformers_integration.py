"""paged_kv under Hugging Face transformers: models with random weights and small configurations,
attn_implementation="paged_kv" with a PagedKVCache whose GPU budget holds a few pages (the rest on
host and disk), against the same weights under transformers' own sdpa attention: logits within
float32's tolerance at every step, and greedy generation identical for 64 tokens, for Llama (GQA
2:1, and Llama 2's and Llama 3.1's geometries), Mistral (a window shorter than the context), Qwen2, GPT-NeoX and Falcon (multi-query); on a GPU in
bfloat16, logits at every step within twice sdpa's own bfloat16 error against float32."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import paged_kv  # noqa: E402
from paged_kv import Policy  # noqa: E402
from paged_kv.integrations.transformers import PagedKVCache  # noqa: E402

PAGE = 16
PROMPT, NEW = 37, 64


def _config(arch):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, head_dim=64, **common)
    if arch == "llama2":  # Llama 2's geometry: multi-head (no GQA), RoPE theta 10,000
        return transformers.LlamaConfig(num_key_value_heads=4, head_dim=64, **common)
    if arch == "llama3":  # Llama 3.1's: GQA 4:1, RoPE theta 500,000 with its long-context scaling
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
        return transformers.LlamaConfig(num_key_value_heads=1, head_dim=64, rope_parameters=rope, **common)
    if arch == "mistral":  # a window shorter than the context: the window must be honoured
        return transformers.MistralConfig(num_key_value_heads=2, head_dim=64, sliding_window=24, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **{**common, "hidden_size": 256})
    if arch == "gpt_neox":  # multi-head (no GQA), partial rotary
        return transformers.GPTNeoXConfig(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256)
    if arch == "falcon":  # multi-query attention
        return transformers.FalconConfig(vocab_size=96, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         multi_query=True, new_decoder_architecture=False, alibi=False)
    raise ValueError(arch)


def _models(arch):
    torch.manual_seed(0)
    config = _config(arch)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    paged = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="paged_kv").eval()
    paged.load_state_dict(ref.state_dict())
    return ref, paged


def _cache(model, tmp_path, batch=1, max_tokens=PROMPT + NEW + PAGE):
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.model_type == "falcon":
        kv_heads = 1  # multi-query
    page_bytes = config.num_hidden_layers * 2 * kv_heads * PAGE * head_dim * model.dtype.itemsize
    # The frames hold a prompt's open pages for the whole batch, and about half of the context.
    policy = Policy(page_size=PAGE, gpu_budget=8 * page_bytes, host_budget=2 * page_bytes,
                    disk_budget=32 * page_bytes, disk_path=str(tmp_path))
    return PagedKVCache.for_model(model, policy, batch, max_tokens=max_tokens)


@pytest.mark.parametrize("arch", ["llama", "llama2", "llama3", "mistral", "qwen2", "gpt_neox", "falcon"])
def test_greedy_generation_matches_sdpa(arch, tmp_path):
    ref, paged = _models(arch)
    ids = torch.randint(0, 96, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    cache = _cache(paged, tmp_path, batch=2)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        got = paged.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                             past_key_values=cache)
    assert torch.equal(got, want)
    stats = cache.engine.stats()
    assert stats["faults_seen"] > 0 and stats["evictions"]["gpu"] > 0  # the context did not fit the frames


@pytest.mark.parametrize("arch", ["llama", "llama2", "llama3", "mistral", "qwen2", "gpt_neox", "falcon"])
def test_logits_match_at_every_step(arch, tmp_path):
    ref, paged = _models(arch)
    ids = torch.randint(0, 96, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    ref_cache, cache = transformers.DynamicCache(config=ref.config), _cache(paged, tmp_path)
    step = ids
    with torch.no_grad():
        for _ in range(24):
            want = ref(step, past_key_values=ref_cache, use_cache=True).logits
            got = paged(step, past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            step = want[:, -1:].argmax(-1)
    assert cache.get_seq_length() == PROMPT + 23


def test_clear_errors(tmp_path):
    ref, paged = _models("llama")
    (tmp_path / "b").mkdir()
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="no PagedKVCache was updated for this layer"):
            paged(ids, use_cache=False)
        with pytest.raises(ValueError, match="does not support padded batches"):
            paged(torch.randint(0, 96, (2, 5)), attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]),
                  past_key_values=_cache(paged, tmp_path, batch=2))
        with pytest.raises(ValueError, match="PagedKVCache holds 1 sequences, the model's batch has 2"):
            paged(torch.randint(0, 96, (2, 5)), past_key_values=_cache(paged, tmp_path / "b"))
    with pytest.raises(ValueError, match="attention implementation is 'sdpa'"):
        _cache(ref, tmp_path)


def test_a_custom_4d_mask_is_refused(tmp_path):
    """transformers passes a 4-D attention_mask through as given; the kernel cannot apply it, so
    it is refused rather than dropped (the logits would be those of no mask at all)."""
    _, paged = _models("llama")
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, 0, 1:, 0] = False
    with torch.no_grad(), pytest.raises(ValueError, match=r"cannot apply a custom attention mask \(a 4-D"):
        paged(ids, attention_mask=mask, past_key_values=_cache(paged, tmp_path))


def test_a_forward_that_fails_part_way_is_taken_back(tmp_path, monkeypatch):
    """An error after the first layer wrote its tokens leaves the other layers behind; the next
    forward takes that step back, so the cache goes on as if the failed forward had not run."""
    ref, paged = _models("llama")
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = _cache(paged, tmp_path)
    engine = cache.engine
    attend = engine.attention

    def fail_at_layer_0(query, rows, starts, layer, **kwargs):  # after layer 0 wrote, before layer 1
        if layer == 0:
            raise RuntimeError("injected failure at layer 0")
        return attend(query, rows, starts, layer, **kwargs)

    with torch.no_grad():
        paged(ids[:, :12], past_key_values=cache)
        monkeypatch.setattr(engine, "attention", fail_at_layer_0)
        with pytest.raises(RuntimeError, match="injected failure"):
            paged(ids[:, 12:], past_key_values=cache)
        assert [engine.num_tokens(cache.rows[0], layer) for layer in range(2)] == [20, 12]
        monkeypatch.setattr(engine, "attention", attend)
        got = paged(ids[:, 12:], past_key_values=cache).logits
        want = ref(ids).logits[:, 12:]
    assert [engine.num_tokens(cache.rows[0], layer) for layer in range(2)] == [20, 20]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    engine.pager.check_invariants()

    # A failure in the last layer's attention comes after every layer wrote the tokens, which
    # cannot be taken back yet: the cache refuses to go on rather than hold them twice.
    def fail_at_layer_1(query, rows, starts, layer, **kwargs):
        if layer == 1:
            raise RuntimeError("injected failure at layer 1")
        return attend(query, rows, starts, layer, **kwargs)

    monkeypatch.setattr(engine, "attention", fail_at_layer_1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="injected failure"):
        paged(ids[:, :1], past_key_values=cache)
    monkeypatch.setattr(engine, "attention", attend)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"cannot be used any more: a forward failed at its "
                                                             r"last layer's attention"):
        paged(ids[:, :1], past_key_values=cache)


def test_a_forward_that_fails_in_the_head_keeps_its_tokens_as_dynamic_cache_does(tmp_path, monkeypatch):
    """A failure after the last layer's attention (here in the LM head) leaves the step's tokens
    in every layer, in PagedKVCache as in transformers' DynamicCache: the next forward's
    positions follow them, and its logits are those of sdpa over DynamicCache after the same
    failure."""
    ref, paged = _models("llama")
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    ref_cache, cache = transformers.DynamicCache(config=ref.config), _cache(paged, tmp_path)

    def failing_head(hidden):
        raise RuntimeError("injected failure in the head")

    with torch.no_grad():
        for model, past in ((ref, ref_cache), (paged, cache)):
            model(ids[:, :12], past_key_values=past)
            monkeypatch.setattr(model.lm_head, "forward", failing_head)
            with pytest.raises(RuntimeError, match="injected failure in the head"):
                model(ids[:, 12:15], past_key_values=past)
            monkeypatch.undo()
        assert ref_cache.get_seq_length() == cache.get_seq_length() == 15
        want = ref(ids[:, 15:], past_key_values=ref_cache).logits
        got = paged(ids[:, 15:], past_key_values=cache).logits
    assert [cache.engine.num_tokens(cache.rows[0], layer) for layer in range(2)] == [20, 20]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_cache_arguments_and_a_crop_are_refused(tmp_path):
    _, paged = _models("llama")
    policy = Policy(page_size=PAGE, gpu_budget="1MiB", host_budget="1MiB", disk_path=str(tmp_path))
    with pytest.raises(TypeError, match=r"policy must be a paged_kv.Policy \(Policy.from_dict for a dict\)"):
        PagedKVCache.for_model(paged, {"page_size": PAGE})
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match=r"max_tokens must be a positive int"):
            PagedKVCache.for_model(paged, policy, max_tokens=bad)
    ids = torch.randint(0, 96, (1, 5))
    deeper = copy.deepcopy(paged.config)
    deeper.num_hidden_layers = 3
    deeper_model = transformers.AutoModelForCausalLM.from_config(deeper, attn_implementation="paged_kv").eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"PagedKVCache holds 2 layers \(its engine's\) and the "
                                                          r"model updates layer 2"):
        deeper_model(ids, past_key_values=PagedKVCache.for_model(paged, policy, max_tokens=64))
    cache = PagedKVCache.for_model(paged, policy, max_tokens=64)
    with torch.no_grad():
        paged(ids, past_key_values=cache)
        # Assisted and prompt-lookup decoding crop after a forward of candidates, which the cache
        # cannot take back: it says so, and refuses to go on with the candidates in it.
        cache.crop(5)  # to its own length (or past it): nothing to take off, nothing refused
        cache.crop(64)
        with pytest.raises(NotImplementedError, match="cannot be cropped yet"):
            cache.crop(3)
        with pytest.raises(RuntimeError, match=r"cannot be used any more: a crop to 3 tokens"):
            paged(ids[:, :1], past_key_values=cache)


def test_prompt_longer_than_the_frames(tmp_path):
    """A prompt whose pages exceed the GPU frames is refused with the remedy; fed in chunks
    (generate's prefill_chunk_size), it generates what sdpa does."""
    ref, paged = _models("llama")
    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=16, do_sample=False)
        with pytest.raises(paged_kv.PagerError, match=r"pass prefill_chunk_size=112 \(or less\)"):
            paged.generate(ids, max_new_tokens=16, do_sample=False,
                           past_key_values=_cache(paged, tmp_path, max_tokens=176))
        got = paged.generate(ids, max_new_tokens=16, do_sample=False, prefill_chunk_size=32,
                             past_key_values=_cache(paged, tmp_path, max_tokens=176))
    assert torch.equal(got, want)


def _within_own_error(arch, tmp_path, device, low):
    """Logits of the paged model in dtype `low` against the sdpa model in float32, and of the
    sdpa model in `low` against the same: the largest relative errors of each over a prompt fed
    in chunks of 32 tokens (a chunk's pages must fit the frames) and 24 decode steps, on the same
    inputs (float32 sdpa's greedy tokens). Returns (paged errors, sdpa errors, engine stats)."""
    ref, paged = _models(arch)
    ref32 = ref.to(device)
    ref_low = copy.deepcopy(ref32).to(low)
    paged_low = paged.to(device, low)
    prompt = torch.randint(0, 96, (1, 5 * 32), generator=torch.Generator().manual_seed(3)).to(device)
    caches = [transformers.DynamicCache(config=ref.config), transformers.DynamicCache(config=ref.config),
              _cache(paged_low, tmp_path, max_tokens=5 * 32 + 24)]
    steps = list(prompt.split(32, dim=1))
    sdpa_error, paged_error = [], []
    with torch.no_grad():
        while len(steps) < 5 + 24:
            step = steps[len(sdpa_error)]
            want = ref32(step, past_key_values=caches[0], use_cache=True).logits
            scale = want.abs().max()
            sdpa_low = ref_low(step, past_key_values=caches[1], use_cache=True).logits.float()
            got = paged_low(step, past_key_values=caches[2], use_cache=True).logits.float()
            assert torch.isfinite(got).all()
            sdpa_error.append(float((sdpa_low - want).abs().max() / scale))
            paged_error.append(float((got - want).abs().max() / scale))
            if len(sdpa_error) >= 5:
                steps.append(want[:, -1:].argmax(-1))
    return paged_error, sdpa_error, caches[2].engine.stats()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt_neox", "falcon"])
def test_bf16_on_gpu_within_sdpas_own_error(arch, tmp_path):
    """bfloat16 on the GPU with most pages on host and disk: at every step the paged model's
    logits differ from the float32 sdpa model's by at most twice what the bfloat16 sdpa model's
    do (the precision's own error)."""
    paged_error, sdpa_error, stats = _within_own_error(arch, tmp_path, "cuda", torch.bfloat16)
    assert max(paged_error) <= 2 * max(sdpa_error), (paged_error, sdpa_error)
    assert stats["evictions"]["gpu"] > 0  # the context did not fit the frames
    if arch != "mistral":  # Mistral's window never reads the pages that left the frames
        assert stats["faults_seen"] > 0


def test_attention_it_cannot_compute_is_refused(tmp_path):
    """A layer asking for what the paged kernel does not compute (logit soft-capping, sink
    logits, a position bias, non-causal attention) is refused by name, never silently dropped:
    here a Gemma 2 model with soft-capping, end to end, and each case at the attention function."""
    from types import SimpleNamespace

    from paged_kv.integrations.transformers import paged_kv_attention

    config = transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       attn_logit_softcapping=50.0, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="paged_kv").eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"does not support attention logit soft-capping "
                                                          r"\(softcap\) \(Gemma2Attention, layer 0\)"):
        model.generate(torch.randint(0, 96, (1, 5)), max_new_tokens=2, past_key_values=_cache(model, tmp_path))

    q = k = v = torch.zeros(1, 4, 3, 64)
    causal = SimpleNamespace(layer_idx=0, is_causal=True)
    for module, kwargs, named in ((causal, {"s_aux": torch.zeros(4)}, "sink logits"),
                                  (causal, {"position_bias": torch.zeros(1, 4, 3, 3)}, "position bias"),
                                  (causal, {"is_causal": False}, "non-causal"),
                                  (SimpleNamespace(layer_idx=0, is_causal=False), {}, "non-causal")):
        with pytest.raises(ValueError, match=named):
            paged_kv_attention(module, q, k, v, None, **kwargs)
