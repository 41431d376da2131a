"""`python -m paged_kv demo`: several sessions of one model whose contexts together exceed the
GPU budget, switched in turn.

By default the model is a small Llama-architecture model with random weights (no download), on
the GPU when there is one and on the CPU otherwise; `--model DIR` loads a local checkpoint
instead. Every session is a PagedKVCache in one shared Engine whose GPU budget holds about half of
all the sessions' KV; the rest lives in host slots and on disk. Each session gets a prompt
(random tokens), then the demo cycles through them: bind the session (the context switch: one
device write, no KV byte moves), decode a few tokens greedily, go to the next.

It shows a progress bar, then a summary (tokens/s, switch latency, the first step after a switch,
faults, bytes moved per tier, residency), checks the first session's tokens against the same
model under transformers' sdpa attention with its dense cache, and writes a PNG plot of per-step
latency and residency (`--plot`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import paged_kv
from paged_kv.policy import format_bytes


class DemoError(Exception):
    """A problem with the demo's inputs, reported as one line and exit status 2."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(args, device, dtype):
    import transformers

    if args.model:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="paged_kv",
                                                                      dtype=dtype)
        except (OSError, ValueError, KeyError) as error:  # no weights or config there, or no such architecture
            raise DemoError(f"--model {args.model}: could not load a causal language model from it: {error}") from error
    else:
        big = device.type == "cuda"
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=1024 if big else 256, intermediate_size=2816 if big else 512,
            num_hidden_layers=8 if big else 4, num_attention_heads=16 if big else 4,
            num_key_value_heads=4 if big else 2, head_dim=64, max_position_embeddings=1 << 20)
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="paged_kv", dtype=dtype)
    return model.eval().to(device)


