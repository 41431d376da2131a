"""Hugging Face transformers on paged_kv: a Cache whose every layer lives in a paged_kv.Engine, and
the attention function that reads it, registered under the name "paged_kv".

    from paged_kv.integrations.transformers import PagedKVCache
    model = AutoModelForCausalLM.from_config(config, attn_implementation="paged_kv")  # or from_pretrained
    cache = PagedKVCache.for_model(model, paged_kv.Policy(gpu_budget="4GiB", host_budget="64GiB"))
    tokens = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

How it fits: the model's attention layer calls cache.update(key, value, layer) with the new
tokens' K/V, then the attention function. The cache appends the K/V to the engine (one sequence
per batch row) and hands back only the new tokens; the attention function ignores them and runs
Engine.attention over the sequences' whole context wherever its pages live (GPU frames, host
slots, disk), with the layer's scale and, for a sliding-window layer, its window. The two
calls meet through a per-thread record of the cache and layer last updated, and the function
refuses to run when that record is not for its layer (a model whose attention is "paged_kv"
needs a PagedKVCache). Importing this module registers "paged_kv" with transformers'
AttentionInterface and a mask function that refuses padded batches (not supported yet).

A forward's new tokens need their pages in GPU frames at once (a step's pages stay in frames
until every layer has written them), so a prompt longer than the GPU budget goes in chunks:
generate(..., prefill_chunk_size=N); without, the refusal names the largest N that fits.

Compiled decode (CompiledDecoder). The path above does host work in every layer (pager calls,
fault service), which torch.compile cannot trace into one graph. CompiledDecoder moves it out
of the step, as paged_kv.SlotDecoder does for the raw ops (docs/DESIGN.md, "Graph safety"):

    cache = PagedKVCache.for_model(model, Policy(..., fault_mode="forbid"))
    decoder = CompiledDecoder(model, cache)            # or compile={"mode": "reduce-overhead"}
    tokens = decoder.generate(input_ids, max_new_tokens=64)   # greedy; or by hand:
    logits = decoder.prefill(input_ids)                # the prompt, eagerly, through the path above
    decoder.reserve(n)                                 # host: pages for n tokens, all within reach
    for _ in range(n):
        logits = decoder.step(next_tokens)             # [B, 1] -> [B, vocab], the compiled forward
    decoder.commit()                                   # host: bookkeeping, one read of the faults

Between reserve() and commit() the cache is in decode mode (cache.decoder is set): update()
writes the token's K/V at each sequence's device-side length (SlotDecoder.append) and the
attention function attends through the page table with a fault queue (SlotDecoder.attend), so
the forward launches device work only; positions come from the same device lengths, and the
mask sizes and query offset that transformers' mask code asks for are constants or device
tensors, so the graph is not specialised on the length. The step compiles with no graph break
(fullgraph=True) and once for all steps, and on a GPU mode="reduce-overhead" replays it as a
CUDA graph, zero-copy reads of host slots included (the step takes the host slots as a CUDA
tensor, their mapped view, since inductor leaves a graph with a CPU input uncaptured). The
Policy must have fault_mode "forbid": a page that left the kernel's reach during the steps is
raised by commit().

Supported: decoder-only models whose attention goes through transformers' attention interface
with a standard KV cache (tested: Llama, Mistral with its sliding window, Qwen2, GPT-NeoX), and
Falcon with rotary positions (its attention class is added under the same name); batches of
equal-length sequences without padding, greedy and sampled generation; compiled decode of all
five. Not supported yet, with a clear error: padding masks, beam search (reordering the cache),
cropping, dropout.
"""

from __future__ import annotations

import threading

import torch

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "paged_kv.integrations.transformers needs the `transformers` package (pip install transformers)"
    ) from error

from paged_kv import ops
from paged_kv.engine import Engine
from paged_kv.pager import PagerError
from paged_kv.policy import Policy
from paged_kv.slot_decode import SlotDecoder

__all__ = ["NAME", "CompiledDecoder", "PagedKVCache", "paged_kv_attention"]

NAME = "paged_kv"

_last_update = threading.local()  # .cache, .layer: the cache layer updated last on this thread


