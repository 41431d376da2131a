"""Synthetic decode-time attention traces with the structure real models show.

No model's attention was recorded for these traces (this machine has no model weights to load;
a model with random weights shows no such structure). They are generated, from the features
reported for trained decoders, each with its own share of a step's attention mass:

- attention sinks: the first tokens draw a large, steady share (StreamingLLM, Xiao et al. 2023);
- a local window: the newest tokens draw most of the rest, more the closer they are;
- retrieval: now and then the model attends to a distant span of the context for a few steps,
  and some spans recur far more often than others (retrieval heads, Wu et al. 2024; the
  popularity here is Zipf-distributed);
- background: the rest spread over every page by heavy-tailed (log-normal) weights: each page
  has its own weight for life, jittered each step, since the tokens that draw attention keep
  drawing it (the persistent "heavy hitters" of H2O, Zhang et al. 2023). The variant with no
  lasting weight, all jitter, is in bench/replacement.py.

A trace is one sequence decoding `steps` tokens after a context of `initial_pages` pages (a new
page every `page_size` steps). Each step gives the mass of every page (summed over heads and
layers, normalised to 1) and the pages attention uses that step: the fewest pages holding
`coverage` of the mass (like top-p), which is what a replacement policy must keep close.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class TraceConfig:
    name: str = "default"
    initial_pages: int = 256
    steps: int = 4096
    page_size: int = 16
    sink_pages: int = 1
    sink_mass: float = 0.25
    window_pages: int = 4
    window_mass: float = 0.35
    spans: int = 16  # distant spans that retrieval visits
    span_pages: int = 2
    span_popularity: float = 1.1  # Zipf exponent of how often each span is revisited
    retrieval_start: float = 0.15  # chance per idle step that a retrieval episode begins
    retrieval_steps: float = 8.0  # mean length of an episode (geometric)
    retrieval_mass: float = 0.25
    background_sigma: float = 1.5  # log-normal spread of each page's lasting background weight
    background_jitter: float = 0.5  # log-normal spread of its step-to-step variation
    coverage: float = 0.9
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Step:
    num_pages: int
    mass: torch.Tensor  # float32 [num_pages], sums to 1
    used: list[int]  # pages holding `coverage` of the mass, most first


def generate(cfg: TraceConfig) -> Iterator[Step]:
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Spans sit in the initial context, away from the sinks and the window.
    lo, hi = cfg.sink_pages + 1, cfg.initial_pages - cfg.window_pages - cfg.span_pages
    starts = rng.sample(range(lo, hi, cfg.span_pages), cfg.spans)
    weights = [1.0 / (k + 1) ** cfg.span_popularity for k in range(cfg.spans)]
    active, left = None, 0
    total = cfg.initial_pages + cfg.steps // cfg.page_size

    def log_normal(count: int, sigma: float) -> torch.Tensor:
        if sigma <= 0:
            return torch.ones(count)
        return torch.empty(count).log_normal_(0.0, sigma, generator=gen)

    lasting = log_normal(total, cfg.background_sigma)  # page p's weight for life
    for t in range(cfg.steps):
        n = cfg.initial_pages + t // cfg.page_size
        if left == 0 and rng.random() < cfg.retrieval_start:
            active = rng.choices(range(cfg.spans), weights)[0]
            left = 1 + int(rng.expovariate(1.0 / max(cfg.retrieval_steps - 1, 1e-9)))
        background = lasting[:n] * log_normal(n, cfg.background_jitter)
        mass = background / background.sum()
        rest = 1.0 - cfg.sink_mass - cfg.window_mass - (cfg.retrieval_mass if left else 0.0)
        mass *= rest
        mass[: cfg.sink_pages] += cfg.sink_mass / cfg.sink_pages
        near = torch.tensor([cfg.window_pages - i for i in range(cfg.window_pages)], dtype=torch.float32)
        mass[n - cfg.window_pages:] += cfg.window_mass * near.flip(0) / near.sum()
        if left:
            s = starts[active]
            mass[s: s + cfg.span_pages] += cfg.retrieval_mass / cfg.span_pages
            left -= 1
        order = torch.argsort(mass, descending=True)
        covered = torch.cumsum(mass[order], 0)
        k = int(torch.searchsorted(covered, torch.tensor(cfg.coverage))) + 1
        yield Step(n, mass, order[: min(k, n)].tolist())


def working_set(cfg: TraceConfig) -> int:
    """Distinct pages the trace uses."""
    seen: set[int] = set()
    for step in generate(cfg):
        seen.update(step.used)
    return len(seen)


def mean_used(cfg: TraceConfig) -> float:
    total = steps = 0
    for step in generate(cfg):
        total += len(step.used)
        steps += 1
    return total / max(steps, 1)

