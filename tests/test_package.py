"""Package-level behaviour: import without the compiled library, the CLI, the README examples."""

import os
import subprocess
import sys

import pytest
import torch

import paged_kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_import_without_library_says_why():
    code = (
        "import sys; sys.modules['paged_kv._C'] = None\n"  # makes `import paged_kv._C` fail
        "import torch, paged_kv\n"
        "print('ERROR:', paged_kv.LIBRARY_ERROR)\n"
        "try:\n"
        "    paged_kv.gather_kv(None, None, 0, None, 0)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED:', e)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "ERROR: paged_kv's compiled library (paged_kv._C) could not be loaded: ModuleNotFoundError" in out.stdout
    assert "RAISED: paged_kv's compiled library" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "paged_kv", "info"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    build = paged_kv.build_info()
    assert ("CUDA build" if build["cuda"] else "CPU-only build") in out.stdout
    assert "cufile:" in out.stdout and f"torch: {torch.__version__}" in out.stdout


def test_info_command_refuses_options():
    out = subprocess.run([sys.executable, "-m", "paged_kv", "info", "--x"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 2 and "info takes no options, got --x" in out.stderr and not out.stdout


def test_demo_command_small(tmp_path):
    """The demo on the CPU: sessions switched in turn, most pages off the frames; session 0's tokens
    equal sdpa's with a dense cache (float32), and the plot is written."""
    pytest.importorskip("transformers")
    plot = tmp_path / "demo.png"
    out = subprocess.run(
        [sys.executable, "-m", "paged_kv", "demo", "--sessions", "3", "--prompt", "40", "--turns", "2",
         "--tokens-per-turn", "4", "--device", "cpu", "--plot", str(plot)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "switch (bind) latency" in out.stdout and "bytes moved disk to host" in out.stdout
    assert "session 0: all 9 tokens equal the same model under sdpa" in out.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in out.stdout
    else:
        assert plot.stat().st_size > 0


def _readme_python_block(index):
    text = open(os.path.join(ROOT, "README.md")).read()
    return text.split("```python\n")[index + 1].split("```", 1)[0].replace('"cuda"', '"cpu"')


def test_readme_hugging_face_example_on_cpu():
    pytest.importorskip("transformers")
    out = _python(_readme_python_block(0))
    assert out.returncode == 0, out.stderr


def test_readme_ops_example_on_cpu():
    out = _python(_readme_python_block(1))
    assert out.returncode == 0, out.stderr


def test_pte_encoding_round_trip():
    for tier in paged_kv.Tier:
        for index in (0, 1, 12345, paged_kv.pte.MAX_INDEX):
            pte = paged_kv.make_pte(tier, index)
            assert -(2**31) <= pte < 2**31
            assert paged_kv.pte.pte_tier(pte) == tier and paged_kv.pte.pte_index(pte) == index
    assert paged_kv.pte.pte_tier(paged_kv.UNMAPPED) == paged_kv.Tier.UNMAPPED


@pytest.mark.parametrize("call, error, message", [
    (lambda: paged_kv.make_pte(0, 1.5), TypeError, r"PTE index must be an int, got float 1.5"),
    (lambda: paged_kv.make_pte(True, 1), TypeError, r"PTE tier must be an int, got bool True"),
    (lambda: paged_kv.make_pte(torch.tensor(2), 5), TypeError, r"PTE tier must be an int, got Tensor"),
    (lambda: paged_kv.make_pte(4, 1), ValueError, r"PTE tier must be one of \[0, 1, 2, 3\]"),
    (lambda: paged_kv.make_pte(0, -1), ValueError, r"PTE index must be in \[0, 1073741823\], got -1"),
    (lambda: paged_kv.pte.pte_tier(2**40 + 5), ValueError, r"a PTE is an int32"),
    (lambda: paged_kv.pte.pte_index(1.0), TypeError, r"PTE must be an int, got float"),
    (lambda: paged_kv.new_pool(2, 1, 1, 16, 0), ValueError, r"head_dim must be at least 1, got 0"),
    (lambda: paged_kv.new_pool(-1, 1, 1, 16, 8), ValueError, r"num_frames must be at least 0, got -1"),
    (lambda: paged_kv.new_pool(2.0, 1, 1, 16, 8), TypeError, r"num_frames must be an int, got float"),
    (lambda: paged_kv.new_pool(2, 1, 1, 16, 8, torch.int32), ValueError, r"dtype must be one of"),
    (lambda: paged_kv.new_pool(2, 1, 1, 24, 8), ValueError, r"page_size must be one of"),
])
def test_pte_and_pool_helpers_refuse_bad_values(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_pte_helpers_take_numpy_integers():
    np = pytest.importorskip("numpy")

    assert paged_kv.make_pte(np.int64(1), np.int32(7)) == paged_kv.make_pte(1, 7)
    assert paged_kv.new_pool(np.int64(2), 1, 1, 16, 8, torch.float32).shape[0] == 2


def test_demo_with_a_local_checkpoint(tmp_path):
    """--model DIR: a checkpoint saved by transformers runs instead of the random Llama (float32 on
    the CPU, so session 0's tokens equal sdpa's); a checkpoint whose head_dim the kernels do not
    take, a folder that holds none, or no folder, is a one-line error."""
    transformers = pytest.importorskip("transformers")
    def save(folder, hidden_size):
        config = transformers.Qwen2Config(vocab_size=300, hidden_size=hidden_size, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / folder)

    save("ckpt", 256)  # head_dim 64
    save("ckpt_head_dim_16", 64)

    def demo(*flags):
        return subprocess.run([sys.executable, "-m", "paged_kv", "demo", "--sessions", "2", "--prompt", "24",
                               "--turns", "2", "--tokens-per-turn", "3", "--device", "cpu",
                               "--plot", str(tmp_path / "demo.png"), *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)

    out = demo("--model", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"model {tmp_path / 'ckpt'} (2 layers, 4 query / 2 KV heads, head_dim 64)" in out.stdout
    assert "session 0: all 7 tokens equal the same model under sdpa" in out.stdout

    out = demo("--model", str(tmp_path / "ckpt_head_dim_16"))
    assert out.returncode == 2 and "this model's KV cannot be paged: Engine: head_dim must be one of" in out.stdout
    (tmp_path / "empty").mkdir()
    out = demo("--model", str(tmp_path / "empty"))
    assert out.returncode == 2 and "could not load a causal language model from it" in out.stdout, out.stdout + out.stderr
    out = demo("--model", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such folder" in out.stderr


@pytest.mark.parametrize("step, message", [
    ("nosuch", "unknown step 'nosuch'"),
    ("tests:0/2", "expected tests:K/N with 1 <= K <= N"),
    ("memcheck:3/2", "expected memcheck:K/N with 1 <= K <= N"),
    ("bench:nosuch", "no benchmark bench/nosuch.py"),
])
def test_gpu_check_refuses_a_bad_step_before_building(tmp_path, step, message):
    out_dir = tmp_path / "out"
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out_dir), "tests", step],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr
    assert not out_dir.exists()  # nothing was built or run


def test_test_shares_split_the_selection_evenly():
    """--share K/N (tests/conftest.py) keeps every N-th selected test from the K-th: the shares
    are disjoint, together the whole selection, and within one test of each other in size."""
    def pytest_collect(*flags):
        return subprocess.run([sys.executable, "-m", "pytest", "tests/test_bench_harness.py", "--collect-only",
                               "-q", "-p", "no:cacheprovider", *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    def collected(*flags):
        out = pytest_collect(*flags)
        assert out.returncode == 0, out.stdout + out.stderr
        return [line for line in out.stdout.splitlines() if "::" in line]

    everything = collected()
    shares = [collected("--share", f"{k}/3") for k in (1, 2, 3)]
    assert sorted(sum(shares, [])) == sorted(everything) and len(everything) >= 6
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares[0] == everything[0::3]
    # -k first, then the share: a share of what -k selects.
    assert collected("-k", "ceilings", "--share", "1/2") == collected("-k", "ceilings")[0::2]
    out = pytest_collect("--share", "3/2")
    assert out.returncode != 0
    assert "--share '3/2': expected K/N with 1 <= K <= N" in out.stdout + out.stderr
