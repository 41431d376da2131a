"""bench/decode_sensitivity.py: its cases and its refusals (the sweeps themselves need a GPU)."""
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import attention, decode_sensitivity  # noqa: E402


def test_batch_cases_read_at_least_the_bar_case_bytes():
    bar = attention.case_bytes(attention.Case("b", "decode", 32, 8 * 1024, (256,)))
    assert [c.batch for c in decode_sensitivity.BATCH_CASES] == [32, 48, 64, 128, 256]
    assert all(attention.case_bytes(c) >= bar for c in decode_sensitivity.BATCH_CASES)


def test_placement_cases_are_bar_cases():
    names = [c.name for c in decode_sensitivity.PLACEMENT_CASES]
    assert names == ["decode_b1_1m", "decode_b32_8k"]
    assert all(c in attention.FULL_CASES for c in decode_sensitivity.PLACEMENT_CASES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    with pytest.raises(SystemExit):  # argparse's error exit
        decode_sensitivity.main([])


@pytest.mark.parametrize("argv", [["--sweeps", "sorted"], ["--sweeps", ""], ["--rounds", "0"], ["--quick"]])
def test_bad_arguments_are_errors(argv, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        decode_sensitivity.main(argv)
