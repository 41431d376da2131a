"""The replacement benchmark (bench/replacement.py) and its traces (bench/traces.py): the quick
run writes LRU and span-aware fault counts for every trace, and the traces have the structure
they claim."""
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.traces import TraceConfig, generate  # noqa: E402


def test_quick_run(tmp_path):
    done = subprocess.run([sys.executable, "bench/replacement.py", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "replacement.json").read_text())
    assert data["quick"] is True and "synthetic" in data["source"]
    traces = {row["trace"] for row in data["rows"]}
    assert {"default", "flat_background", "fleeting_background"} <= traces
    verdicts = [row for row in data["rows"] if "met" in row]
    assert len(verdicts) == 1 and verdicts[0]["trace"] == "default" and verdicts[0]["policy_default"]
    for row in data["rows"]:
        assert 0 < row["gpu_frames"] <= row["working_set_pages"]
        assert 0 <= row["span_faults"] <= row["used_pages"] and 0 <= row["lru_faults"] <= row["used_pages"]
        assert abs(row["fewer_faults"] - (1 - row["span_faults"] / row["lru_faults"])) < 1e-9
        # Belady's replacement is optimal: no policy, the rate oracle included, faults less.
        assert row["optimal_faults"] <= min(row["rate_oracle_faults"], row["span_faults"], row["lru_faults"])


def test_traces_have_sinks_window_and_recurring_spans():
    cfg = TraceConfig(initial_pages=64, steps=400, seed=3)
    steps = list(generate(cfg))
    assert steps[-1].num_pages == 64 + 399 // cfg.page_size
    spans_used = {}
    for step in steps:
        assert abs(float(step.mass.sum()) - 1.0) < 1e-4 and bool((step.mass >= 0).all())
        assert 0 in step.used  # the sink
        assert step.num_pages - 1 in step.used  # the newest page
        covered = float(step.mass[torch.tensor(step.used)].sum())
        assert covered >= cfg.coverage - 1e-5
        for p in step.used:
            spans_used[p] = spans_used.get(p, 0) + 1
    # Retrieval makes some distant pages recur: used in many steps, apart from sink and window.
    distant = {p: n for p, n in spans_used.items() if cfg.sink_pages <= p < 64 - cfg.window_pages}
    assert max(distant.values()) >= 20
