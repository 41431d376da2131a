"""The tiers benchmark (bench/tiers.py): its --quick run on the CPU writes every row, each with
a ceiling or metadata ratio, a bar and a verdict, and no failures."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = ["page_in_host", "write_back_host", "page_in_disk", "decode_zero_copy", "decode_faults", "metadata"]


def test_quick_run_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/tiers.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "tiers.json").read_text())
    assert data["quick"] is True and data["device_info"]["device_type"] == "cpu"
    assert not data["failures"]
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == NAMES
    for name, row in rows.items():
        assert "error" not in row, row
        if "skipped" in row:  # e.g. a disk folder that refuses O_DIRECT
            continue
        assert row["bar"] > 0 and isinstance(row["met"], bool) and row["fraction"] > 0, row
        if name != "metadata":
            assert row["bytes"] > 0 and row["time_us"] > 0 and row["gbps"] > 0
            assert row["ceiling"] and row["ceiling_gbps"] > 0
    assert rows["metadata"]["fraction"] < rows["metadata"]["bar"]
    assert rows["decode_zero_copy"]["host_pages_at_start"] >= 0.8 * rows["decode_zero_copy"]["pages"]
    assert data["ceilings"]["host_memcpy_one_way"]["gbps"] > 0