class _PagedLayer(CacheLayerMixin):
    """One model layer of a PagedKVCache: its K/V are the engine's layer `layer`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: PagedKVCache, layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self.cache
        if cache.unusable:
            raise RuntimeError(f"PagedKVCache cannot be used any more: {cache.unusable}")
        batch = key_states.shape[0]
        if batch != len(cache.rows):
            raise ValueError(
                f"PagedKVCache holds {len(cache.rows)} sequences, the model's batch has {batch} (build the cache "
                f"with batch_size={batch} for that many prompts; beam search and num_return_sequences > 1, which "
                f"widen the batch inside generate(), are not supported yet)"
            )
        if cache.decoder is not None:
            cache.decoder._append(key_states, value_states, self.layer)
        else:
            if self.layer == 0:
                if not cache._last_forward_whole:
                    # A forward that failed part-way left its tokens in some layers only: take
                    # them back, so that this forward finds the cache as it was before that one.
                    for row in cache.rows:
                        cache.engine.drop_unfinished(row)
                cache._last_forward_whole = False
            try:
                for b, row in enumerate(cache.rows):
                    # [H, T, D] per row -> the engine's [T, H, D]
                    cache.engine.append(row, key_states[b].transpose(0, 1), value_states[b].transpose(0, 1),
                                        self.layer)
            except PagerError as error:
                tokens = key_states.shape[2]
                if batch * (-(-tokens // cache.engine.page_size) + 1) <= cache.engine.num_frames:
                    raise  # the frames could hold the step: the pager's own reason stands
                raise _too_long_for_frames(cache, tokens) from error
        _last_update.cache, _last_update.layer = cache, self.layer
        return key_states, value_states

    def get_seq_length(self) -> int:
        if self.cache.decoder is not None:
            return self.cache.decoder.num_tokens
        # The tokens every layer holds: after a forward that failed part-way (whose step the next
        # forward takes back) the first layers hold more, and the next positions start here.
        return self.cache.engine.num_tokens(self.cache.rows[0])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.cache.decoder is not None:
            # Read only by transformers' mask code, whose "paged_kv" mask function makes no mask.
            # A constant, as transformers' StaticLayer gives, so a compiled step does not
            # specialise on the length (and recompile at every token).
            return self.get_max_length(), 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.cache.engine.max_pages * self.cache.engine.page_size

    def reset(self) -> None:
        raise NotImplementedError("PagedKVCache cannot be reset; make a new one (PagedKVCache.for_model)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search yet (reordering the cache)")

    def crop(self, max_length: int) -> None:
        length = self.get_seq_length()
        if max_length < 0:  # as transformers' caches read it: that many tokens off the end
            max_length = length - abs(max_length)
        if length <= max_length:
            return  # nothing to take off
        # Asked for after a forward of candidate tokens (assisted or prompt-lookup decoding): the
        # cache holds them all, accepted or not, so later forwards would attend rejected tokens.
        self.cache.unusable = (
            f"a crop to {max_length} tokens was asked for (assisted or prompt-lookup decoding) and is not "
            f"supported, so the cache holds tokens the model did not accept; build a new PagedKVCache"
        )
        raise NotImplementedError("PagedKVCache cannot be cropped yet (assisted and prompt-lookup decoding need it); "
                                  "the cache holds the candidate tokens of the last forward and cannot be used again")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedKVCache does not support repeating the batch (num_return_sequences > 1) yet")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("PagedKVCache does not support selecting batch rows yet")


class PagedKVCache(Cache):
    """A transformers Cache backed by a paged_kv.Engine: one engine sequence per batch row.

    Args:
        engine: an Engine with the model's KV geometry (layers, KV heads, head_dim, dtype, device).
        batch_size: the model's batch; that many new sequences are made (of `tenant`).
    Attributes: engine, rows (the engine's sequence rows, one per batch entry), decoder (the
    CompiledDecoder whose reserved steps are running, else None: see CompiledDecoder), unusable
    (why the cache refuses further forwards, else None).

    A forward that raises part-way (after some layers wrote its tokens) is taken back by the next
    forward: the cache is then as it was before the failed one. One that raises in its last
    layer's attention, when every layer holds its tokens, leaves the cache unusable (it says so).
    One that raises after that (in the last MLP or the head) keeps its tokens, as transformers'
    own caches do: the next forward's positions follow them.
    """

    def __init__(self, engine: Engine, batch_size: int = 1, tenant: int = 0):
        if not isinstance(engine, Engine):
            raise TypeError(f"PagedKVCache needs a paged_kv.Engine, got {type(engine).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PagedKVCache: batch_size must be a positive int, got {batch_size!r}")
        self.engine = engine
        self.rows = [engine.new_sequence(tenant) for _ in range(batch_size)]
        self.decoder: CompiledDecoder | None = None
        self.unusable: str | None = None
        self._last_forward_whole = True  # False from a forward's first update to its last attention
        super().__init__(layers=[_PagedLayer(self, layer) for layer in range(engine.num_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"PagedKVCache holds {len(self.layers)} layers (its engine's) and the model updates layer "
                f"{layer_idx}: build the cache for this model (PagedKVCache.for_model)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_query_offset(self, layer_idx: int = 0):
        if self.decoder is not None:
            # The device lengths (as transformers' StaticLayer gives a tensor): no host counter
            # in a compiled step.
            return self.decoder._positions()[0, 0]
        return super().get_query_offset(layer_idx)

    @classmethod
    def for_model(cls, model, policy: Policy, batch_size: int = 1, *, max_tokens: int | None = None,
                  tenant: int = 0) -> PagedKVCache:
        """A cache with its own Engine sized from the model's config: its layers, KV heads,
        head_dim, dtype and device; room for `max_tokens` tokens per sequence (default the
        config's max_position_embeddings). The model's attention must be "paged_kv"."""
        config = _check_attention(model, "PagedKVCache.for_model")
        if not isinstance(policy, Policy):
            raise TypeError(f"PagedKVCache.for_model: policy must be a paged_kv.Policy (Policy.from_dict for a "
                            f"dict), got {type(policy).__name__}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"PagedKVCache.for_model: max_tokens must be a positive int (or None for the "
                             f"config's max_position_embeddings), got {max_tokens!r}")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if config.model_type == "falcon":  # as FalconAttention counts them
            kv_heads = config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if max_tokens is None:
            max_tokens = config.max_position_embeddings
        engine = Engine(policy, num_layers=config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                        dtype=model.dtype, device=model.device, max_sequences=batch_size,
                        max_pages=-(-max_tokens // policy.page_size))
        return cls(engine, batch_size, tenant)


class CompiledDecoder:
    """Decode steps of a Hugging Face model over a PagedKVCache with every host call outside the
    step, so that the step compiles into one graph (torch.compile(fullgraph=True)) and, on a GPU,
    replays as a CUDA graph (mode="reduce-overhead"). See the module docstring.

    Args:
        model: the model, loaded with attn_implementation="paged_kv".
        cache: its PagedKVCache, whose engine's Policy has fault_mode="forbid" (a step cannot
            service faults) and binds no batch slot but the cache's rows.
        compile: True compiles the step with torch.compile(fullgraph=True); a dict compiles it
            with those torch.compile options (fullgraph defaults to True); False runs it eagerly.

    Attributes: model, cache, slots (the paged_kv.SlotDecoder underneath), num_tokens (tokens
    per sequence so far, counting the steps run since reserve()).

    In bfloat16 or float16, inductor's fused kernels round differently from eager, so greedy
    tokens can part from eager's at a near-tie; the "cudagraphs" backend (eager kernels, captured)
    or torch._inductor.config.emulate_precision_casts keeps closer to eager.
    """

    def __init__(self, model, cache: PagedKVCache, *, compile: bool | dict = True):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"CompiledDecoder needs a PagedKVCache, got {type(cache).__name__}")
        _check_attention(model, "CompiledDecoder")
        engine = cache.engine
        if engine.policy.fault_mode != "forbid":
            raise ValueError(
                f"CompiledDecoder: the cache's Policy.fault_mode must be 'forbid' (a compiled step "
                f"cannot service faults; reserve() brings the pages within reach instead), got "
                f"{engine.policy.fault_mode!r}"
            )
        options = _compile_options(compile)
        if (options is not None and options.get("backend") == "cudagraphs" and engine.device.type == "cuda"
                and engine.host_pool is not None and engine.policy.zero_copy):
            raise ValueError(
                "CompiledDecoder: the 'cudagraphs' backend copies the host slots (their mapped view, a graph "
                "input it does not keep at its address) into a GPU buffer of its own when it records the step, "
                "so every replay would copy the whole host tier instead of reading the pages it needs in place; "
                "use compile={'mode': 'reduce-overhead'}, which keeps them in place, or Policy(zero_copy=False)"
            )
        others = set(engine.bound()) - set(cache.rows)
        if others:
            raise ValueError(f"CompiledDecoder: the engine's batch slots hold other sequences ({sorted(others)}); "
                             f"the decoder's batch is the cache's rows alone, so unbind them first")
        for slot, row in enumerate(cache.rows):
            engine.bind(slot, row)
        self.model, self.cache = model, cache
        self.slots = SlotDecoder(engine)
        self.num_tokens = 0
        self._steps = self._left = 0  # steps reserved, steps of them not run yet
        self._in_step = False  # inside step(): the only forward the reserved steps may take
        self._forward = self._device_step
        if options is not None:
            for tensor in self.slots.static_tensors():  # CUDA graphs replay them in place
                torch._dynamo.mark_static_address(tensor)
            self._forward = torch.compile(self._device_step, **options)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt (or any chunk of T tokens) through the ordinary, eager path; returns the
        logits of its last position, [B, vocab]."""
        if self.cache.decoder is not None:
            raise RuntimeError("CompiledDecoder.prefill: reserved steps are running; commit() them first")
        with torch.no_grad():
            return self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                              logits_to_keep=1).logits[:, -1]

    def reserve(self, steps: int) -> None:
        """Host work for the next `steps` tokens (outside any graph): pages for them, every page
        of the sequences within the kernel's reach. Raises paged_kv.PagerError when the tiers
        cannot make room, or paged_kv.FaultError when a page is still out of reach (see
        SlotDecoder.reserve)."""
        engine = self.cache.engine
        engine._check_open()
        if self._steps:
            raise RuntimeError(f"CompiledDecoder.reserve: {self._steps} reserved steps are not committed yet")
        if self.cache.decoder is not None:
            raise RuntimeError("CompiledDecoder.reserve: another CompiledDecoder has reserved steps on this cache; "
                               "commit() them first")
        for row in self.cache.rows:  # a forward that failed part-way is taken back, as a forward would
            engine.drop_unfinished(row)
        if engine.bound() != self.cache.rows:
            raise RuntimeError(
                f"CompiledDecoder.reserve: the engine's bound rows {engine.bound()} are not the cache's rows "
                f"{self.cache.rows} (something rebound the batch slots)"
            )
        self.slots.reserve(steps)
        self.num_tokens = engine.num_tokens(self.cache.rows[0])
        self._steps = self._left = steps
        self.cache.decoder = self

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One reserved decode step: input_ids [B, 1] (the sequences' next tokens, on the model's
        device) through the compiled forward; returns the next logits, [B, vocab] (a copy,
        which later steps leave alone). It reads no device value on the host; on CUDA each
        paged_kv op still waits for its input checks unless they are deferred
        (paged_kv.deferred_checks(), as generate() does) or captured in a CUDA graph."""
        if not self._left:
            state = f"all {self._steps} reserved steps have run; commit()" if self._steps else "call reserve(steps)"
            raise RuntimeError(f"CompiledDecoder.step: no reserved step left: {state} first")
        batch = len(self.cache.rows)
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != (batch, 1):
            raise ValueError(f"CompiledDecoder.step: input_ids must be a [{batch}, 1] tensor (one token per "
                             f"sequence), got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        self.cache.engine._check_open()
        self._in_step = True
        try:
            with torch.no_grad():
                logits = self._forward(input_ids)
        finally:
            self._in_step = False
        self._left -= 1
        self.num_tokens += 1
        # Under CUDA graphs the output is a buffer the next replay overwrites.
        return logits.clone()

    def commit(self) -> None:
        """After the reserved steps: the host's bookkeeping, and one read of the fault count;
        raises paged_kv.FaultError when a step met a page out of reach (SlotDecoder.commit)."""
        if not self._steps:
            raise RuntimeError("CompiledDecoder.commit: no steps are reserved")
        if self._left:
            raise RuntimeError(f"CompiledDecoder.commit: {self._left} of the {self._steps} reserved steps "
                               f"have not run; run them first")
        steps, self._steps = self._steps, 0
        self.cache.decoder = None
        self.slots.commit(steps)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, steps_per_reserve: int = 16
                 ) -> torch.Tensor:
        """Greedy decoding: the prompt through prefill(), then max_new_tokens - 1 compiled steps,
        reserved and committed `steps_per_reserve` at a time (the host synchronises once per
        commit). Returns [B, T + max_new_tokens], the prompt and the new tokens, as
        model.generate(do_sample=False) does; it does not stop at an end-of-sequence token."""
        for name, value in (("max_new_tokens", max_new_tokens), ("steps_per_reserve", steps_per_reserve)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CompiledDecoder.generate: {name} must be a positive int, got {value!r}")
        token = self.prefill(input_ids).argmax(-1, keepdim=True)
        tokens = [input_ids, token]
        left = max_new_tokens - 1
        with ops.deferred_checks():  # the ops' input checks wait for no kernel; raised at the end
            while left:
                steps = min(steps_per_reserve, left)
                self.reserve(steps)
                for _ in range(steps):
                    token = self.step(token).argmax(-1, keepdim=True)
                    tokens.append(token)
                self.commit()
                left -= steps
        return torch.cat(tokens, 1)

    # ---- the step's device work (traced by torch.compile) ----

    def _device_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self._positions()
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    def _positions(self) -> torch.Tensor:
        """Each sequence's next position, [B, 1] int64, from the device lengths."""
        return self.slots.lengths[: len(self.cache.rows)].to(torch.int64).unsqueeze(1)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor, layer: int) -> None:
        if not self._in_step:
            # A forward of the model's own, which the reservation does not count: its token
            # would move the device lengths past the host's record of them.
            raise RuntimeError(
                "PagedKVCache: between CompiledDecoder.reserve() and commit() the model runs through "
                "CompiledDecoder.step() alone; commit() the reserved steps before calling the model"
            )
        if key_states.shape[2] != 1:
            raise ValueError(
                f"PagedKVCache: between CompiledDecoder.reserve() and commit() a forward step takes one "
                f"token per sequence, got {key_states.shape[2]}"
            )
        # [B, H, 1, D] -> the decoder's [B, H, D]
        self.slots.append(key_states[:, :, 0], value_states[:, :, 0], layer)

    def _attend(self, query: torch.Tensor, layer: int, scale: float | None, window: int) -> torch.Tensor:
        """query [B, Hq, 1, D] -> output [B, 1, Hq, D]."""
        out = self.slots.attend(query[:, :, 0].contiguous(), layer, scale=scale, window=window)
        return out.unsqueeze(1)


