"""bench/compiled_decode.py: its refusals (the run itself needs a GPU)."""
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import compiled_decode  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    with pytest.raises(SystemExit):  # argparse's error exit
        compiled_decode.main([])


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--device", "cpu"]])
def test_bad_arguments_are_errors(argv, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        compiled_decode.main(argv)
