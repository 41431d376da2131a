"""`python -m paged_kv demo`: a long synthetic context written into pages, then decoded.

At this stage of the project the demo exercises the page layer end to end: it maps a long
context onto a frame pool through a page table in a scattered order, writes every layer's K/V
with append_kv (prefill in chunks), decodes a few steps (each appending one token and reading
the whole context back with gather_kv), and checks that the K/V read back through the page table
are bit-identical to the contiguous K/V the demo kept aside, so attention over them is exact.
"""

from __future__ import annotations

import argparse
import time

import torch

import paged_kv
from paged_kv import reference


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(context: int, steps: int, page_size: int, device: torch.device, dtype: torch.dtype, seed: int) -> int:
    torch.manual_seed(seed)
    layers, kv_heads, q_heads, head_dim, chunk = 4, 8, 32, 128, 2048
    total = context + steps
    num_pages = (total + page_size - 1) // page_size
    page_bytes = layers * 2 * kv_heads * page_size * head_dim * torch.tensor([], dtype=dtype).element_size()
    print(f"paged_kv demo on {device} ({dtype}): {context:,} tokens of context, {steps} decode steps")
    print(f"  geometry: {layers} layers, {q_heads} query / {kv_heads} KV heads, head_dim {head_dim}, "
          f"{page_size} tokens per page ({page_bytes / 2**20:.2f} MiB per page, all layers)")

    # Frames handed out in a scattered order, as a pager would after some churn.
    num_frames = num_pages + 8
    pool = paged_kv.new_pool(num_frames, layers, kv_heads, page_size, head_dim, dtype, device).fill_(float("nan"))
    table = paged_kv.new_page_table(1, num_pages)
    for page, frame in enumerate(torch.randperm(num_frames)[:num_pages].tolist()):
        table[0, page] = paged_kv.make_pte(paged_kv.Tier.GPU, frame)
    table = table.to(device)
    print(f"  pool: {num_frames} frames ({pool.numel() * pool.element_size() / 2**30:.2f} GiB); "
          f"page table {tuple(table.shape)}; {num_pages} pages mapped in random order")

    # Prefill: chunks of tokens for every layer. The contiguous copy is the check.
    keys = torch.randn(layers, total, kv_heads, head_dim, dtype=dtype, device=device)
    values = torch.randn(layers, total, kv_heads, head_dim, dtype=dtype, device=device)
    _sync(device)
    start = time.perf_counter()
    for begin in range(0, context, chunk):
        end = min(context, begin + chunk)
        pos = torch.arange(begin, end, dtype=torch.int32, device=device)
        seq = torch.zeros_like(pos)
        for layer in range(layers):
            paged_kv.append_kv(keys[layer, begin:end], values[layer, begin:end], pool, table, seq, pos, layer)
    _sync(device)
    prefill_s = time.perf_counter() - start
    written = 2 * layers * context * kv_heads * head_dim * pool.element_size()
    print(f"  prefill: wrote {written / 2**20:.1f} MiB of K/V in {prefill_s * 1e3:.1f} ms "
          f"({written / prefill_s / 1e9:.2f} GB/s, chunks of {chunk} tokens)")

    exact, checksum = True, 0.0
    for step in range(steps):
        pos_value = context + step
        pos = torch.tensor([pos_value], dtype=torch.int32, device=device)
        seq = torch.zeros_like(pos)
        query = torch.randn(1, q_heads, head_dim, dtype=dtype, device=device)
        t0 = time.perf_counter()
        pages_used = torch.arange((pos_value + page_size) // page_size, dtype=torch.int32, device=device)
        for layer in range(layers):
            paged_kv.append_kv(keys[layer, pos_value : pos_value + 1], values[layer, pos_value : pos_value + 1],
                               pool, table, seq, pos, layer)
            k, v = paged_kv.gather_kv(pool, table, 0, pages_used, layer)
            # The pages read back must be the K/V that went in, bit for bit.
            exact = exact and torch.equal(k[: pos_value + 1], keys[layer, : pos_value + 1])
            exact = exact and torch.equal(v[: pos_value + 1], values[layer, : pos_value + 1])
            out, _ = reference.attention(query, k[: pos_value + 1], v[: pos_value + 1])
            checksum += out.double().sum().item()
        _sync(device)
        print(f"  decode step {step}: position {pos_value:,}, {len(pages_used)} pages read per layer, "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms (reference attention, float64)")
    print(f"  attention output checksum over all steps and layers: {checksum:.6g}")
    if not exact:
        print("  FAILED: K/V read back from the pages differ from what was written")
        return 1
    print("  every page read back bit-identical to the contiguous K/V; attention is exact")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paged_kv demo", description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=None, help="context tokens (default: 65536 on GPU, 8192 on CPU)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps")
    parser.add_argument("--page-size", type=int, default=256, choices=paged_kv.PAGE_SIZES)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if paged_kv.LIBRARY_ERROR:
        print(paged_kv.LIBRARY_ERROR)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    context = args.context or (65536 if use_cuda else 8192)
    if context < 1 or args.steps < 0:
        parser.error("--context must be positive and --steps non-negative")
    return run(context, args.steps, args.page_size, device, dtype, args.seed)
