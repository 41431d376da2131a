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

Supported: decoder-only models whose attention goes through transformers' attention interface
with a standard KV cache (tested: Llama, Mistral with its sliding window, Qwen2, GPT-NeoX), and
Falcon with rotary positions (its attention class is added under the same name); batches of
equal-length sequences without padding, greedy and sampled generation. Not supported yet, with a clear error: padding masks,
beam search (reordering the cache), cropping, dropout.
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

from paged_kv.engine import Engine
from paged_kv.policy import Policy

__all__ = ["NAME", "PagedKVCache", "paged_kv_attention"]

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
        batch = key_states.shape[0]
        if batch != len(cache.rows):
            raise ValueError(f"PagedKVCache holds {len(cache.rows)} sequences, the model's batch has {batch}")
        for b, row in enumerate(cache.rows):
            # [H, T, D] per row -> the engine's [T, H, D]
            cache.engine.append(row, key_states[b].transpose(0, 1), value_states[b].transpose(0, 1), self.layer)
        _last_update.cache, _last_update.layer = cache, self.layer
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cache.engine.num_tokens(self.cache.rows[0], self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.cache.engine.max_pages * self.cache.engine.page_size

    def reset(self) -> None:
        raise NotImplementedError("PagedKVCache cannot be reset; make a new one (PagedKVCache.for_model)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search yet (reordering the cache)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("PagedKVCache cannot be cropped yet")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedKVCache does not support repeating the batch (num_return_sequences > 1) yet")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("PagedKVCache does not support selecting batch rows yet")


class PagedKVCache(Cache):
    """A transformers Cache backed by a paged_kv.Engine: one engine sequence per batch row.

    Args:
        engine: an Engine with the model's KV geometry (layers, KV heads, head_dim, dtype, device).
        batch_size: the model's batch; that many new sequences are made (of `tenant`).
    Attributes: engine, rows (the engine's sequence rows, one per batch entry).
    """

    def __init__(self, engine: Engine, batch_size: int = 1, tenant: int = 0):
        if not isinstance(engine, Engine):
            raise TypeError(f"PagedKVCache needs a paged_kv.Engine, got {type(engine).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PagedKVCache: batch_size must be a positive int, got {batch_size!r}")
        self.engine = engine
        self.rows = [engine.new_sequence(tenant) for _ in range(batch_size)]
        super().__init__(layers=[_PagedLayer(self, layer) for layer in range(engine.num_layers)])

    @classmethod
    def for_model(cls, model, policy: Policy, batch_size: int = 1, *, max_tokens: int | None = None,
                  tenant: int = 0) -> PagedKVCache:
        """A cache with its own Engine sized from the model's config: its layers, KV heads,
        head_dim, dtype and device; room for `max_tokens` tokens per sequence (default the
        config's max_position_embeddings). The model's attention must be "paged_kv"."""
        config = model.config.get_text_config(decoder=True)
        if getattr(config, "_attn_implementation", None) != NAME:
            raise ValueError(
                f"PagedKVCache.for_model: the model's attention implementation is "
                f"{getattr(config, '_attn_implementation', None)!r}; load it with "
                f"attn_implementation={NAME!r}, or its attention would see only the new tokens"
            )
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if config.model_type == "falcon":  # as FalconAttention counts them
            kv_heads = config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        max_tokens = max_tokens or config.max_position_embeddings
        engine = Engine(policy, num_layers=config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                        dtype=model.dtype, device=model.device, max_sequences=batch_size,
                        max_pages=-(-max_tokens // policy.page_size))
        return cls(engine, batch_size, tenant)


def paged_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "paged_kv" attention function: query [B, Hq, T, D] attends each sequence's whole
    context in the PagedKVCache the layer just updated; returns ([B, T, Hq, D], None)."""
    layer = getattr(module, "layer_idx", None)
    cache = getattr(_last_update, "cache", None)
    if cache is None or getattr(_last_update, "layer", None) != layer:
        raise RuntimeError(
            f"paged_kv attention (layer {layer}): no PagedKVCache was updated for this layer just before; "
            f"pass past_key_values=PagedKVCache.for_model(model, policy) to the model or to generate()"
        )
    _last_update.cache = _last_update.layer = None
    if dropout:
        raise ValueError("paged_kv attention does not support dropout; call model.eval()")
    batch, q_heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise RuntimeError(f"paged_kv attention: the cache handed back {key.shape[2]} keys for {length} queries")
    # Mistral and Qwen2 pass their window; a layer without one gets None.
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None)) or 0
    q = query.transpose(1, 2).reshape(batch * length, q_heads, head_dim)
    starts = [b * length for b in range(batch + 1)]
    out = cache.engine.attention(q.contiguous(), cache.rows, starts, layer, scale=scaling, window=window)
    return out.reshape(batch, length, q_heads, head_dim), None


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
