"""End to end: a Llama-3-8B-shaped model under Hugging Face transformers, with paged_kv attention
and its PagedKVCache against transformers' sdpa attention with its DynamicCache, in one run.

Model: 32 layers, 32 query and 8 KV heads, head_dim 128, hidden 4096, intermediate 14336, vocab
128256, bf16, random weights, built on the GPU. One model serves every run: its attention
implementation is switched between "sdpa" and "paged_kv" (model.set_attn_implementation), so both
use the same weights.

Cases:
  fits_8k, fits_32k, fits_128k
      every page in GPU frames. Each attention prefills the same random prompt in one forward
      (logits of the last position only), then decodes `--steps` greedy single-token forward
      calls. paged_kv is fed sdpa's greedy tokens, so both see the same inputs and their logits
      can be compared. Bars: paged_kv's prefill time within 1.10 of sdpa's, its decode tokens/s
      at least sdpa's.
  beyond_128k
      a GPU budget of a quarter of the context's KV, the rest in pinned host slots that the
      kernel reads in place (zero-copy). The context is written straight into the engine
      (random K/V, Engine.append), not by a model prefill: a prefill chunk attending host pages
      would read each of them once per query tile over PCIe. Decode is held to the same-run
      physical bound: host KV bytes over the pinned host-to-GPU copy rate, plus GPU KV bytes and
      weight bytes over the HBM read rate; bar: at least 0.80 of it. Its logits are checked
      against sdpa over a DynamicCache holding the same K/V, built after the timed run.
Each row also records peak GPU memory against the KV budget plus the weights plus a fixed margin.
Each check's tolerance is measured on its case: twice the largest logit difference between the
sdpa reference and sdpa held to another of torch's kernels (sdpa_spread).

--quick: a tiny Llama (2 layers) on the CPU, contexts of 64 and 256 tokens; the GPU-only parts
(ceilings, bound, peak memory) become {"skipped": reason}. Run from the repository root:

    python bench/e2e.py [--quick] [--out DIR] [--device auto|cpu|cuda] [--cases REGEX] [--steps N]
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import ceilings
from bench.harness import (GiB, bench_args, bench_device, format_table, free_memory, summarize_us,
                           write_results)
from paged_kv import Policy, Tier
from paged_kv.pte import TIER_SHIFT

K = 1024

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TINY_LLAMA = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)
ROPE = {"rope_type": "default", "rope_theta": 500000.0}  # Llama 3's

MEMORY_MARGIN = 2 * GiB  # activations and workspace on top of the KV budget and the weights
CHECK_STEPS = 4  # decode steps whose logits are compared with sdpa's
COMPILE_WARMUP_STEPS = 3  # compiled steps left out of the timing: compilation, CUDA graph recording
# The check's tolerance is the precision's own spread, measured on each case: paged_kv may differ
# from sdpa by SPREAD_FACTOR times what another of torch's sdpa kernels differs from it by, on the
# same inputs (each of the three carries its own rounding error; two of them differ by up to twice
# one). The kernels are tried in this order; one that cannot run the case, or that gives the
# reference's logits bit for bit (the kernel the reference ran), is passed over.
SPREAD_FACTOR = 2.0
ALTERNATIVE_KERNELS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
FILL_CHUNK = 16 * K  # tokens of random K/V appended at a time in the beyond case
# paged_kv prefills in chunks of this many tokens, so that the activations of a forward (about
# 116 KiB per token for this geometry: the MLP's three [T, 14336] tensors and the attention's)
# stay within MEMORY_MARGIN, and the whole case's peak within the limit; sdpa prefills in one
# forward, transformers' default.
PREFILL_CHUNK = 8 * K
WARMUP_TOKENS = 256

BARS = {
    "prefill_ratio_vs_sdpa": (1.10, "paged_kv prefill_ms / sdpa prefill_ms <= 1.10"),
    "decode_ratio_vs_sdpa": (1.0, "paged_kv tokens_per_s / sdpa tokens_per_s >= 1.0"),
    "fraction_of_bound": (0.80, "bound_ms_per_token / decode_ms_per_token >= 0.80"),
    "within_margin": (True, "memory.peak_decode_bytes <= memory.memory_limit_bytes"),
}

FORMULAS = {
    "kv_bytes_per_token": "num_layers * 2 (K, V) * num_kv_heads * head_dim * element size",
    "weight_bytes_read_per_token": "every parameter's bytes except the input embedding table, of which "
                                   "one row is read per token",
    "bound_ms_per_token": "host KV bytes / h2d_pinned rate + (GPU KV bytes + weight bytes read) / "
                          "hbm_read rate, at the context length where decode starts; same-run ceilings",
    "fraction_of_bound": "bound_ms_per_token / decode_ms_per_token (1.0: at the bound)",
    "decode_ms_per_token": "median over the steps of one model(next_token, past_key_values=cache) call, "
                           "with a device synchronisation before and after",
    "prefill_ms": "model(prompt, past_key_values=cache, logits_to_keep=1), synchronised: one call for sdpa, "
                  "one call per prefill_chunk_tokens of the prompt for paged_kv",
    "memory_limit_bytes": "kv_budget_bytes + weight_bytes + margin_bytes; kv_budget_bytes is the "
                          "engine's GPU frames (paged_kv) or the dense cache's final size (sdpa)",
    "within_margin": "peak_decode_bytes <= memory_limit_bytes (prefill activations grow with the "
                     "prompt; the whole case's peak is peak_bytes, held to the same limit in "
                     "peak_within_margin without a bar)",
    "logits_rel_diff": "max |paged_kv - sdpa| / max |sdpa| over the logits of a position",
    "sdpa_spread": "max logits_rel_diff between sdpa held to another kernel (torch.nn.attention.sdpa_kernel) "
                   "and the sdpa reference, over the same positions and inputs",
    "tolerance": f"{SPREAD_FACTOR} * sdpa_spread",
    "correct": f"greedy tokens agree with sdpa's on the prefill and the first {CHECK_STEPS} decode "
               f"steps, or every logits_rel_diff <= tolerance",
}


@dataclass(frozen=True)
class Case:
    name: str
    context: int  # tokens before decoding starts
    gpu_share: float | None  # share of the context's KV the GPU budget holds; None: all of it


FULL_CASES = (Case("fits_8k", 8 * K, None), Case("fits_32k", 32 * K, None),
              Case("fits_128k", 128 * K, None), Case("beyond_128k", 128 * K, 0.25))
QUICK_CASES = (Case("fits_64", 64, None), Case("fits_256", 256, None), Case("beyond_256", 256, 0.25))


@dataclass(frozen=True)
class Setup:
    """What every case of a run shares."""
    device: torch.device
    dtype: torch.dtype
    page_size: int
    steps: int
    fill_chunk: int
    prefill_chunk: int  # paged_kv's prefill chunk (tokens)
    ceilings: dict
    compiled: bool = False  # also run the compiled decode step in the fits cases


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_paged(cache, device: torch.device) -> None:
    """Closes a PagedKVCache's engine (its pools go with it) and hands the memory back."""
    if cache is not None:
        cache.engine.close()
    free_memory()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """fn()'s result and its wall time in seconds, with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Model and caches
# ---------------------------------------------------------------------------------------------


def build_model(quick: bool, device: torch.device, dtype: torch.dtype, max_tokens: int):
    import transformers

    import paged_kv.integrations.transformers  # noqa: F401 - registers attn_implementation="paged_kv"

    geometry = TINY_LLAMA if quick else LLAMA3_8B
    config = transformers.LlamaConfig(**geometry, max_position_embeddings=max_tokens, rope_parameters=dict(ROPE))
    torch.manual_seed(0)
    with torch.device(device):  # weights made and initialised where they run
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="paged_kv", dtype=dtype)
    return model.eval()


def use_attention(model, name: str) -> None:
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch the model's attention to {name!r} "
                           f"(it is {model.config._attn_implementation!r})")


def kv_bytes_per_token(model) -> int:
    config = model.config
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * model.dtype.itemsize


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes_read_per_token(model) -> int:
    """What one decode step reads of the weights: all but the input embedding table, of which it
    reads one row."""
    embedding = model.get_input_embeddings().weight
    row_bytes = embedding.shape[1] * embedding.element_size()
    return weight_bytes(model) - embedding.shape[0] * row_bytes + row_bytes


def dense_cache(model):
    import transformers

    return transformers.DynamicCache(config=model.config)


def paged_cache(model, setup: Setup, case: Case, fault_mode: str = "service"):
    """A PagedKVCache whose GPU frames hold the whole context and the decoded tokens (fits) or
    `case.gpu_share` of the context's KV, with the rest in host slots read in place (beyond)."""
    from paged_kv.integrations.transformers import PagedKVCache

    max_tokens = case.context + setup.steps + 1
    page_bytes = Policy(page_size=setup.page_size).page_bytes(
        model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim, model.dtype.itemsize)
    pages = -(-max_tokens // setup.page_size)
    if case.gpu_share is None:
        policy = Policy(page_size=setup.page_size, gpu_budget=(pages + 1) * page_bytes, fault_mode=fault_mode)
    else:
        # The frames must also hold a fill chunk's pages: a step's pages stay open until written.
        frames = max(int(case.gpu_share * case.context) // setup.page_size,
                     fill_chunk_tokens(setup, case.context) // setup.page_size + 2)
        policy = Policy(page_size=setup.page_size, gpu_budget=frames * page_bytes,
                        host_budget=pages * page_bytes, zero_copy=True)
    return PagedKVCache.for_model(model, policy, max_tokens=max_tokens)


def fill_chunk_tokens(setup: Setup, context: int) -> int:
    return min(setup.fill_chunk, context)


def random_kv(model, setup: Setup, layer: int, chunk: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ([tokens, KV heads, head_dim]) of one chunk of one layer, the same on every call."""
    config = model.config
    g = torch.Generator(device=setup.device).manual_seed(1_000_003 * layer + chunk)
    shape = (tokens, config.num_key_value_heads, config.head_dim)
    key = torch.randn(shape, generator=g, device=setup.device, dtype=setup.dtype)
    return key, torch.randn(shape, generator=g, device=setup.device, dtype=setup.dtype)


def chunks(context: int, size: int) -> list[tuple[int, int]]:
    """(index, tokens) of each chunk of `size` tokens of a context."""
    return [(i, min(size, context - start)) for i, start in enumerate(range(0, context, size))]


def fill_paged(cache, model, setup: Setup, context: int) -> None:
    engine, row = cache.engine, cache.rows[0]
    for index, n in chunks(context, fill_chunk_tokens(setup, context)):
        for layer in range(engine.num_layers):
            key, value = random_kv(model, setup, layer, index, n)
            engine.append(row, key, value, layer)


def fill_dense(cache, model, setup: Setup, context: int) -> None:
    """The same K/V as fill_paged, in a DynamicCache ([1, KV heads, tokens, head_dim] per layer)."""
    parts = chunks(context, fill_chunk_tokens(setup, context))
    for layer in range(model.config.num_hidden_layers):
        keys, values = zip(*(random_kv(model, setup, layer, index, n) for index, n in parts))
        key = torch.cat(keys).transpose(0, 1).unsqueeze(0)
        value = torch.cat(values).transpose(0, 1).unsqueeze(0)
        del keys, values
        cache.update(key, value, layer)


def residency(cache) -> dict:
    """Pages of the cache's sequence per tier, from the pager's mirror of the page table."""
    engine, row = cache.engine, cache.rows[0]
    pages = engine.pager.num_pages(row)
    tiers = (engine.pager.page_table()[row, :pages].to(torch.int64) & 0xFFFFFFFF) >> TIER_SHIFT
    return {"gpu_pages": int((tiers == Tier.GPU).sum()), "host_pages": int((tiers == Tier.HOST).sum()),
            "pages": pages}


# ---------------------------------------------------------------------------------------------
# Prefill and decode
# ---------------------------------------------------------------------------------------------


def prefill(model, cache, prompt: torch.Tensor, device: torch.device,
            chunk: int | None = None) -> tuple[torch.Tensor, float]:
    """The prompt in one forward, or in forwards of `chunk` tokens; returns the last position's
    logits [1, vocab] and the seconds of all of it."""
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def chunked() -> torch.Tensor:
        for start in range(0, prompt.shape[1], chunk):
            logits = forward(prompt[:, start:start + chunk])
        return logits

    with torch.no_grad():
        return timed(chunked if chunk else lambda: forward(prompt), device)


def decode(model, cache, first: torch.Tensor, steps: int, device: torch.device,
           forced: list[torch.Tensor] | None = None) -> dict:
    """`steps` single-token forward calls from `first` ([1, 1]). Each step's input is the greedy
    token of the step before, or forced[step - 1] when given (another run's greedy tokens).
    Returns each step's milliseconds, greedy tokens and the logits of the first
    COMPILE_WARMUP_STEPS + CHECK_STEPS."""
    token, step_ms, greedy, logits_kept = first, [], [], []
    with torch.no_grad():
        for step in range(steps):
            def forward(token=token):
                logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
                return logits, logits.argmax(-1, keepdim=True)

            (logits, chosen), seconds = timed(forward, device)
            step_ms.append(seconds * 1e3)
            greedy.append(chosen)
            if step < COMPILE_WARMUP_STEPS + CHECK_STEPS:
                logits_kept.append(logits.float().cpu())
            token = forced[step] if forced is not None else chosen
    return {"step_ms": step_ms, "greedy": greedy, "logits": logits_kept}


def decode_figures(run: dict) -> dict:
    summary = summarize_us([ms * 1e3 for ms in run["step_ms"]])
    median = summary["median_us"] / 1e3
    return {"decode_ms_per_token": median, "decode_p10_ms": summary["p10_us"] / 1e3,
            "decode_p90_ms": summary["p90_us"] / 1e3, "tokens_per_s": 1e3 / median}


def logits_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def decode_diffs(run: dict, ref_run: dict) -> list[float]:
    """logits_rel_diff of each of the first CHECK_STEPS decode steps two runs both kept."""
    return [logits_rel_diff(a, b) for a, b in zip(run["logits"][:CHECK_STEPS], ref_run["logits"][:CHECK_STEPS])]


def check_against(run: dict, ref_run: dict, spread: dict) -> dict:
    """paged_kv's logits and greedy tokens against sdpa's for the same inputs: the prefill's last
    position (when both prefilled) and the first CHECK_STEPS decode steps, held to SPREAD_FACTOR
    times `spread` (sdpa_spread's record; without a measured spread only the tokens decide)."""
    diffs = decode_diffs(run, ref_run)
    tokens = [int(t) for t in run["greedy"][:len(diffs)]] == [int(t) for t in ref_run["greedy"][:len(diffs)]]
    tolerance = SPREAD_FACTOR * spread["logits_rel_diff"] if "logits_rel_diff" in spread else None
    result = {"reference": "sdpa, same weights and inputs", "checked_steps": len(diffs),
              "decode_logits_rel_diff": max(diffs), "sdpa_spread": spread, "tolerance": tolerance}
    if run.get("prefill_logits") is not None and ref_run.get("prefill_logits") is not None:
        result["prefill_logits_rel_diff"] = logits_rel_diff(run["prefill_logits"], ref_run["prefill_logits"])
        diffs.append(result["prefill_logits_rel_diff"])
        tokens = tokens and int(run["prefill_logits"].argmax()) == int(ref_run["prefill_logits"].argmax())
    result["tokens_agree"] = tokens
    result["correct"] = tokens or (tolerance is not None and max(diffs) <= tolerance)
    return result


def sdpa_spread(rerun: Callable[[], dict], reference: dict, device: torch.device) -> dict:
    """The precision's own spread on a case: `rerun()` repeats the sdpa reference run (same inputs,
    same positions) and is called with sdpa held to each of ALTERNATIVE_KERNELS in turn until one
    runs the case and lands off the reference's logits; returns that kernel and its largest
    logits_rel_diff, with why the kernels before it were passed over."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    passed_over = {}
    for name in ALTERNATIVE_KERNELS:
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                run = rerun()
        except RuntimeError as error:  # no such kernel for these inputs, or out of memory
            passed_over[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        finally:
            free_memory()
        diffs = decode_diffs(run, reference)
        if run.get("prefill_logits") is not None:
            diffs.append(logits_rel_diff(run["prefill_logits"], reference["prefill_logits"]))
        if max(diffs) == 0.0:
            passed_over[name] = "the reference's own kernel: identical logits"
            continue
        return {"kernel": name, "logits_rel_diff": max(diffs), "passed_over": passed_over}
    return {"skipped": "no other sdpa kernel ran this case off the reference's logits", "passed_over": passed_over}


# ---------------------------------------------------------------------------------------------
# Figures held to ceilings and budgets
# ---------------------------------------------------------------------------------------------


def decode_bound(setup: Setup, host_bytes: int, gpu_bytes: int) -> dict:
    """The time one decode step needs at least: `host_bytes` at the pinned copy rate plus
    `gpu_bytes` (KV and weights) at the HBM read rate, both measured in this run."""
    if setup.device.type != "cuda":
        return {"skipped": "the bound needs the GPU's same-run ceilings (hbm_read, h2d_pinned)"}
    hbm = setup.ceilings.get("hbm_read", {}).get("gbps")
    h2d = setup.ceilings.get("h2d_pinned", {}).get("gbps")
    if hbm is None or (host_bytes and h2d is None):
        return {"skipped": f"a ceiling was not measured: {setup.ceilings}"}
    seconds = gpu_bytes / (hbm * 1e9) + (host_bytes / (h2d * 1e9) if host_bytes else 0.0)
    return {"host_bytes_per_token": host_bytes, "gpu_bytes_per_token": gpu_bytes, "hbm_read_gbps": hbm,
            "h2d_pinned_gbps": h2d, "bound_ms_per_token": seconds * 1e3}


def memory_record(setup: Setup, peaks: dict, kv_budget: int, weights: int) -> dict:
    if setup.device.type != "cuda":
        return {"skipped": "peak GPU memory needs a GPU (torch.cuda.max_memory_allocated)"}
    limit = kv_budget + weights + MEMORY_MARGIN
    whole = max(peaks["prefill"], peaks["decode"])
    return {"peak_bytes": whole, "peak_prefill_bytes": peaks["prefill"], "peak_decode_bytes": peaks["decode"],
            "kv_budget_bytes": kv_budget, "weight_bytes": weights, "margin_bytes": MEMORY_MARGIN,
            "memory_limit_bytes": limit, "within_margin": peaks["decode"] <= limit,
            "peak_within_margin": whole <= limit}


def apply_bars(row: dict, names: list[str]) -> None:
    """bar, bar_rule and met of `row` for the BARS in `names`; met is None where a figure is missing."""
    row["bar"] = {name: BARS[name][0] for name in names}
    row["bar_rule"] = " and ".join(BARS[name][1] for name in names)
    verdicts = {}
    for name in names:
        # The memory verdict lives in the row's memory record (absent or skipped off a GPU).
        value = row.get("memory", {}).get(name) if name == "within_margin" else row.get(name)
        if value is None:
            verdicts[name] = None
        elif name == "within_margin":
            verdicts[name] = value is True
        elif name == "prefill_ratio_vs_sdpa":
            verdicts[name] = value <= BARS[name][0]
        else:
            verdicts[name] = value >= BARS[name][0]
    row["met_by_bar"] = verdicts
    row["met"] = None if None in verdicts.values() else all(verdicts.values())


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def base_row(case: Case, attention: str, setup: Setup) -> dict:
    return {"case": case.name, "attention": attention, "context_tokens": case.context, "decode_steps": setup.steps,
            "prefill_ms": None, "decode_ms_per_token": None, "tokens_per_s": None,
            "prefill_ratio_vs_sdpa": None, "decode_ratio_vs_sdpa": None, "fraction_of_bound": None}


def failed(row: dict, error: BaseException, attention: str) -> dict:
    """Record why a run stopped: an sdpa run out of GPU memory is a skip, anything else an error."""
    message = f"{type(error).__name__}: {error}"
    if attention == "sdpa" and isinstance(error, torch.cuda.OutOfMemoryError):
        row["skipped"] = f"sdpa could not run this case: {message}"
    else:
        row["error"] = message
    return row


def prompt_for(case: Case, model, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.context)
    return torch.randint(0, model.config.vocab_size, (1, case.context), generator=g).to(device)


def run_prefill_and_decode(model, cache, prompt, setup: Setup, first=None, forced=None,
                           chunk: int | None = None) -> tuple[dict, dict]:
    """Prefill (in chunks of `chunk` tokens, when given), then decode (from the prefill's greedy
    token, or `first`); returns the figures and the raw run (with the prefill logits)."""
    device = setup.device
    reset_peak(device)
    logits, seconds = prefill(model, cache, prompt, device, chunk)
    peaks = {"prefill": peak_bytes(device)}
    reset_peak(device)
    first = logits.argmax(-1, keepdim=True) if first is None else first
    run = decode(model, cache, first, setup.steps, device, forced)
    peaks["decode"] = peak_bytes(device)
    run.update(prefill_logits=logits.float().cpu(), first=first, peaks=peaks)
    return {"prefill_ms": seconds * 1e3, **decode_figures(run)}, run


def run_fits(model, case: Case, setup: Setup) -> list[dict]:
    """sdpa with its DynamicCache, then paged_kv with every page in GPU frames, fed sdpa's tokens."""
    device, prompt = setup.device, prompt_for(case, model, setup.device)
    weights = weight_bytes(model)
    kv_read = case.context * kv_bytes_per_token(model) + weight_bytes_read_per_token(model)

    sdpa_row, reference = base_row(case, "sdpa", setup), None
    use_attention(model, "sdpa")
    cache = dense_cache(model)
    try:
        figures, reference = run_prefill_and_decode(model, cache, prompt, setup)
        sdpa_row.update(figures)
        sdpa_row["memory"] = memory_record(setup, reference["peaks"],
                                           (case.context + setup.steps) * kv_bytes_per_token(model), weights)
        sdpa_row["bound"] = decode_bound(setup, 0, kv_read)
    except Exception as error:  # record it and go on to paged_kv
        failed(sdpa_row, error, "sdpa")
    finally:
        del cache
        free_memory()
    if reference is not None:
        short = replace(setup, steps=min(CHECK_STEPS, setup.steps))
        reference["spread"] = sdpa_spread(
            lambda: run_prefill_and_decode(model, dense_cache(model), prompt, short, reference["first"],
                                           reference["greedy"])[1], reference, device)

    paged_row = base_row(case, "paged_kv", setup)
    use_attention(model, "paged_kv")
    cache = None
    try:
        cache = paged_cache(model, setup, case)
        paged_row.update(page_size=setup.page_size, gpu_budget_bytes=cache.engine.policy.gpu_budget)
        forced = reference["greedy"] if reference else None
        first = reference["first"] if reference else None
        figures, run = run_prefill_and_decode(model, cache, prompt, setup, first, forced, setup.prefill_chunk)
        paged_row.update(figures, prefill_chunk_tokens=setup.prefill_chunk)
        paged_row["memory"] = memory_record(setup, run["peaks"], cache.engine.num_frames * cache.engine.page_bytes,
                                            weights)
        paged_row["bound"] = decode_bound(setup, 0, kv_read)
        paged_row["residency"] = residency(cache)
        if reference:
            paged_row["check"] = check_against(run, reference, reference["spread"])
            paged_row["prefill_ratio_vs_sdpa"] = paged_row["prefill_ms"] / sdpa_row["prefill_ms"]
            paged_row["decode_ratio_vs_sdpa"] = paged_row["tokens_per_s"] / sdpa_row["tokens_per_s"]
        else:
            paged_row["check"] = {"skipped": "no sdpa reference: " + sdpa_row.get("skipped", sdpa_row.get("error", ""))}
        paged_row["correct"] = paged_row["check"].get("correct")
    except Exception as error:
        failed(paged_row, error, "paged_kv")
    finally:
        release_paged(cache, device)
    for row in (sdpa_row, paged_row):
        add_fraction_of_bound(row)
    sdpa_row.update(bar=None, bar_rule="the reference: no bar", met=None)
    apply_bars(paged_row, ["prefill_ratio_vs_sdpa", "decode_ratio_vs_sdpa", "within_margin"])
    if not setup.compiled:
        return [sdpa_row, paged_row]
    return [sdpa_row, paged_row, run_compiled(model, case, setup, prompt, reference, sdpa_row)]


def run_compiled(model, case: Case, setup: Setup, prompt: torch.Tensor, reference: dict | None,
                 sdpa_row: dict) -> dict:
    """paged_kv with the decode step compiled whole (CompiledDecoder: CUDA graphs on a GPU), every
    page in GPU frames, fed sdpa's tokens. The prompt goes through the eager path; the first
    COMPILE_WARMUP_STEPS steps (compilation, graph recording) are run but not timed, and the
    check compares the CHECK_STEPS after them with sdpa's logits at the same positions."""
    from paged_kv import ops
    from paged_kv.integrations.transformers import CompiledDecoder

    device = setup.device
    row = base_row(case, "paged_kv_compiled", setup)
    if reference is None:
        row["skipped"] = "needs sdpa's tokens: " + sdpa_row.get("skipped", sdpa_row.get("error", ""))
        return row
    use_attention(model, "paged_kv")
    cache = None
    try:
        cache = paged_cache(model, setup, case, fault_mode="forbid")
        options = {"mode": "reduce-overhead"} if device.type == "cuda" else {"backend": "aot_eager"}
        row.update(page_size=setup.page_size, gpu_budget_bytes=cache.engine.policy.gpu_budget,
                   compile_options=options)
        decoder = CompiledDecoder(model, cache, compile=options)
        chunk = setup.prefill_chunk
        reset_peak(device)
        _, seconds = timed(lambda: [decoder.prefill(prompt[:, i:i + chunk]) for i in range(0, prompt.shape[1], chunk)],
                           device)
        row["prefill_ms"] = seconds * 1e3
        peaks = {"prefill": peak_bytes(device)}
        reset_peak(device)
        steps = COMPILE_WARMUP_STEPS + setup.steps
        forced = reference["greedy"]
        token, step_ms, greedy, logits_kept = reference["first"], [], [], []
        decoder.reserve(steps)
        with ops.deferred_checks():  # as CompiledDecoder.generate: no input check waits for a kernel
            for step in range(steps):
                logits, seconds = timed(lambda token=token: decoder.step(token), device)
                step_ms.append(seconds * 1e3)
                greedy.append(logits.argmax(-1, keepdim=True))
                if step < COMPILE_WARMUP_STEPS + CHECK_STEPS:
                    logits_kept.append(logits.float().cpu())
                token = forced[step] if step < len(forced) else greedy[-1]
        decoder.commit()
        # the decode peak includes the compilation and the CUDA graphs' memory pool
        peaks["decode"] = peak_bytes(device)
        row["memory"] = memory_record(setup, peaks, cache.engine.num_frames * cache.engine.page_bytes,
                                      weight_bytes(model))
        timed_steps = step_ms[COMPILE_WARMUP_STEPS:]
        row.update(decode_figures({"step_ms": timed_steps}), compile_and_warmup_ms=sum(step_ms[:COMPILE_WARMUP_STEPS]))
        w = COMPILE_WARMUP_STEPS
        if len(reference["logits"]) > w:
            row["check"] = check_against({"logits": logits_kept[w:], "greedy": greedy[w:]},
                                         {"logits": reference["logits"][w:], "greedy": reference["greedy"][w:]},
                                         reference["spread"])
        else:
            row["check"] = {"skipped": f"sdpa decoded {len(reference['logits'])} steps, none past the "
                                       f"{w} compiled warm-up steps"}
        row["correct"] = row["check"].get("correct")
        row["decode_ratio_vs_sdpa"] = row["tokens_per_s"] / sdpa_row["tokens_per_s"]
        row["bound"] = decode_bound(setup, 0, case.context * kv_bytes_per_token(model)
                                    + weight_bytes_read_per_token(model))
        add_fraction_of_bound(row)
    except Exception as error:
        failed(row, error, "paged_kv_compiled")
    finally:
        release_paged(cache, device)
    row.update(bar=None, bar_rule="an extra row: the bars are read on the eager paged_kv row", met=None)
    return row


def add_fraction_of_bound(row: dict) -> None:
    bound = row.get("bound", {}).get("bound_ms_per_token")
    if bound is not None and row.get("decode_ms_per_token"):
        row["fraction_of_bound"] = bound / row["decode_ms_per_token"]


def run_beyond(model, case: Case, setup: Setup) -> list[dict]:
    """paged_kv over a context whose KV is `case.gpu_share` on the GPU and the rest in host slots,
    written straight into the engine; then sdpa over a DynamicCache of the same K/V for the check."""
    device = setup.device
    row = base_row(case, "paged_kv", setup)
    row["context_source"] = ("random K/V appended to the engine (Engine.append), not a model prefill: a prefill "
                             "chunk would read each host page once per query tile over PCIe")
    first = torch.ones((1, 1), dtype=torch.long, device=device)  # any token: the context is random K/V
    use_attention(model, "paged_kv")
    cache, run = None, None
    try:
        cache = paged_cache(model, setup, case)
        engine = cache.engine
        row.update(page_size=setup.page_size, gpu_budget_bytes=engine.policy.gpu_budget,
                   host_budget_bytes=engine.policy.host_budget,
                   context_kv_bytes=case.context * kv_bytes_per_token(model))
        reset_peak(device)
        _, seconds = timed(lambda: fill_paged(cache, model, setup, case.context), device)
        row["fill_ms"] = seconds * 1e3
        peaks = {"prefill": peak_bytes(device)}
        at_start = residency(cache)
        stats_before = engine.stats()
        reset_peak(device)
        run = decode(model, cache, first, setup.steps, device)
        run["first"] = first
        peaks["decode"] = peak_bytes(device)
        row.update(decode_figures(run))
        row["residency"] = at_start
        row["decode_engine_stats"] = engine_stats_delta(stats_before, engine.stats())
        host_bytes = at_start["host_pages"] * setup.page_size * kv_bytes_per_token(model)
        gpu_kv_bytes = case.context * kv_bytes_per_token(model) - host_bytes
        row["bound"] = decode_bound(setup, host_bytes, gpu_kv_bytes + weight_bytes_read_per_token(model))
        row["memory"] = memory_record(setup, peaks, engine.num_frames * engine.page_bytes, weight_bytes(model))
        add_fraction_of_bound(row)
    except Exception as error:
        failed(row, error, "paged_kv")
    finally:
        release_paged(cache, device)
    if run is not None:
        row["check"] = beyond_reference(model, case, setup, run)
        row["correct"] = row["check"].get("correct")
    apply_bars(row, ["fraction_of_bound", "within_margin"])
    return [row]


def beyond_reference(model, case: Case, setup: Setup, run: dict) -> dict:
    """sdpa over a DynamicCache holding the same K/V, fed paged_kv's tokens: the logits of the
    first CHECK_STEPS steps compared. A reference that does not fit the GPU is a skip."""
    def reference_run() -> dict:
        cache = dense_cache(model)
        try:
            fill_dense(cache, model, setup, case.context)
            return decode(model, cache, run["first"], min(CHECK_STEPS, setup.steps), setup.device, run["greedy"])
        finally:
            del cache
            free_memory()

    use_attention(model, "sdpa")
    try:
        reference = reference_run()
        return check_against(run, reference, sdpa_spread(reference_run, reference, setup.device))
    except torch.cuda.OutOfMemoryError as error:
        return {"skipped": f"the sdpa reference does not fit the GPU: {error}"}
    except Exception as error:  # a broken reference is a failure of the run, not of paged_kv's output
        return {"error": f"the sdpa reference failed: {type(error).__name__}: {error}"}
    finally:
        use_attention(model, "paged_kv")


def engine_stats_delta(before: dict, after: dict) -> dict:
    """What the engine did during the decode steps."""
    delta = {key: after[key] - before[key] for key in ("faults_seen", "fault_services", "fault_batches",
                                                        "prefetched_pages")}
    delta["bytes_moved"] = {k: after["bytes_moved"][k] - before["bytes_moved"][k] for k in after["bytes_moved"]}
    return delta


def warm_up(model, setup: Setup) -> None:
    """One short prefill and two decode steps under each attention, so the first timed case does
    not pay for kernel loading and allocator growth."""
    case = Case("warm_up", WARMUP_TOKENS, None)
    prompt = prompt_for(case, model, setup.device)
    short = replace(setup, steps=2)
    for attention in ("sdpa", "paged_kv"):
        use_attention(model, attention)
        cache = None
        try:
            cache = dense_cache(model) if attention == "sdpa" else paged_cache(model, short, case)
            run_prefill_and_decode(model, cache, prompt, short)
        except Exception as error:  # the cases record what fails; the warm-up only reports it
            print(f"warm-up under {attention} failed: {type(error).__name__}: {error}", file=sys.stderr)
        finally:
            if attention == "paged_kv" and cache is not None:
                cache.engine.close()
            del cache
            free_memory()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        reason = "needs a GPU (run on the CPU)"
        return {"hbm_read": {"skipped": reason}, "h2d_pinned": {"skipped": reason}}
    sizes = ceilings.QUICK if quick else ceilings.FULL
    return {"hbm_read": ceilings.guarded("hbm_read", lambda: ceilings.measure_hbm_read(sizes.hbm_bytes, sizes.repeat)),
            "h2d_pinned": ceilings.guarded("h2d_pinned",
                                            lambda: ceilings.measure_h2d_pinned(sizes.copy_bytes, sizes.repeat))}


def failure_of(row: dict) -> str | None:
    """Why a row counts as a failure (an error, or paged_kv's output differing from sdpa's)."""
    check = row.get("check", {})
    if "error" in row or "error" in check:
        return row.get("error") or check["error"]
    if row.get("correct") is False:
        return "output differs from sdpa's"
    return None


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def printed(rows: list[dict]) -> list[dict]:
    """The rows flattened for the table."""
    view = []
    for row in rows:
        memory = row.get("memory", {})
        peak = memory.get("peak_decode_bytes")
        view.append({**row, "peak_decode_gib": peak / GiB if peak is not None else None,
                     "within_margin": memory.get("within_margin"),
                     "status": row.get("error") or row.get("skipped") or ""})
    return view


def main(argv: list[str] | None = None) -> int:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--cases", default=".*", metavar="REGEX", help="run the cases whose name matches")
    parser.add_argument("--steps", type=int, default=None,
                        help="decode steps timed per run (default 32, 8 with --quick)")
    parser.add_argument("--compiled", action="store_true",
                        help="add a row per fits case with the decode step compiled (CompiledDecoder; CUDA "
                             "graphs on a GPU, aot_eager on a CPU)")
    args = parser.parse_args(argv)
    # --quick alone stays on the CPU; --quick --device cuda is a fast smoke test on the GPU.
    device = bench_device(args)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    cases = [c for c in (QUICK_CASES if args.quick else FULL_CASES) if re.search(args.cases, c.name)]
    if not cases:
        parser.error(f"--cases {args.cases!r} matches none of the cases")
    steps = args.steps if args.steps is not None else (8 if args.quick else 32)
    if steps < 1:
        parser.error("--steps must be at least 1")

    print("measuring ceilings ...", file=sys.stderr, flush=True)
    setup = Setup(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                  page_size=16 if args.quick else 256, steps=steps, fill_chunk=32 if args.quick else FILL_CHUNK,
                  prefill_chunk=128 if args.quick else PREFILL_CHUNK,
                  ceilings=measure_ceilings(device, args.quick), compiled=args.compiled)
    print("building the model ...", file=sys.stderr, flush=True)
    model = build_model(args.quick, device, setup.dtype, max(c.context for c in cases) + steps + WARMUP_TOKENS)
    warm_up(model, setup)

    rows: list[dict] = []
    for case in cases:
        print(f"{case.name} ...", file=sys.stderr, flush=True)
        rows += run_fits(model, case, setup) if case.gpu_share is None else run_beyond(model, case, setup)

    failures = [f"{r['case']} {r['attention']}: {failure}" for r in rows if (failure := failure_of(r))]
    below_bar = [r["case"] for r in rows if r.get("met") is False]
    print(format_table(printed(rows), ["case", "attention", "context_tokens", "prefill_ms", "decode_ms_per_token",
                                       "tokens_per_s", "prefill_ratio_vs_sdpa", "decode_ratio_vs_sdpa",
                                       "fraction_of_bound", "peak_decode_gib", "within_margin", "correct", "met",
                                       "status"]))
    extra = {"transformers": transformers_version(),
             "model": {**(TINY_LLAMA if args.quick else LLAMA3_8B), "rope": ROPE, "dtype": str(setup.dtype),
                       "weight_bytes": weight_bytes(model),
                       "weight_bytes_read_per_token": weight_bytes_read_per_token(model),
                       "kv_bytes_per_token": kv_bytes_per_token(model), "weights": "random (seed 0)"},
             "page_size": setup.page_size, "steps": steps, "check_steps": CHECK_STEPS,
             "spread_factor": SPREAD_FACTOR,
             "alternative_kernels": list(ALTERNATIVE_KERNELS), "memory_margin_bytes": MEMORY_MARGIN,
             "cases": [asdict(c) for c in cases],
             "bars": {name: {"bar": bar, "rule": rule} for name, (bar, rule) in BARS.items()},
             "formulas": FORMULAS, "failures": failures, "below_bar": below_bar}
    path = write_results("e2e", setup.ceilings, rows, args.out, extra, quick=args.quick, device=device)
    print(f"wrote {path}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