def paged_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "paged_kv" attention function: query [B, Hq, T, D] attends each sequence's whole
    context in the PagedKVCache the layer just updated; returns ([B, T, Hq, D], None)."""
    layer = getattr(module, "layer_idx", None)
    cache = getattr(_last_update, "cache", None)
    if getattr(_last_update, "layer", None) != layer:
        cache = None
    _last_update.cache = _last_update.layer = None
    try:
        return _attend_in_cache(cache, module, layer, query, key, attention_mask, scaling, dropout, kwargs), None
    except BaseException:
        if cache is not None and cache.decoder is None and layer == len(cache.layers) - 1:
            # Every layer holds the forward's tokens now, and full pages of them may be sealed
            # and moved: they cannot be taken back yet, and a retry would add them twice. (A
            # failure at an earlier layer is taken back by the next forward: drop_unfinished.)
            cache.unusable = (
                f"a forward failed at its last layer's attention, after every layer had written its "
                f"{query.shape[2]} token(s), which cannot be taken back yet (a retry would hold them twice); "
                f"build a new PagedKVCache"
            )
        raise


def _attend_in_cache(cache, module, layer, query, key, attention_mask, scaling, dropout, kwargs) -> torch.Tensor:
    unsupported = _unsupported_attention(module, kwargs)
    if unsupported:
        raise ValueError(f"paged_kv attention does not support {unsupported} ({type(module).__name__}, layer "
                         f"{layer}); load this model with another attn_implementation")
    if cache is None:
        raise RuntimeError(
            f"paged_kv attention (layer {layer}): no PagedKVCache was updated for this layer just before; "
            f"pass past_key_values=PagedKVCache.for_model(model, policy) to the model or to generate()"
        )
    if attention_mask is not None:
        # The "paged_kv" mask function makes no mask, so one here is the caller's own (a 4-D
        # attention_mask, which transformers passes through as given).
        raise ValueError(
            f"paged_kv attention cannot apply a custom attention mask (a {attention_mask.dim()}-D attention_mask "
            f"reached layer {layer}): its kernel masks by position only (causal, and the sliding window); pass "
            f"no mask or a 2-D mask of ones"
        )
    if dropout:
        raise ValueError("paged_kv attention does not support dropout; call model.eval()")
    batch, q_heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise RuntimeError(f"paged_kv attention: the cache handed back {key.shape[2]} keys for {length} queries")
    # Mistral and Qwen2 pass their window; a layer without one gets None.
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None)) or 0
    if cache.decoder is not None:
        return cache.decoder._attend(query, layer, scaling, window)
    q = query.transpose(1, 2).reshape(batch * length, q_heads, head_dim)
    starts = [b * length for b in range(batch + 1)]
    out = cache.engine.attention(q.contiguous(), cache.rows, starts, layer, scale=scaling, window=window)
    if layer == len(cache.layers) - 1:
        cache._last_forward_whole = True
    return out.reshape(batch, length, q_heads, head_dim)


def _unsupported_attention(module, kwargs) -> str | None:
    """What in a layer's call the paged kernel cannot compute (it would be silently left out), or
    None: the kernel is causal softmax attention with a scale, a window and sink tokens only."""
    if kwargs.get("softcap") is not None:  # Gemma 2
        return "attention logit soft-capping (softcap)"
    if kwargs.get("s_aux") is not None:  # learned sink logits (GPT-OSS)
        return "learned attention-sink logits (s_aux)"
    if kwargs.get("position_bias") is not None:
        return "an additive position bias"
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    if not causal:
        return "non-causal attention (is_causal=False)"
    return None


def _too_long_for_frames(cache: PagedKVCache, tokens: int) -> PagerError:
    """The error for a forward whose new tokens need more GPU frames at once than the engine can
    free: a step's pages stay in frames until every layer has written them."""
    engine, batch = cache.engine, len(cache.rows)
    page = engine.page_size
    chunk = max(page, (engine.num_frames // batch - 1) * page)
    return PagerError(
        f"PagedKVCache: a forward of {tokens} new tokens per sequence ({batch} sequences) needs their pages "
        f"in GPU frames at once (a step's pages stay in frames until every layer has written them), and the "
        f"engine's {engine.num_frames} frames cannot hold them: pass prefill_chunk_size={chunk} (or less) "
        f"to generate(), feed the prompt in chunks of at most that many tokens, or raise Policy.gpu_budget"
    )


def _compile_options(compile) -> dict | None:
    """CompiledDecoder's `compile` argument as torch.compile options (None: run eagerly)."""
    if isinstance(compile, dict):
        return {"fullgraph": True, **compile}
    if isinstance(compile, bool):
        return {"fullgraph": True} if compile else None
    raise TypeError(f"CompiledDecoder: compile must be a bool or a dict of torch.compile options, "
                    f"got {type(compile).__name__}")


def _check_attention(model, where: str):
    """The model's text config; raises unless its attention is "paged_kv"."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "_attn_implementation", None) != NAME:
        raise ValueError(
            f"{where}: the model's attention implementation is "
            f"{getattr(config, '_attn_implementation', None)!r}; load it with "
            f"attn_implementation={NAME!r}, or its attention would see only the new tokens"
        )
    return config


def _unpadded_mask(*args, attention_mask=None, **kwargs):
    """No mask: the engine's kernel is causal by position. A padded batch is refused."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("paged_kv attention does not support padded batches yet; batch equal-length prompts")
    return None


def _register_falcon() -> None:
    """Falcon picks its attention class by name instead of going through the attention interface:
    add a "paged_kv" class that computes Q/K/V as FalconAttention does and attends through the
    cache. Falcon's ALiBi positions are refused (rotary only)."""
    try:
        from transformers.models.falcon import modeling_falcon as falcon
    except ImportError:  # pragma: no cover - a transformers without Falcon
        return

    class PagedFalconAttention(falcon.FalconAttention):
        def forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                    use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
            if alibi is not None:
                raise ValueError("paged_kv attention does not support Falcon's ALiBi positions (config.alibi=True)")
            kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
            query, key, value = self._split_heads(self.query_key_value(hidden_states))
            batch, length = query.shape[:2]
            query = query.transpose(1, 2).reshape(batch, self.num_heads, length, self.head_dim)
            key = key.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
            value = value.transpose(1, 2).reshape(batch, kv_heads, length, self.head_dim)
            cos, sin = position_embeddings
            query, key = falcon.apply_rotary_pos_emb(query, key, cos, sin)
            if layer_past is not None:
                key, value = layer_past.update(key, value, self.layer_idx)
            out, _ = paged_kv_attention(self, query, key, value, attention_mask, scaling=self.head_dim ** -0.5)
            return self.dense(out.reshape(batch, length, self.num_heads * self.head_dim)), None

    falcon.FALCON_ATTENTION_CLASSES[NAME] = PagedFalconAttention


AttentionInterface.register(NAME, paged_kv_attention)
AttentionMaskInterface.register(NAME, _unpadded_mask)
_register_falcon()
