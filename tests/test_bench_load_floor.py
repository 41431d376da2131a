"""The load-floor benchmark (bench/load_floor.py): its grid follows the decode kernel's plan, and
it refuses to run without what it needs."""
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import attention, load_floor  # noqa: E402


H200_SMEM_PER_SM, H200_SMEM_PER_BLOCK = 233472, 232448


def case(batch: int, tokens: int) -> attention.Case:
    return attention.Case("d", "decode", batch, tokens, (256,))


def test_grid_follows_the_decode_plan():
    # 132 multiprocessors (H100 SXM, H200): 8 KV heads of one sequence get 12-warp blocks, one per
    # multiprocessor, 132 // 8 splits each, up to 128K tokens; longer contexts and batches that
    # fill the GPU get 4-warp blocks, splits planned for two per multiprocessor.
    assert load_floor.decode_grid(case(1, 32 * 1024), 132) == (12, 1, 16)
    assert load_floor.decode_grid(case(1, 128 * 1024), 132) == (12, 1, 16)
    assert load_floor.decode_grid(case(1, 1 << 20), 132) == (4, 2, 33)
    assert load_floor.decode_grid(case(32, 8 * 1024), 132) == (4, 2, 1)
    # Splits never go below 512 tokens each.
    assert load_floor.decode_grid(case(1, 2048), 132) == (12, 1, 4)


def test_tails_are_timed_at_the_decode_kernels_shapes():
    # The claimed-tail kernels run at the shapes decode_grid plans (4-warp blocks two a
    # multiprocessor, 12-warp blocks one), which the shapes sweep holds.
    planned = {(w, load_floor.DECODE_STAGES, per_sm)
               for w, per_sm, _ in (load_floor.decode_grid(c, 132) for c in load_floor.CASES)}
    assert planned == set(load_floor.TAIL_SHAPES)
    assert set(load_floor.TAIL_SHAPES) <= set(load_floor.SHAPES)
    source = (REPO_ROOT / "csrc" / "cuda" / "attention_device.cuh").read_text()
    assert f"constexpr int kTailShare = {load_floor.TAIL_SHARE};" in source


def test_cases_are_the_gpu_decode_cases():
    names = [c.name for c in load_floor.CASES]
    assert names == ["decode_b1_32k", "decode_b1_128k", "decode_b1_1m", "decode_b32_8k"]


def test_head_warps_grid_gives_one_block_per_multiprocessor():
    # A block per (sequence, split) holds every KV head: 132 splits of one sequence, 4 of each
    # of 32 sequences (128 blocks), never splits of fewer than 512 tokens.
    assert load_floor.head_warps_splits(case(1, 1 << 20), 132) == 132
    assert load_floor.head_warps_splits(case(32, 8 * 1024), 132) == 4
    assert load_floor.head_warps_splits(case(1, 2048), 132) == 4
    assert load_floor.head_warps_splits(case(256, 1024), 132) == 1


@pytest.mark.parametrize("warps, stages, group, per_sm", load_floor.HEAD_WARP_SHAPES)
def test_head_warp_shapes_fit_exactly_the_blocks_asked_for(warps, stages, group, per_sm):
    # Each warp reads one head of its block's group: the warps fill whole groups, the groups
    # the KV heads; splits are planned for the blocks of that many heads.
    assert warps % group == 0 and attention.NUM_KV_HEADS % group == 0
    splits, smem = load_floor.shape_launch(case(32, 8 * 1024), warps, stages, per_sm, 132,
                                           H200_SMEM_PER_SM, H200_SMEM_PER_BLOCK, group)
    reserved = load_floor.BLOCK_RESERVED_SMEM
    assert smem >= warps * stages * 2 * load_floor.WARP_TILE_BYTES
    assert per_sm * (smem + reserved) <= H200_SMEM_PER_SM < (per_sm + 1) * (smem + reserved)
    columns = 32 * attention.NUM_KV_HEADS // group
    assert splits == max(1, 132 * per_sm // columns)


@pytest.mark.parametrize("flags", [["--quick"], ["--device", "cpu"]])
def test_quick_or_cpu_is_refused_not_ignored(monkeypatch, capsys, flags):
    # Both would still time the full-size CUDA kernels and write over the committed results.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):  # argparse's error exit
        load_floor.main(flags)
    assert "needs a CUDA GPU and no --quick" in capsys.readouterr().err


def test_unknown_placement_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):  # argparse's error exit
        load_floor.main(["--placement", "sorted"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        load_floor.main([])


def test_unknown_case_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):  # argparse's error exit
        load_floor.main(["--cases", "no_such_case"])


def test_page_size_must_be_a_supported_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):  # argparse's error exit
        load_floor.main(["--page-size", "48"])


