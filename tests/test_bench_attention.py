"""The attention benchmark (bench/attention.py): its formulas and input builders, and the --quick
run on the CPU. paged_kv rows are checked when the build has a CPU attention kernel."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paged_kv

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import attention  # noqa: E402

CPU = torch.device("cpu")


def test_bytes_and_flops_formulas():
    decode = attention.Case("d", "decode", 1, 32 * 1024, (256,))
    assert attention.case_bytes(decode) == 128 << 20  # 32K tokens x 8 heads x 128 x 2 B x (K, V)
    assert attention.case_flops(decode) == 4 * 32 * 32 * 1024 * 128
    prefill = attention.Case("p", "prefill", 1, 8192, (256,))
    assert prefill.query_len == 8192
    assert attention.case_flops(prefill) == 2 * 2 * 8192 * 8192 // 2 * 32 * 128
    kv_bytes = 2 * 8192 * 8 * 128 * 2
    assert attention.case_bytes(prefill) == kv_bytes + 2 * 8192 * 32 * 128 * 2


def test_roofline_names_the_larger_term():
    ceilings = {"hbm_read": {"gbps": 1000.0}, "matmul": {"tflops": 1.0}}
    memory = attention.roofline(10**9, 10**6, ceilings, "hbm_read")  # 1000 us against 1 us
    assert memory["bound"] == "memory" and memory["roofline_us"] == pytest.approx(1000.0)
    compute = attention.roofline(10**6, 10**12, ceilings, "hbm_read")  # 1 us against 1e6 us
    assert compute["bound"] == "compute" and compute["roofline_us"] == pytest.approx(1e6)
    none = attention.roofline(10**6, 10**6, {"hbm_read": {"skipped": "no GPU"}}, "hbm_read")
    assert "bound" not in none and none["memory_time_us"] is None


@pytest.mark.parametrize("page_size", [16, 256])
def test_paged_inputs_hold_the_dense_kv_in_random_frames(page_size):
    case = attention.Case("d", "decode", 3, 700, (page_size,))  # 700: the last page is partial
    dense = attention.make_dense(case, CPU)
    paged = attention.build_paged(case, dense, page_size, CPU, seed=0)
    pages = paged.pages_per_sequence
    assert pages == -(-700 // page_size)
    assert sorted(paged.frames.flatten().tolist()) == list(range(3 * pages))
    assert paged.page_table[1, 0] == paged_kv.make_pte(paged_kv.Tier.GPU, int(paged.frames[1, 0]))
    for b in range(case.batch):
        key, value = paged_kv.gather_kv(paged.pool, paged.page_table, b,
                                        torch.arange(pages, dtype=torch.int32), 0)
        assert torch.equal(key[:700].transpose(0, 1), dense.key[b])
        assert torch.equal(value[:700].transpose(0, 1), dense.value[b])
    assert paged.query_starts.tolist() == [0, 1, 2, 3] and paged.kv_lens.tolist() == [700] * 3


@pytest.mark.parametrize("frame_bytes, pages", [(64 << 10, 96), (64 << 10, 100), (1 << 20, 9), (4 << 20, 5)])
def test_extent_placement_keeps_runs_of_pages_in_one_2mib_region(frame_bytes, pages):
    generator = torch.Generator().manual_seed(3)
    frames = attention.frame_order(pages, frame_bytes, "extent", generator).tolist()
    assert sorted(frames) == list(range(pages))
    per_run = max(1, attention.EXTENT_BYTES // frame_bytes)
    runs = [frames[i:i + per_run] for i in range(0, pages, per_run)]
    for run in runs:  # consecutive pages in consecutive frames, the run inside one region
        assert run == list(range(run[0], run[0] + len(run)))
    if pages % per_run == 0:
        assert all(run[0] % per_run == 0 for run in runs)
    if len(runs) > 2:  # the runs themselves are not in order (seed 3 shuffles them)
        assert [run[0] for run in runs] != sorted(run[0] for run in runs)


def test_unknown_placement_is_an_error():
    with pytest.raises(ValueError, match="placement 'sorted'"):
        attention.frame_order(8, 1 << 20, "sorted", torch.Generator())


def test_extent_placement_holds_the_dense_kv():
    case = attention.Case("d", "decode", 2, 1000, (16,))
    dense = attention.make_dense(case, CPU)
    paged = attention.build_paged(case, dense, 16, CPU, seed=1, placement="extent")
    pages = paged.pages_per_sequence
    assert sorted(paged.frames.flatten().tolist()) == list(range(2 * pages))
    for b in range(case.batch):
        key, value = paged_kv.gather_kv(paged.pool, paged.page_table, b,
                                        torch.arange(pages, dtype=torch.int32), 0)
        assert torch.equal(key[:1000].transpose(0, 1), dense.key[b])
        assert torch.equal(value[:1000].transpose(0, 1), dense.value[b])


def test_compare_flags_gross_and_diffuse_errors():
    reference = torch.randn(4, 32, 128)
    assert attention.compare(reference + 1e-3, reference)["correct"]
    large = reference.clone()
    large[0, 0, 0] += 1.0
    assert not attention.compare(large, reference)["correct"]
    small = reference * 1e-3  # a long decode's output: tiny values, so only the norm can tell
    assert not attention.compare(small * 1.5, small)["correct"]
    assert attention.compare(small * float("nan"), small)["max_abs_diff"] is None


def test_ratios_compare_same_case_and_page_size():
    def row(kernel, page, time_us, correct=True, case="c"):
        return {"case": case, "kernel": kernel, "page_size": page, "time_us": time_us, "correct": correct}

    rows = [row("sdpa_dense", None, 100.0), row("flex_paged", 128, 250.0),
            row("flashinfer_decode_hnd", 16, 80.0), row("flashinfer_decode_hnd", 256, 50.0),
            row("flashinfer_decode_nhd", 16, 10.0, correct=False), row("sdpa_dense", None, 1.0, case="other"),
            row("paged_kv", 16, 90.0)]
    attention.add_ratios(rows)
    ratios = rows[-1]["time_ratio_vs"]
    assert ratios == pytest.approx({"sdpa_dense": 0.9, "flex_paged": 0.36, "flashinfer_decode_hnd": 1.125})
    assert rows[-1]["best_peer"] == "flashinfer_decode_hnd"


def test_ratios_pair_the_times_of_each_round():
    sdpa = {"case": "c", "kernel": "sdpa_dense", "page_size": None, "time_us": 100.0, "correct": True,
            "round_times_us": [100.0, 120.0, 90.0]}
    paged = {"case": "c", "kernel": "paged_kv", "page_size": 16, "time_us": 99.0, "correct": True,
             "round_times_us": [99.0, 114.0, 94.5]}
    attention.add_ratios([sdpa, paged])
    # Per round 0.99, 0.95, 1.05: their median, not 99 / 100 from the medians of the times.
    assert paged["time_ratio_vs"]["sdpa_dense"] == pytest.approx(0.99)
    assert paged["time_ratio_range_vs"]["sdpa_dense"] == pytest.approx([0.95, 1.05])
    # Times from different numbers of rounds are not paired: the ratio of the times.
    sdpa["round_times_us"] = [100.0]
    attention.add_ratios([sdpa, paged])
    assert paged["time_ratio_vs"]["sdpa_dense"] == pytest.approx(0.99)
    assert paged["time_ratio_range_vs"]["sdpa_dense"] == pytest.approx([0.99, 0.99])


def test_rounds_start_one_candidate_further_on():
    calls = []

    def entry(name):
        candidate = attention.Candidate(name, lambda: calls.append(name), lambda out: out)
        return attention.Entry({"kernel": name}, candidate)

    entries = [entry("a"), entry("b"), entry("c")]
    attention.time_rounds(entries, CPU, attention.Timing(warmup=0, repeat=1, rounds=4), cold_l2=False)
    assert "".join(calls) == "abc" "bca" "cab" "abc"
    assert all(len(e.rounds) == 4 for e in entries)


def test_round_times_pair_rounds_and_refuse_failed_timings():
    def entry(name, fail=False):
        def call():
            if fail:
                raise RuntimeError("launch failed")
        return attention.Entry({"kernel": name}, attention.Candidate(name, call, lambda out: out))

    entries = {"sdpa": entry("sdpa"), "paged": entry("paged")}
    attention.time_rounds(list(entries.values()), CPU, attention.Timing(warmup=0, repeat=1, rounds=3),
                          cold_l2=False)
    times = attention.round_times(entries, "case")
    assert set(times) == {"sdpa", "paged"} and all(len(t) == 3 for t in times.values())
    assert times["paged"] == [stats["median_us"] for stats in entries["paged"].rounds]
    ratio = attention.paired_ratio([99.0, 114.0, 94.5], [100.0, 120.0, 90.0])
    assert ratio == pytest.approx((0.99, 0.95, 1.05))
    with pytest.raises(ValueError):  # rounds that do not pair up are not compared
        attention.paired_ratio([1.0, 2.0], [1.0])

    entries["broken"] = entry("broken", fail=True)
    attention.time_rounds([entries["broken"]], CPU, attention.Timing(warmup=0, repeat=1, rounds=3),
                          cold_l2=False)
    with pytest.raises(RuntimeError, match="case: broken: RuntimeError: launch failed"):
        attention.round_times(entries, "case")
    skipped = {"sdpa": entries["sdpa"], "flex": attention.Entry({"kernel": "flex"}, None)}
    with pytest.raises(RuntimeError, match="case: flex: not timed"):
        attention.round_times(skipped, "case")


def test_quick_run_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/attention.py", "--quick", "--rounds", "2", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["quick"] is True and data["device_info"]["device_type"] == "cpu"
    assert {"hbm_read", "h2d_pinned", "host_memcpy", "matmul"} <= set(data["ceilings"])
    assert data["ceilings"]["hbm_read"]["skipped"] and data["ceilings"]["matmul"]["tflops"] > 0
    assert set(data["cases"]) == {case.name for case in attention.QUICK_CASES}
    for summary in data["cases"].values():
        assert summary["bytes"] > 0 and summary["flops"] > 0 and summary["bound"] in ("memory", "compute")
    assert data["peers"]["flex_paged"]["skipped"] and data["peers"]["flashinfer"]["skipped"]
    assert not data["failures"]

    rows = data["rows"]
    sdpa = [row for row in rows if row["kernel"] == "sdpa_dense"]
    assert len(sdpa) == 3 and all(row["time_us"] > 0 and row["correct"] for row in sdpa)
    assert all(row["rounds"] == 2 and len(row["round_times_us"]) == 2 for row in sdpa)
    paged = [row for row in rows if row["kernel"] == "paged_kv"]
    assert len(paged) == sum(len(case.page_sizes) for case in attention.QUICK_CASES)
    zero_copy = [row for row in paged if row["kind"] == "zero_copy"]
    assert zero_copy and all("CUDA" in row["skipped"] for row in zero_copy)
    missing = attention.paged_kv_unavailable(CPU)
    for row in paged:
        if row["kind"] == "zero_copy":
            continue
        if missing:
            assert row["skipped"] == missing
        else:
            assert row["correct"] and row["max_abs_diff"] <= attention.TOL, row
            assert row["time_us"] > 0 and row["time_ratio_vs"]["sdpa_dense"] > 0
            low, high = row["time_ratio_range_vs"]["sdpa_dense"]
            assert low <= row["time_ratio_vs"]["sdpa_dense"] <= high
            assert row["ceiling"] in ("host_memcpy", "matmul")
    assert "decode_b1_1000" in done.stdout  # the printed table
