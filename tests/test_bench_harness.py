"""The benchmark harness (bench/): timers, results JSON and the quick ceilings run, on the CPU."""
import errno
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import ceilings, harness  # noqa: E402
REQUIRED_KEYS = {"device", "torch", "cuda", "date", "ceilings", "rows", "device_info", "quick"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_write_results_has_required_keys(tmp_path):
    rows = [{"context": 32768, "median_us": 55.0, "gbps": 2400.0}]
    path = harness.write_results("unit", {"hbm_read": {"gbps": 3000.0}}, rows, out_dir=tmp_path,
                                 extra={"model": "llama-3-8b"}, quick=True, device="cpu")
    assert path == tmp_path / "unit.json"
    data = read_json(path)
    assert REQUIRED_KEYS <= set(data)
    assert data["rows"] == rows and data["quick"] is True and data["model"] == "llama-3-8b"
    assert data["torch"] == torch.__version__ and data["cuda"] == torch.version.cuda
    assert data["date"].endswith("+00:00")  # ISO 8601, UTC
    assert data["device"] == data["device_info"]["device_name"]
    assert "importable" in data["device_info"]["paged_kv"]


def test_write_results_out_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.OUT_DIR_ENV, str(tmp_path / "from_env"))
    path = harness.write_results("env", {}, [], device="cpu")
    assert path == tmp_path / "from_env" / "env.json"


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"not": "a list"}, "rows must be a list"),
        ([{"ok": 1}, "not a dict"], r"rows\[1\] must be a dict"),
        ([{"when": object()}], r"rows\[0\]\['when'\].*not JSON-serialisable"),
        ([{"gbps": float("nan")}], r"rows\[0\]\['gbps'\].*not valid JSON"),
        ([{1: "int key"}], "is not a string"),
    ],
)
def test_write_results_rejects_bad_rows(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        harness.write_results("bad", {}, rows, out_dir=tmp_path, device="cpu")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_write_results_accepts_numpy_and_torch_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    rows = [{"a": np.int64(3), "b": np.float32(0.5), "c": torch.tensor(2.0)}]
    data = read_json(harness.write_results("scalars", {}, rows, out_dir=tmp_path, device="cpu"))
    assert data["rows"] == [{"a": 3, "b": 0.5, "c": 2.0}]


def test_summarize_us_orders_percentiles():
    stats = harness.summarize_us([float(x) for x in range(1, 101)])
    assert stats["min_us"] == 1.0 and stats["repeat"] == 100
    assert stats["p10_us"] < stats["median_us"] < stats["p90_us"]
    assert math.isclose(stats["median_us"], 50.5)


def test_time_cpu_median_is_sane():
    stats = harness.time_cpu(lambda: time.sleep(0.002), warmup=1, repeat=9)
    assert 2_000 <= stats["min_us"] <= stats["p10_us"] <= stats["median_us"] <= stats["p90_us"]
    assert stats["median_us"] < 200_000


def test_time_fn_on_cpu_with_cold_cache():
    x = torch.randn(256, 256)
    stats = harness.time_fn(lambda: x @ x, "cpu", warmup=1, repeat=5, cold_l2=True)
    assert stats["repeat"] == 5 and stats["median_us"] > 0


def test_bench_args_defaults_and_flags():
    parser = harness.bench_args("test")
    args = parser.parse_args([])
    assert (args.quick, args.out, args.device) == (False, None, "auto")
    args = parser.parse_args(["--quick", "--out", "/x", "--device", "cpu"])
    assert (args.quick, args.out, args.device) == (True, "/x", "cpu")


def test_device_info_on_cpu_has_no_hostname():
    import socket

    info = harness.device_info("cpu")
    assert info["device_type"] == "cpu" and info["device_name"]
    assert socket.gethostname() not in json.dumps(info)


def test_parse_bytes():
    assert ceilings.parse_bytes("8GiB") == 8 << 30
    assert ceilings.parse_bytes("64M") == 64 << 20
    assert ceilings.parse_bytes("4096") == 4096
    with pytest.raises(ValueError):
        ceilings.parse_bytes("lots")


def test_disk_refusal_is_reported_not_raised(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ceilings, "_direct_io_pass", refuse)
    monkeypatch.setattr(ceilings, "default_disk_dirs", lambda: [tmp_path])
    entry = ceilings.measure_disk_odirect_read(1 << 20, disk_dir=tmp_path, chunk_bytes=1 << 20)
    assert "error" in entry and "Invalid argument" in entry["error"]
    assert not list(tmp_path.iterdir())  # the test file was removed


def test_quick_ceilings_script_writes_every_entry(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/ceilings.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = read_json(tmp_path / "ceilings.json")
    assert REQUIRED_KEYS <= set(data) and data["quick"] is True
    assert tuple(data["ceilings"]) == ceilings.CEILING_NAMES
    assert [row["name"] for row in data["rows"]] == list(ceilings.CEILING_NAMES)
    for name in ceilings.GPU_CEILINGS:
        assert data["ceilings"][name]["skipped"], name
    assert data["ceilings"]["host_memcpy"]["gbps"] > 0
    disk = data["ceilings"]["disk_odirect_read"]
    assert disk.get("gbps", 0) > 0 or "O_DIRECT" in disk["error"]
    assert "host_memcpy" in done.stdout  # the printed table


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "bench.ceilings", "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--disk-bytes" in done.stdout


@needs_cuda
def test_time_cuda_with_cold_l2():
    x = torch.randn(1024, 1024, device="cuda")
    warm = harness.time_cuda(lambda: x @ x, warmup=3, repeat=20)
    cold = harness.time_cuda(lambda: x @ x, warmup=3, repeat=20, cold_l2=True)
    for stats in (warm, cold):
        assert 0 < stats["min_us"] <= stats["median_us"] <= stats["p90_us"] < 1e6


@needs_cuda
def test_hbm_ceilings_are_positive():
    read = ceilings.measure_hbm_read(256 << 20, repeat=5)
    copy = ceilings.measure_hbm_copy(256 << 20, repeat=5)
    assert read["gbps"] > 0 and copy["gbps"] > 0
    assert "triton_error" not in read or read["method"].startswith("torch.sum")


def test_quick_runs_stay_on_the_cpu_unless_a_device_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    parser = harness.bench_args("test")
    assert harness.bench_device(parser.parse_args(["--quick"])).type == "cpu"
    assert harness.bench_device(parser.parse_args(["--quick", "--device", "cuda"])).type == "cuda"
    assert harness.bench_device(parser.parse_args([])).type == "cuda"
    assert harness.bench_device(parser.parse_args(["--device", "cpu"])).type == "cpu"
