"""Policy: every field's good and bad values, byte sizes, dict and TOML round trips, frames."""

import dataclasses
import pathlib
import re
import sys

import pytest

import paged_kv
from paged_kv.policy import MAX_PAGES_PER_TIER, Policy, format_bytes, parse_bytes

GiB = 2**30
MiB = 2**20


def raises(exc, fragment):
    return pytest.raises(exc, match=re.escape(fragment))


# ----- byte sizes -----

@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("4096", 4096),
    ("7B", 7),
    ("64KiB", 64 * 1024),
    ("512 MiB", 512 * MiB),
    ("8GiB", 8 * GiB),
    ("8gib", 8 * GiB),
    ("8GIB", 8 * GiB),
    ("2TiB", 2 * 2**40),
    ("1KB", 1000),
    ("1kb", 1000),
    ("3 MB", 3_000_000),
    ("1.5GB", 1_500_000_000),
    ("1.5 KiB", 1536),
    ("0.5GiB", GiB // 2),
    ("2TB", 2 * 10**12),
    ("  16 MiB  ", 16 * MiB),
    ("0 GiB", 0),
    (0, 0),
    (12345, 12345),
])
def test_parse_bytes_good(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("value, exc, fragment", [
    ("1.5B", ValueError, "field must come to a whole number of bytes, got '1.5B' (1.5 bytes)"),
    ("0.1KiB", ValueError, "whole number of bytes, got '0.1KiB'"),
    ("", ValueError, "field must be a size like '8GiB', '512 MiB', '1.5GB' or '0', got ''"),
    ("   ", ValueError, "got '   '"),
    ("nan", ValueError, "field must be a size like '8GiB', '512 MiB', '1.5GB' or '0', got 'nan'"),
    ("NaN GiB", ValueError, "got 'NaN GiB'"),
    ("inf", ValueError, "got 'inf'"),
    ("1e9", ValueError, "got '1e9'"),
    ("GiB", ValueError, "got 'GiB'"),
    ("1.GiB", ValueError, "got '1.GiB'"),
    ("1,5GB", ValueError, "got '1,5GB'"),
    ("-5GiB", ValueError, "field must not be negative, got '-5GiB'"),
    ("-0", ValueError, "field must not be negative, got '-0'"),
    ("8GBs", ValueError, "field has an unknown unit 'GBs' in '8GBs'; units are B, KB, MB, GB, TB (powers of 1000)"),
    ("8 g", ValueError, "unknown unit 'g' in '8 g'"),
    ("8 gigabytes", ValueError, "unknown unit 'gigabytes'"),
    (-1, ValueError, "field must be >= 0 bytes, got -1"),
    (2**63, ValueError, "field must be at most 2**63 - 1 bytes, got 9223372036854775808"),
    ("9000000TiB", ValueError, "must be at most 2**63 - 1 bytes, got '9000000TiB'"),
    (True, TypeError, "field must be a byte count (int >= 0) or a size string like '8GiB', got bool True"),
    (1.5, TypeError, "got float 1.5"),
    (float("nan"), TypeError, "got float nan"),
    (None, TypeError, "got NoneType None"),
    (b"8GiB", TypeError, "got bytes b'8GiB'"),
])
def test_parse_bytes_bad(value, exc, fragment):
    with raises(exc, fragment):
        parse_bytes(value, field="field")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"),
    (1, "1 B"),
    (999, "999 B"),
    (1000, "1 KB"),
    (1024, "1 KiB"),
    (1536, "1.5 KiB"),
    (64 * 1024, "64 KiB"),
    (512 * MiB, "512 MiB"),
    (GiB, "1 GiB"),
    (1_500_000_000, "1.5 GB"),
    (5000 * GiB, "5000 GiB"),
    (10**12, "1 TB"),
    (3 * 2**40, "3 TiB"),
    (1234567, "1.18 MiB (1234567 B)"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text
    if "(" not in text:  # exact forms read back as the same count
        assert parse_bytes(text) == n


@pytest.mark.parametrize("value, exc, fragment", [
    (-1, ValueError, "format_bytes needs a byte count >= 0, got -1"),
    (1.0, TypeError, "format_bytes needs an int, got float 1.0"),
    (True, TypeError, "format_bytes needs an int, got bool True"),
])
def test_format_bytes_bad(value, exc, fragment):
    with raises(exc, fragment):
        format_bytes(value)


# ----- fields -----

def test_defaults():
    policy = Policy()
    assert policy.to_dict() == {
        "page_size": 256,
        "gpu_budget": GiB,
        "host_budget": 0,
        "disk_budget": 0,
        "disk_path": None,
        "io_backend": "auto",
        "zero_copy": True,
        "prefetch": True,
        "write_policy": "write_back",
        "fault_mode": "service",
        "replacement": "lru",
        "span_decay": 0.995,
        "span_share": 0.3,
        "span_sink_pages": 1,
        "span_window_pages": 4,
    }


def test_package_exports_policy():
    assert paged_kv.Policy is Policy
    assert "Policy" in paged_kv.__all__


@pytest.mark.parametrize("page_size", list(paged_kv.PAGE_SIZES))
def test_page_size_good(page_size):
    assert Policy(page_size=page_size).page_size == page_size


@pytest.mark.parametrize("value, exc, fragment", [
    (100, ValueError, "Policy.page_size must be one of (16, 32, 64, 128, 256) (tokens per page), got 100"),
    (0, ValueError, "got 0"),
    (512, ValueError, "got 512"),
    (256.0, TypeError, "Policy.page_size must be an int, one of (16, 32, 64, 128, 256), got float 256.0"),
    ("256", TypeError, "got str '256'"),
    (True, TypeError, "got bool True"),
])
def test_page_size_bad(value, exc, fragment):
    with raises(exc, fragment):
        Policy(page_size=value)


@pytest.mark.parametrize("field", ["gpu_budget", "host_budget", "disk_budget"])
def test_budgets_normalised(field):
    policy = Policy(**{field: "8GiB"})
    assert getattr(policy, field) == 8 * GiB
    assert policy == Policy(**{field: 8 * GiB})
    assert hash(policy) == hash(Policy(**{field: 8 * GiB}))
    assert getattr(Policy(**{field: "1.5GB"}), field) == 1_500_000_000


@pytest.mark.parametrize("field", ["gpu_budget", "host_budget", "disk_budget"])
@pytest.mark.parametrize("value, exc, fragment", [
    ("1.5B", ValueError, "must come to a whole number of bytes, got '1.5B'"),
    ("8 parsecs", ValueError, "has an unknown unit 'parsecs' in '8 parsecs'"),
    (-1, ValueError, "must be >= 0 bytes, got -1"),
    ("-1GiB", ValueError, "must not be negative, got '-1GiB'"),
    ("", ValueError, "must be a size like '8GiB', '512 MiB', '1.5GB' or '0', got ''"),
    (False, TypeError, "must be a byte count (int >= 0) or a size string like '8GiB', got bool False"),
    (1e9, TypeError, "must be a byte count (int >= 0) or a size string like '8GiB', got float 1000000000.0"),
])
def test_budgets_bad(field, value, exc, fragment):
    with raises(exc, f"Policy.{field} {fragment}"):
        Policy(**{field: value})


def test_disk_path():
    assert Policy().disk_path is None
    assert Policy(disk_path="/data/kv").disk_path == "/data/kv"
    path = Policy(disk_path=pathlib.Path("/data") / "kv").disk_path
    assert path == "/data/kv" and type(path) is str


@pytest.mark.parametrize("value, exc, fragment", [
    ("", ValueError, "Policy.disk_path must be a folder path or None (a temporary folder), got ''"),
    ("  ", ValueError, "got '  '"),
    ("\t", ValueError, "got '\\t'"),
    (b"/data", TypeError, "Policy.disk_path must be a str, an os.PathLike or None, got bytes b'/data'"),
    (5, TypeError, "got int 5"),
])
def test_disk_path_bad(value, exc, fragment):
    with raises(exc, fragment):
        Policy(disk_path=value)


def test_disk_path_bytes_pathlike():
    class BytesPath:
        def __fspath__(self):
            return b"/data"

    with raises(TypeError, "Policy.disk_path must be a text path, got bytes b'/data'"):
        Policy(disk_path=BytesPath())


CHOICES = {
    "io_backend": ("auto", "cufile", "posix"),
    "write_policy": ("write_back", "write_through"),
    "fault_mode": ("service", "forbid"),
    "replacement": ("lru", "span"),
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in CHOICES.items() for v in values])
def test_choices_good(field, value):
    assert getattr(Policy(**{field: value}), field) == value


@pytest.mark.parametrize("field, value", [
    ("io_backend", "gds"),
    ("io_backend", "AUTO"),
    ("write_policy", "write-back"),
    ("fault_mode", "raise"),
    ("replacement", "fifo"),
    ("replacement", "LRU"),
])
def test_choices_bad_value(field, value):
    allowed = ", ".join(repr(v) for v in CHOICES[field])
    with raises(ValueError, f"Policy.{field} must be one of {allowed}, got {value!r}"):
        Policy(**{field: value})


@pytest.mark.parametrize("field", list(CHOICES))
@pytest.mark.parametrize("value, shown", [(None, "NoneType None"), (1, "int 1"), (True, "bool True")])
def test_choices_bad_type(field, value, shown):
    with raises(TypeError, f"Policy.{field} must be a str, one of {CHOICES[field][0]!r}"):
        Policy(**{field: value})
    with raises(TypeError, f"got {shown}"):
        Policy(**{field: value})


@pytest.mark.parametrize("name", ["zero_copy", "prefetch"])
@pytest.mark.parametrize("value", [True, False])
def test_switches_good(name, value):
    assert getattr(Policy(**{name: value}), name) is value


@pytest.mark.parametrize("name", ["zero_copy", "prefetch"])
@pytest.mark.parametrize("value, shown", [(1, "int 1"), (0, "int 0"), ("yes", "str 'yes'"), (None, "NoneType None")])
def test_switches_bad(name, value, shown):
    with raises(TypeError, f"Policy.{name} must be a bool (True or False), got {shown}"):
        Policy(**{name: value})


def test_forbid_without_lower_tiers_is_fine():
    policy = Policy(fault_mode="forbid", host_budget=0, disk_budget=0)
    assert policy.fault_mode == "forbid"


def test_frozen_and_keyword_only():
    policy = Policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.page_size = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.gpu_budget = "1GiB"
    with pytest.raises(TypeError):
        Policy(256)


# ----- constructors and conversions -----

FULL = dict(page_size=64, gpu_budget="6GiB", host_budget="64 GiB", disk_budget="1.5TB", disk_path="/data/kv",
            io_backend="posix", zero_copy=False, write_policy="write_through", fault_mode="forbid",
            replacement="lru")


def test_dict_round_trip():
    policy = Policy(**FULL)
    settings = policy.to_dict()
    assert settings["gpu_budget"] == 6 * GiB and settings["disk_budget"] == 1_500_000_000_000
    assert Policy.from_dict(settings) == policy
    assert Policy.from_dict(FULL) == policy
    assert Policy.from_dict({}) == Policy()
    assert Policy.from_dict(Policy().to_dict()) == Policy()


def test_from_dict_unknown_keys():
    with raises(ValueError, "Policy.from_dict: unknown setting(s) 'gpu_bugdet' (did you mean 'gpu_budget'?), "
                            "'colour'; known settings: page_size, gpu_budget, host_budget, disk_budget, disk_path, "
                            "io_backend, zero_copy, prefetch, write_policy, fault_mode, replacement, span_decay, "
                            "span_share, span_sink_pages, span_window_pages"):
        Policy.from_dict({"gpu_bugdet": "1GiB", "colour": "red"})
    # Nested tables are not read: the mapping is flat.
    with raises(ValueError, "unknown setting(s) 'policy'"):
        Policy.from_dict({"policy": {"page_size": 16}})


def test_from_dict_bad_values_and_type():
    with raises(ValueError, "Policy.page_size must be one of"):
        Policy.from_dict({"page_size": 48})
    with raises(TypeError, "Policy.from_dict needs a mapping of settings, got list"):
        Policy.from_dict([("page_size", 16)])


def test_replace_revalidates():
    policy = Policy(gpu_budget="2GiB")
    smaller = policy.replace(page_size=16, host_budget="4GiB")
    assert (smaller.page_size, smaller.gpu_budget, smaller.host_budget) == (16, 2 * GiB, 4 * GiB)
    assert policy.page_size == 256  # the original is untouched
    with raises(ValueError, "Policy.page_size must be one of"):
        policy.replace(page_size=20)
    with raises(ValueError, "Policy.host_budget must come to a whole number of bytes"):
        policy.replace(host_budget="0.5B")
    with raises(ValueError, "Policy.replace: unknown setting(s) 'pagesize' (did you mean 'page_size'?)"):
        policy.replace(pagesize=16)
    with raises(ValueError, "Policy.write_policy must be one of"):
        dataclasses.replace(policy, write_policy="sometimes")


def _toml(settings):
    """TOML lines for a flat dict of str, int, float and bool values (None left out, as TOML has
    no null)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join(f"{k} = {value(v)}\n" for k, v in settings.items() if v is not None)


needs_toml = pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib needs Python 3.11+")


@needs_toml
def test_toml_policy_table_round_trip(tmp_path):
    policy = Policy(**FULL)
    path = tmp_path / "serve.toml"
    path.write_text("[model]\nname = \"llama\"\n\n[policy]\n" + _toml(policy.to_dict()))
    assert Policy.from_toml(path) == policy
    assert Policy.from_toml(str(path)) == policy


@needs_toml
def test_toml_flat_keys_and_size_strings(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('page_size = 128\ngpu_budget = "8GiB"\nhost_budget = "512 MiB"\nzero_copy = false\n')
    policy = Policy.from_toml(path)
    assert (policy.page_size, policy.gpu_budget, policy.host_budget, policy.zero_copy) == (128, 8 * GiB, 512 * MiB, False)
    assert policy.disk_path is None
    assert policy.replace(disk_path=None) == policy
    defaults = tmp_path / "empty.toml"
    defaults.write_text("")
    assert Policy.from_toml(defaults) == Policy()


@needs_toml
def test_toml_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[policy]\npage_size = 256\ngpu_budgett = \"1GiB\"\n")
    with raises(ValueError, f"Policy.from_toml({path}): unknown setting(s) 'gpu_budgett' (did you mean 'gpu_budget'?)"):
        Policy.from_toml(path)
    path.write_text("policy = 3\n")
    with raises(TypeError, f"Policy.from_toml: 'policy' in {path} must be a table, got int 3"):
        Policy.from_toml(path)
    path.write_text("page_size = \n")
    with raises(ValueError, f"Policy.from_toml: {path} is not valid TOML"):
        Policy.from_toml(path)
    path.write_text("[policy]\ngpu_budget = 1.5e9\n")
    with raises(TypeError, "Policy.gpu_budget must be a byte count (int >= 0) or a size string like '8GiB', got float"):
        Policy.from_toml(path)
    with pytest.raises(FileNotFoundError):
        Policy.from_toml(tmp_path / "missing.toml")
    # A setting beside the [policy] table, which is read alone, would be silently ignored.
    path.write_text('page_size = 32\ngpu_budget = "2GiB"\nother_program = 1\n[policy]\nhost_budget = "1GiB"\n')
    with raises(ValueError, f"Policy.from_toml: {path} has a [policy] table, which is read alone, and also "
                            f"sets ['gpu_budget', 'page_size'] outside it; move them into [policy]"):
        Policy.from_toml(path)
    path.write_bytes(b'page_size = "\xff"\n')
    with raises(ValueError, f"Policy.from_toml: {path} is not valid TOML"):
        Policy.from_toml(path)
    with raises(TypeError, "Policy.from_toml needs a file path, got int 0"):
        Policy.from_toml(0)  # a file descriptor, which open() would close


def test_toml_without_a_parser(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail, as on a Python without tomllib or tomli.
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    path = tmp_path / "p.toml"
    path.write_text("page_size = 16\n")
    with raises(RuntimeError, "Policy.from_toml needs tomllib (Python 3.11+) or the tomli package"):
        Policy.from_toml(path)


# ----- sizing -----

def test_page_bytes():
    # Llama-3-8B, bf16, 256 tokens: 32 layers, 8 KV heads, head_dim 128 -> 32 MiB (DESIGN.md).
    assert Policy().page_bytes(num_layers=32, num_kv_heads=8, head_dim=128, element_size=2) == 32 * MiB
    assert Policy(page_size=16).page_bytes(32, 8, 128, 2) == 2 * MiB
    with raises(ValueError, "Policy.page_bytes: head_dim must be a positive int, got 0"):
        Policy().page_bytes(32, 8, 0, 2)
    with raises(ValueError, "Policy.page_bytes: num_layers must be a positive int, got 2.0"):
        Policy().page_bytes(2.0, 8, 128, 2)


def test_frames_floor_budgets():
    policy = Policy(gpu_budget="100MiB", host_budget="1GiB", disk_budget="1GB")
    assert policy.frames(32 * MiB) == {"gpu": 3, "host": 32, "disk": 29}
    assert policy.frames(MiB) == {"gpu": 100, "host": 1024, "disk": 953}
    assert Policy(gpu_budget="32MiB").frames(32 * MiB) == {"gpu": 1, "host": 0, "disk": 0}


def test_frames_too_small():
    with raises(ValueError, "Policy.gpu_budget of 16 MiB holds no whole page of 32 MiB; set it to at least 32 MiB"):
        Policy(gpu_budget="16MiB").frames(32 * MiB)
    with raises(ValueError, "Policy.gpu_budget of 0 B holds no whole page"):
        Policy(gpu_budget=0).frames(1)
    # A lower tier that is set must hold a page too; 0 is the way to turn it off.
    with raises(ValueError, "Policy.host_budget of 8 MiB holds no whole page of 32 MiB; "
                            "set it to at least 32 MiB or 0 to turn the tier off"):
        Policy(host_budget="8MiB").frames(32 * MiB)
    with raises(ValueError, "Policy.disk_budget of 1 KB holds no whole page of 2 MiB"):
        Policy(disk_budget="1KB").frames(2 * MiB)


def test_frames_bad_page_bytes_and_too_many_pages():
    for bad in (0, -1, 1.5, True):
        with raises(ValueError, f"Policy.frames: page_bytes must be a positive int, got {bad!r}"):
            Policy().frames(bad)
    with raises(ValueError, f"Policy.disk_budget of 1 TiB holds {2**31} pages of 512 B, more than a page-table "
                            f"entry can index ({MAX_PAGES_PER_TIER}); lower the budget or use larger pages"):
        Policy(disk_budget="1TiB").frames(512)


# ----- display -----

def test_describe():
    text = str(Policy(**FULL))
    assert text == Policy(**FULL).describe()
    lines = text.splitlines()
    assert lines[0] == "Policy"
    assert "  page_size     64 tokens" in lines
    assert "  gpu_budget    6 GiB" in lines
    assert "  host_budget   64 GiB" in lines
    assert "  disk_budget   1.5 TB" in lines
    assert "  disk_path     /data/kv" in lines
    assert "  zero_copy     off" in lines
    assert "  fault_mode    forbid" in lines
    default = str(Policy())
    assert "host_budget   0 B (tier off)" in default and "disk_path     (temporary folder)" in default
    assert "gpu_budget=1073741824" in repr(Policy())


@pytest.mark.parametrize("settings, error, match", [
    ({"span_decay": 1.0}, ValueError, r"Policy.span_decay must be in \[0, 1\), got 1.0"),
    ({"span_decay": -0.1}, ValueError, r"Policy.span_decay must be in \[0, 1\), got -0.1"),
    ({"span_decay": "0.5"}, TypeError, "Policy.span_decay must be a number in \\[0, 1\\), got str '0.5'"),
    ({"span_decay": True}, TypeError, "got bool True"),
    ({"span_share": 0}, ValueError, r"Policy.span_share must be a finite number > 0 \(of a page's fair share\), got 0"),
    ({"span_share": float("inf")}, ValueError, "Policy.span_share must be a finite number > 0"),
    ({"span_share": 10**400}, ValueError, "Policy.span_share must be a finite number > 0"),
    ({"span_share": "1"}, TypeError, "Policy.span_share must be a number > 0 \\(of a page's fair share\\), got str '1'"),
    ({"span_share": False}, TypeError, "got bool False"),
    ({"span_sink_pages": -1}, ValueError, "Policy.span_sink_pages must be >= 0 \\(pages\\), got -1"),
    ({"span_window_pages": 2.0}, TypeError, "Policy.span_window_pages must be an int >= 0 \\(pages\\), got float 2.0"),
])
def test_span_settings_bad(settings, error, match):
    with pytest.raises(error, match=match):
        Policy(replacement="span", **settings)


def test_span_settings_good_and_described():
    policy = Policy(replacement="span", span_decay=0, span_share=2, span_sink_pages=0, span_window_pages=16)
    assert (policy.span_decay, policy.span_share, policy.span_sink_pages, policy.span_window_pages) == (0.0, 2.0, 0, 16)
    assert isinstance(policy.span_decay, float) and isinstance(policy.span_share, float)
    assert "span_share         2" in policy.describe()
    assert "span_window_pages  16" in policy.describe()
    assert "span_decay" not in Policy().describe()
