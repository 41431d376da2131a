"""A Hugging Face model's decode step through CompiledDecoder, uncompiled and as CUDA graphs
(torch.compile mode="reduce-overhead"), with the context's pages in GPU frames or mostly in host
slots read in place (zero-copy, the slots given to the captured step as their mapped view).

Rows (a small random-weight Llama, bf16, one sequence, pages of 16 tokens; the prompt is fed in
chunks, then `--new` tokens are decoded in reservations of 32 steps, the first reservation, which
compiles and records the graphs, left out of the timing):
  frames       every page in a GPU frame (zero_copy=False)
  host_slots   GPU frames for 6 pages, every older page read in place from pinned host slots
Each row gives ms per token, and the host_slots rows the bytes read from host memory per step
against the same-run pinned host-to-GPU copy rate. Needs a GPU. Run from the repository root:

    python bench/compiled_decode.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import ceilings
from bench.e2e import kv_bytes_per_token, residency
from bench.harness import MiB, bench_args, format_table, write_results
from paged_kv import Policy

PAGE = 16
BLOCK = 32  # steps per reservation
PREFILL_CHUNK = 64  # fits the host_slots case's frames
HOST_CASE_FRAMES = 6
MODES = {"uncompiled": False, "cuda_graphs": {"mode": "reduce-overhead"}}


def build_model(quick: bool):
    import transformers

    import paged_kv.integrations.transformers  # noqa: F401  (registers attn_implementation="paged_kv")

    layers, hidden = (2, 256) if quick else (8, 1024)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=64, max_position_embeddings=8192, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="paged_kv")
    return model.to("cuda", torch.bfloat16).eval()


def decode(model, prompt: torch.Tensor, new: int, zero_copy: bool, frames: int, compile) -> dict:
    """Prefill in chunks, then `new` steps; ms per step over the reservations after the first, the
    greedy tokens, and the host pages each timed step read (summed)."""
    from paged_kv.integrations.transformers import CompiledDecoder, PagedKVCache

    total_pages = -(-(prompt.shape[1] + new) // PAGE) + 1
    page_bytes = PAGE * kv_bytes_per_token(model)
    policy = Policy(page_size=PAGE, gpu_budget=frames * page_bytes, host_budget=2 * total_pages * page_bytes,
                    fault_mode="forbid", zero_copy=zero_copy)
    torch._dynamo.reset()
    cache = PagedKVCache.for_model(model, policy, 1, max_tokens=prompt.shape[1] + new + PAGE)
    decoder = CompiledDecoder(model, cache, compile=compile)
    engine = cache.engine
    with torch.no_grad():
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            logits = decoder.prefill(prompt[:, start:start + PREFILL_CHUNK])
    token = logits.argmax(-1, keepdim=True)
    tokens, host_page_reads, started = [token], 0, None
    for block in range(new // BLOCK):
        if block == 1:
            torch.cuda.synchronize()
            started = time.perf_counter()
        decoder.reserve(BLOCK)
        if block:  # the pages each step of this reservation reads from host slots
            host_page_reads += BLOCK * residency(cache)["host_pages"]
        for _ in range(BLOCK):
            token = decoder.step(token).argmax(-1, keepdim=True)
            tokens.append(token)
        decoder.commit()
    torch.cuda.synchronize()
    steps = (new // BLOCK - 1) * BLOCK
    engine.pager.check_invariants()
    result = {"ms_per_token": (time.perf_counter() - started) * 1e3 / steps, "tokens": torch.cat(tokens, 1),
              "host_bytes_per_step": host_page_reads * page_bytes / steps}
    engine.close()
    return result


def run(quick: bool, repeats: int, pinned_gbps: float) -> list[dict]:
    model = build_model(quick)
    prompt_len, new = (128, 3 * BLOCK) if quick else (512, 8 * BLOCK)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len),
                           generator=torch.Generator().manual_seed(1)).cuda()
    context_pages = -(-(prompt_len + new) // PAGE)
    rows = []
    for case, zero_copy, frames in (("frames", False, context_pages + 2), ("host_slots", True, HOST_CASE_FRAMES)):
        runs = {}
        for mode, compile in MODES.items():
            results = [decode(model, prompt, new, zero_copy, frames, compile) for _ in range(repeats)]
            runs[mode] = min(results, key=lambda r: r["ms_per_token"])
            row = {"case": case, "mode": mode, "zero_copy": zero_copy, "gpu_frames": frames,
                   "context_pages": context_pages, "prompt_tokens": prompt_len, "decode_steps": new,
                   "timed_steps": new - BLOCK, "ms_per_token": runs[mode]["ms_per_token"],
                   "ms_per_token_all": [r["ms_per_token"] for r in results]}
            if zero_copy:
                host = runs[mode]["host_bytes_per_step"]
                row.update(host_mib_per_step=host / MiB, host_read_ms_at_pinned_copy=host / (pinned_gbps * 1e6))
            rows.append(row)
        graphs, eager = rows[-1], rows[-2]
        graphs["speedup_vs_uncompiled"] = eager["ms_per_token"] / graphs["ms_per_token"]
        # inductor rounds some bf16 steps differently from the eager kernels, so tokens may part
        graphs["same_tokens_as_uncompiled"] = bool(torch.equal(runs["cuda_graphs"]["tokens"],
                                                               runs["uncompiled"]["tokens"]))
    for r in rows:
        if r["case"] == "host_slots":
            same_mode = next(f for f in rows if f["case"] == "frames" and f["mode"] == r["mode"])
            r["ms_over_frames"] = r["ms_per_token"] - same_mode["ms_per_token"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row; the fastest is kept")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.device == "cpu" or not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the step is captured as CUDA graphs)")
    sizes = ceilings.QUICK if args.quick else ceilings.FULL
    pinned = ceilings.guarded("h2d_pinned", lambda: ceilings.measure_h2d_pinned(sizes.copy_bytes, sizes.repeat))
    if "gbps" not in pinned:
        raise SystemExit(f"compiled_decode: the pinned-copy ceiling could not be measured: {pinned}")
    rows = run(args.quick, args.repeats, pinned["gbps"])
    print(format_table(rows, ["case", "mode", "ms_per_token", "speedup_vs_uncompiled", "host_mib_per_step",
                              "host_read_ms_at_pinned_copy", "ms_over_frames"]))
    path = write_results("compiled_decode", {"h2d_pinned": pinned}, rows, args.out, quick=args.quick,
                         extra={"page_size": PAGE, "steps_per_reservation": BLOCK})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
