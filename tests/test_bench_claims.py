"""The claims-table benchmark (bench/claims_table.py): its --quick run on the CPU writes every
row, a bind moves no KV bytes, and decode over a session mostly on host services no fault."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = ["bind_short", "bind_long", "bind_ratio_long_to_short", "first_step_gpu", "first_step_host",
         "first_step_disk", "steady_decode_prefetch", "metadata", "naive_copy_pageable", "naive_copy_pinned", "replacement"]


def test_quick_run_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "bench/claims_table.py", "--quick", "--device", "cpu",
                           "--out", str(tmp_path),
                           "--disk-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "claims_table.json").read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == NAMES
    assert rows["bind_long"]["tokens"] == 8 * rows["bind_short"]["tokens"]
    for where in ("gpu", "host", "disk"):
        step = rows[f"first_step_{where}"]
        assert step["time_us"] > 0 and step["bytes"] > 0 and step["layers"] == 2
    steady = rows["steady_decode_prefetch"]
    assert steady["host_pages"] > steady["gpu_pages"] > 0 and steady["fault_services_in_loop"] == 0
    assert rows["metadata"]["fraction"] < 0.001
    assert "skipped" in rows["naive_copy_pinned"]
    assert rows["replacement"]["optimal_faults"] <= rows["replacement"]["span_faults"]
    assert data["published"]["context_switch_us_1m"] == 419.34
