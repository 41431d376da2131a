"""How disk pages reach the frames (Policy.io_backend): the cuFile shim's reasons, the choice of
"auto", "cufile" and "posix" and its report, and, on a GPU, pages read back bit-identical
through whichever backend was chosen (through cuFile where it is usable)."""

import os
import re

import pytest
import torch

import paged_kv
from paged_kv import _library
from paged_kv.engine import Engine
from paged_kv.info import cufile_status, cufile_wheel_paths
from paged_kv.policy import Policy
from paged_kv.store import DiskStore, StoreError

HAS_CUDA = torch.cuda.is_available() and paged_kv.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
BACKENDS = ["auto", "cufile", "posix"]
HEADER_BYTES = 4096


def _policy(io_backend, disk_path=None):
    return Policy(page_size=16, gpu_budget="128KiB", host_budget="128KiB", disk_budget="256KiB",
                  disk_path=disk_path, io_backend=io_backend)


def _engine(io_backend, device="cpu", disk_path=None):
    dtype = torch.float32 if device == "cpu" else torch.float16
    return Engine(_policy(io_backend, disk_path), num_layers=2, num_kv_heads=2, head_dim=64, dtype=dtype,
                  device=device, max_sequences=2, max_pages=16)


# ---- the shim's reasons ----

def test_missing_library_names_what_was_tried():
    reason = _library._C._cufile_load(["libpaged_kv_no_such_cufile.so.0"])
    assert reason.startswith("libcufile not found")
    assert "libpaged_kv_no_such_cufile.so.0" in reason and "No such file" in reason


def test_every_name_tried_is_in_the_reason(tmp_path):
    missing = str(tmp_path / "libcufile.so.0")
    reason = _library._C._cufile_load(["libpaged_kv_absent_a.so", missing])
    assert "libpaged_kv_absent_a.so" in reason and missing in reason


def test_no_names_to_try():
    assert _library._C._cufile_load([]) == "libcufile not found (no names to try)"


def test_missing_symbol_names_the_symbol_and_the_file():
    # The C library loads but has none of cuFile's entry points.
    reason = _library._C._cufile_load(["libc.so.6"])
    assert re.match(r"symbol cuFile\w+ missing from libc\.so\.6: ", reason), reason


def test_an_installed_wheel_library_loads_with_every_symbol():
    paths = cufile_wheel_paths()
    if not paths:
        pytest.skip("no nvidia wheel with libcufile installed")
    assert _library._C._cufile_load(paths[:1]) == ""


def test_info_reports_the_shim_status():
    status = cufile_status()
    assert status.startswith("loads (") or status.startswith("not usable: "), status


# ---- the choice, on the CPU ----

def test_posix_reports_posix():
    with _engine("posix") as engine:
        assert engine.io_backend == "posix" and engine.pager.io_backend == "posix"
        stats = engine.stats()
        assert stats["io_backend"] == "posix"
        assert stats["io_backend_reason"] == "io_backend='posix' was asked for"


def test_auto_falls_back_to_posix_and_says_why():
    # On the CPU (frames in host memory) or without libcufile, cuFile is never usable.
    with _engine("auto") as engine:
        stats = engine.stats()
        assert stats["io_backend"] == "posix"
        assert stats["io_backend_reason"].startswith("cuFile not usable: ")
        assert len(stats["io_backend_reason"]) > len("cuFile not usable: ") + 10
        assert engine.io_backend_reason == stats["io_backend_reason"]


def test_cufile_where_unusable_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match=r"io_backend='cufile' but cuFile is not usable: .{10,}; use "
                                         r"io_backend='auto'"):
        _engine("cufile", disk_path=str(tmp_path))


def test_cufile_error_frees_the_temporary_disk_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(StoreError, match="cuFile is not usable"):
        _engine("cufile")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("paged_kv_")]


@pytest.mark.parametrize("io_backend", BACKENDS)
def test_no_disk_tier_has_no_backend(io_backend):
    policy = Policy(page_size=16, gpu_budget="128KiB", host_budget="128KiB", io_backend=io_backend)
    with Engine(policy, num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu",
                max_sequences=2, max_pages=16) as engine:
        assert engine.io_backend is None and engine.stats()["io_backend"] is None
        assert engine.stats()["io_backend_reason"] == ""


def test_pager_rejects_an_unknown_backend(tmp_path):
    pool = paged_kv.new_pool(2, 1, 1, 16, 64, torch.float32)
    store = DiskStore(str(tmp_path), 4, pool[0].numel() * pool.element_size())
    with pytest.raises(ValueError, match="io_backend must be 'auto', 'cufile' or 'posix', got 'gds'"):
        paged_kv.Pager(pool, pool.clone(), disk_store=store, max_sequences=1, max_pages=4, io_backend="gds")