@pytest.mark.parametrize("flags, message", [
    (["--shapes", "--page-size", "16"], "--shapes times pages of 256 and 16 in random frames"),
    (["--shapes", "--placement", "extent"], "--shapes times pages of 256 and 16 in random frames"),
    (["--shapes", "--rounds", "0"], "--rounds must be at least 1"),
    (["--rounds", "5"], "--rounds is for --shapes"),
])
def test_shapes_refuses_what_it_would_ignore(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):  # argparse's error exit
        load_floor.main(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("warps, stages, per_sm", load_floor.SHAPES)
def test_shape_launch_fits_exactly_the_blocks_asked_for(warps, stages, per_sm):
    splits, smem = load_floor.shape_launch(case(1, 1 << 20), warps, stages, per_sm, 132,
                                           H200_SMEM_PER_SM, H200_SMEM_PER_BLOCK)
    reserved = load_floor.BLOCK_RESERVED_SMEM
    assert smem >= warps * stages * 2 * load_floor.WARP_TILE_BYTES
    assert per_sm * (smem + reserved) <= H200_SMEM_PER_SM < (per_sm + 1) * (smem + reserved)
    assert splits == 132 * per_sm // 8  # splits as the decode kernel plans them for per_sm


def test_shape_launch_plans_splits_and_refuses_what_does_not_fit():
    # Batch 32 fills a wave of two blocks a multiprocessor without splits; 12 warps of 3 stages
    # (288 KiB) fit in no multiprocessor.
    assert load_floor.shape_launch(case(32, 8 * 1024), 4, 2, 2, 132, H200_SMEM_PER_SM,
                                   H200_SMEM_PER_BLOCK)[0] == 1
    assert load_floor.shape_launch(case(1, 1 << 20), 12, 3, 1, 132, H200_SMEM_PER_SM,
                                   H200_SMEM_PER_BLOCK) is None
    assert load_floor.shape_launch(case(1, 1 << 20), 8, 2, 2, 132, H200_SMEM_PER_SM,
                                   H200_SMEM_PER_BLOCK) is None


def _nvrtc():
    """libnvrtc of the installed nvidia-cuda-nvrtc wheel (no GPU needed to compile), or None."""
    import ctypes
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for library in sorted(Path(root).glob("cu*/lib/libnvrtc.so*")):
            if "builtins" not in library.name and ".alt." not in library.name:
                return ctypes.CDLL(str(library))
    return None


def test_every_kernel_the_script_launches_compiles():
    # The script compiles load_floor.cu with NVRTC only on a GPU machine: compile it here too,
    # with every template instance it asks for, so that a broken load kernel never lands.
    import ctypes
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("no libnvrtc in the installed nvidia wheels")
    source = load_floor.KERNEL_SOURCE.read_bytes()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"load_floor.cu", 0, None, None) == 0
    names = list(load_floor.kernel_names().values())
    for name in names:
        assert nvrtc.nvrtcAddNameExpression(program, name.encode()) == 0
    options = (ctypes.c_char_p * 2)(b"-std=c++17", b"--gpu-architecture=compute_90")
    status = nvrtc.nvrtcCompileProgram(program, 2, options)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()
    for name in names:
        lowered = ctypes.c_char_p()
        assert nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) == 0, name
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def test_merged_shapes_are_the_head_warp_shapes_of_a_warp_a_head():
    assert load_floor.MERGED_SHAPES == ((8, 3, 8, 1), (8, 2, 8, 1), (4, 2, 4, 3), (4, 2, 4, 2))
    assert load_floor.QUERY_ROWS == attention.NUM_Q_HEADS // attention.NUM_KV_HEADS == 4
    source = load_floor.KERNEL_SOURCE.read_text()
    assert f"constexpr int kMergeMaxSplits = {load_floor.MERGE_MAX_SPLITS};" in source
    assert f"constexpr int kMergeWarps = {load_floor.MERGE_KERNEL_WARPS};" in source
    # The merge kernel holds the splits of every merged shape at 1M (132 and 198).
    for warps, stages, group, per_sm in load_floor.MERGED_SHAPES:
        splits, _ = load_floor.shape_launch(case(1, 1 << 20), warps, stages, per_sm, 132,
                                            H200_SMEM_PER_SM, H200_SMEM_PER_BLOCK, group)
        assert splits <= load_floor.MERGE_KERNEL_MAX_SPLITS
    # At batch 32 every merged shape's splits fit one merge round trip.
    for warps, stages, group, per_sm in load_floor.MERGED_SHAPES:
        splits, _ = load_floor.shape_launch(case(32, 8 * 1024), warps, stages, per_sm, 132,
                                            H200_SMEM_PER_SM, H200_SMEM_PER_BLOCK, group)
        assert splits <= load_floor.MERGE_MAX_SPLITS


def test_check_merges_refuses_an_unmerged_column_or_a_counter_left_set():
    # The merged rows are floors only if every column was merged: an output still NaN, or an
    # in-kernel merge's counter not reset, must fail the run rather than time less work.
    kernels = object.__new__(load_floor.LoadKernels)
    done = torch.zeros(8, dtype=torch.bfloat16)
    kernels.merges = [("merge kernel", done, None), ("in-kernel", done, torch.zeros(2, dtype=torch.int32))]
    kernels.check_merges()
    kernels.merges.append(("unmerged", torch.full((8,), float("nan"), dtype=torch.bfloat16), None))
    with pytest.raises(RuntimeError, match="unmerged: a column was not merged"):
        kernels.check_merges()
    kernels.merges[-1] = ("counter", done, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="counter: a column was not merged, or its counter not reset"):
        kernels.check_merges()