def _dense_tokens(model, prompt, steps):
    """The same model under sdpa with its dense cache: the reference tokens."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa",
                                                        dtype=model.dtype)
    ref.load_state_dict(model.state_dict())
    ref = ref.eval().to(model.device)
    with torch.no_grad():
        out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def run(args) -> int:
    try:
        from paged_kv.integrations.transformers import PagedKVCache
    except ImportError as error:
        print(f"paged_kv demo: {error} (scripts/setup_env.sh installs it)")
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    model = _model(args, device, dtype)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prompt_len = args.prompt or (4096 if use_cuda else 256)
    per_session = prompt_len + args.turns * args.tokens_per_turn
    page_bytes = paged_kv.Policy(page_size=args.page_size).page_bytes(
        config.num_hidden_layers, kv_heads, head_dim, torch.empty((), dtype=dtype).element_size())
    pages_per_session = -(-per_session // args.page_size)
    total_pages = args.sessions * pages_per_session
    # The frames hold about half of all the KV, the host about a quarter, the disk the rest and
    # some. Both the frames and the host hold at least one prompt and a little: prefill writes a
    # prompt's pages at once, and pages reach the disk through the host.
    prompt_pages = -(-prompt_len // args.page_size) + 2
    gpu_pages, host_pages = max(total_pages // 2, prompt_pages), max(total_pages // 4, prompt_pages)
    policy = paged_kv.Policy(page_size=args.page_size, gpu_budget=gpu_pages * page_bytes,
                             host_budget=host_pages * page_bytes, disk_budget=total_pages * page_bytes)
    try:
        engine = paged_kv.Engine(policy, num_layers=config.num_hidden_layers, num_kv_heads=kv_heads,
                                 head_dim=head_dim, dtype=dtype, device=device, max_sequences=args.sessions,
                                 max_pages=pages_per_session + 1, max_batch=1)
    except ValueError as error:  # a geometry the kernels do not take (a checkpoint's head_dim, say)
        raise DemoError(f"this model's KV cannot be paged: {error}") from error
    print(f"paged_kv demo on {device} ({dtype}): {'model ' + args.model if args.model else 'a random-weight Llama'} "
          f"({config.num_hidden_layers} layers, {heads} query / {kv_heads} KV heads, head_dim {head_dim})")
    print(f"  {args.sessions} sessions of {prompt_len} prompt tokens + {args.turns} turns of {args.tokens_per_turn}: "
          f"{format_bytes(total_pages * page_bytes)} of KV; GPU budget {format_bytes(engine.num_frames * page_bytes)} "
          f"({engine.num_frames} pages), host {engine.num_host_slots} pages, disk {engine.num_disk_slots} pages")

    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, config.vocab_size, (1, prompt_len), generator=g).to(device) for _ in range(args.sessions)]
    caches = [PagedKVCache(engine, 1) for _ in range(args.sessions)]
    last = [None] * args.sessions
    generated: list[list[int]] = [[] for _ in range(args.sessions)]
    steps_ms, residency, switches, first_steps, bind_us = [], [], [], [], []

    def step(s, ids):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, past_key_values=caches[s], use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        steps_ms.append((time.perf_counter() - t0) * 1e3)
        free = (engine.pager.free_frames(), engine.pager.free_host_slots(), engine.pager.free_disk_slots())
        residency.append((engine.num_frames - free[0], engine.num_host_slots - free[1], engine.num_disk_slots - free[2]))
        last[s] = token
        generated[s].append(int(token))

    from tqdm import tqdm  # a dependency of transformers

    bar = tqdm(total=args.sessions * (1 + args.turns * args.tokens_per_turn), desc="steps", unit="step")
    began = time.perf_counter()
    for s in range(args.sessions):  # prefill every session
        engine.bind(0, caches[s].rows[0])
        step(s, prompts[s])
        bar.update(1)
    decode_began, decode_steps = time.perf_counter(), 0
    for _ in range(args.turns):
        for s in range(args.sessions):
            _sync(device)
            t0 = time.perf_counter()
            engine.bind(0, caches[s].rows[0])  # the context switch
            _sync(device)
            bind_us.append((time.perf_counter() - t0) * 1e6)
            switches.append(len(steps_ms))
            for i in range(args.tokens_per_turn):
                step(s, last[s])
                if i == 0:
                    first_steps.append(steps_ms[-1])
                decode_steps += 1
                bar.update(1)
    decode_s = time.perf_counter() - decode_began
    bar.close()
    stats = engine.stats()
    decode_ms = steps_ms[args.sessions:]  # the first step of each session was its prefill

    rows = [
        ("decode tokens/s (all sessions)", f"{decode_steps / decode_s:.1f}"),
        ("decode step latency, median / p90", f"{statistics.median(decode_ms):.2f} / "
                                              f"{sorted(decode_ms)[int(0.9 * len(decode_ms))]:.2f} ms"),
        ("switch (bind) latency, median", f"{statistics.median(bind_us):.1f} us"),
        ("first step after a switch, median", f"{statistics.median(first_steps):.2f} ms"),
        ("faults serviced / pages faulted", f"{stats['fault_services']} / {stats['faults_seen']}"),
        ("prefetched pages", f"{stats['prefetched_pages']}"),
    ]
    for direction, nbytes in stats["bytes_moved"].items():
        rows.append((f"bytes moved {direction.replace('_', ' ')}", format_bytes(nbytes)))
    gpu, host, disk = residency[-1]
    rows.append(("pages at the end: GPU / host / disk", f"{gpu} / {host} / {disk} (of {engine.num_frames} / "
                                                      f"{engine.num_host_slots} / {engine.num_disk_slots})"))
    rows.append(("wall time", f"{time.perf_counter() - began:.1f} s"))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows))

    status = 0
    if args.check:
        want = _dense_tokens(model, prompts[0], len(generated[0]))
        same = next((i for i, (a, b) in enumerate(zip(generated[0], want)) if a != b), None)
        if same is None:
            print(f"  session 0: all {len(want)} tokens equal the same model under sdpa with a dense cache")
        elif dtype == torch.float32:
            print(f"  FAILED: session 0's token {same} differs from sdpa's with a dense cache in float32")
            status = 1
        else:
            print(f"  session 0: the first {same} of {len(want)} tokens equal sdpa's; in {dtype} two exact "
                  f"attentions round differently, and greedy decoding follows the first differing argmax")
    _plot(args.plot, steps_ms, residency, switches, engine)
    engine.close()
    return status


def _plot(path, steps_ms, residency, switches, engine) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib is not installed: no plot (scripts/setup_env.sh installs it)")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(steps_ms, lw=1)
    top.set_ylabel("step latency (ms)")
    top.set_yscale("log")
    for x in switches:
        top.axvline(x, color="0.85", lw=0.5)
    for i, (name, size) in enumerate((("GPU frames", engine.num_frames), ("host slots", engine.num_host_slots),
                                      ("disk slots", engine.num_disk_slots))):
        bottom.plot([r[i] / max(size, 1) for r in residency], label=name)
    bottom.set_ylabel("share in use")
    bottom.set_xlabel("step (grey lines: a switch to another session)")
    bottom.legend(loc="lower right")
    fig.suptitle("paged_kv demo: sessions switched in turn")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"  wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paged_kv demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local checkpoint folder (default: a random-weight Llama)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens per session (default 4096 on GPU, 256 on CPU)")
    parser.add_argument("--turns", type=int, default=3, help="turns per session")
    parser.add_argument("--tokens-per-turn", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=16, choices=paged_kv.PAGE_SIZES)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--plot", default="paged_kv_demo.png", help="where to write the PNG plot")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip comparing session 0 with sdpa and a dense cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if paged_kv.LIBRARY_ERROR:
        print(paged_kv.LIBRARY_ERROR)
        return 2
    for name in ("sessions", "turns", "tokens_per_turn"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.prompt is not None and args.prompt < 1:
        parser.error("--prompt must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: no such folder (a local checkpoint folder is expected)")
    try:
        return run(args)
    except DemoError as error:
        print(f"paged_kv demo: {error}")
        return 2