@pytest.mark.parametrize("io_backend", ["auto", "posix"])
def test_cpu_round_trip_through_the_chosen_backend(tmp_path, io_backend):
    with _engine(io_backend, disk_path=str(tmp_path)) as engine:
        _round_trip(engine.pager, torch.Generator().manual_seed(0))


# ---- on a GPU ----

def _round_trip(pager, generator):
    """Fills three sealed pages with random bits, sends them to disk, poisons the frames,
    services them back and checks every bit."""
    row = pager.add_sequence()
    pager.append_pages(row, 3)
    words = pager.pool.view(torch.int16)
    written = {}
    for page in range(3):
        frame = pager.page_info(row, page)["frame"]
        bits = torch.randint(-32768, 32768, words[frame].shape, dtype=torch.int16, generator=generator)
        words[frame] = bits.to(words.device)
        written[page] = bits
    pager.seal(row, 2)
    pages = [(row, p) for p in range(3)]
    pager.demote(pages, paged_kv.Tier.DISK)
    words.fill_(-1)  # a frame the read misses shows up
    before = pager.stats()["pages_moved"]["disk_to_gpu"]
    assert pager.service(pages) == 3
    assert pager.stats()["pages_moved"]["disk_to_gpu"] - before == 3
    for page in range(3):
        frame = pager.page_info(row, page)["frame"]
        assert torch.equal(words[frame].cpu(), written[page]), f"page {page} differs"
    pager.remove_sequence(row)


def _cuda_pager(tmp_path, io_backend):
    pool = paged_kv.new_pool(4, 2, 2, 16, 64, torch.float16, "cuda")
    host_pool = torch.empty((2, *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    store = DiskStore(str(tmp_path), 16, pool[0].numel() * pool.element_size())
    return paged_kv.Pager(pool, host_pool, disk_store=store, max_sequences=2, max_pages=16,
                          io_backend=io_backend)


def _cufile_pager_or_skip(tmp_path):
    """A CUDA pager forced onto cuFile, or a skip naming why cuFile is not usable here."""
    try:
        return _cuda_pager(tmp_path, "cufile")
    except StoreError as e:
        pytest.skip(f"cuFile is not usable here: {e}")


@needs_cuda
def test_auto_on_cuda_reads_back_bit_identical_and_reports(tmp_path):
    with _engine("auto", device="cuda", disk_path=str(tmp_path)) as engine:
        stats = engine.stats()
        assert stats["io_backend"] in ("posix", "cufile")
        reason = stats["io_backend_reason"]
        print(f"\nio_backend auto on CUDA: {stats['io_backend']}: {reason}")
        if stats["io_backend"] == "cufile":
            assert "cuFile read" in reason and "POSIX" in reason
        else:
            assert reason.startswith("cuFile not usable: ") or reason.startswith("POSIX is faster: ")
        _round_trip(engine.pager, torch.Generator().manual_seed(1))


@needs_cuda
def test_forced_cufile_reads_back_bit_identical(tmp_path):
    pager = _cufile_pager_or_skip(tmp_path)
    assert pager.io_backend == "cufile" and "cuFile read" in pager.io_backend_reason
    _round_trip(pager, torch.Generator().manual_seed(2))


@needs_cuda
def test_cufile_never_returns_a_corrupted_page(tmp_path):
    pager = _cufile_pager_or_skip(tmp_path)
    row = pager.add_sequence()
    pager.append_pages(row, 2)
    frame = pager.page_info(row, 0)["frame"]
    pager.pool.view(torch.int16)[frame] = 7
    pager.seal(row, 1)
    pager.demote([(row, 0)], paged_kv.Tier.DISK)
    slot = pager.page_info(row, 0)["disk_slot"]
    store = pager.disk_store
    with open(store.path, "r+b") as f:  # one payload byte
        f.seek(slot * store.slot_bytes + HEADER_BYTES + 100)
        byte = f.read(1)
        f.seek(slot * store.slot_bytes + HEADER_BYTES + 100)
        f.write(bytes([byte[0] ^ 0x5A]))
    with pytest.raises(StoreError, match="with cuFile failed.*checksum mismatch"):
        pager.service([(row, 0)])
    assert pager.page_info(row, 0)["tier"] == paged_kv.Tier.DISK
    pager.check_invariants()
