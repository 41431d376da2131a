"""Policy: the validated configuration of the pager and its tiers.

    policy = Policy(page_size=128, gpu_budget="8GiB", host_budget="64 GiB", disk_budget="1TB")
    policy = Policy.from_toml("serve.toml")
    frames = policy.frames(policy.page_bytes(num_layers=32, num_kv_heads=8, head_dim=128, element_size=2))

Every field is checked on construction (and again by `replace`); a bad value raises TypeError
(wrong type) or ValueError (wrong value) naming the field, the value received and what is
allowed. Budgets accept bytes as an int or a size string ("8GiB", "512 MiB", "1.5GB") and are
stored as int bytes, so two policies that mean the same thing compare equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from paged_kv.pte import MAX_INDEX, PAGE_SIZES

__all__ = ["Policy", "format_bytes", "parse_bytes"]

IO_BACKENDS = ("auto", "cufile", "posix")
WRITE_POLICIES = ("write_back", "write_through")
FAULT_MODES = ("service", "forbid")
REPLACEMENTS = ("lru", "span")

# Budgets travel to the C++ pager as int64.
MAX_BYTES = 2**63 - 1
# A PTE's index has 30 bits, so no tier can hold more pages than that.
MAX_PAGES_PER_TIER = MAX_INDEX + 1

_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_UNITS_HELP = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), in any case"
# Spelling used by format_bytes, largest first; a binary unit wins over the decimal one below it.
_DISPLAY_UNITS = (("TiB", 1024**4), ("TB", 1000**4), ("GiB", 1024**3), ("GB", 1000**3),
                  ("MiB", 1024**2), ("MB", 1000**2), ("KiB", 1024), ("KB", 1000))
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", re.ASCII)


def parse_bytes(value: int | str, field: str = "size") -> int:
    """A byte count from an int >= 0 or a size string such as "8GiB", "512 MiB", "1.5GB" or "0".

    Units: B, KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024; the unit's case
    does not matter and a space may sit before it; no unit means bytes. A decimal is accepted when
    it comes to a whole number of bytes ("1.5KiB" is 1536, "1.5B" is an error). `field` names the
    setting in error messages.
    """
    # bool is an int subclass, and True bytes is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"{field} must be a byte count (int >= 0) or a size string like '8GiB', "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int):
        n = value
    else:
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"{field} must not be negative, got {value!r}")
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{field} must be a size like '8GiB', '512 MiB', '1.5GB' or '0', got {value!r}"
            )
        number, unit = match.groups()
        scale = _UNITS.get(unit.lower() or "b")
        if scale is None:
            raise ValueError(f"{field} has an unknown unit {unit!r} in {value!r}; units are {_UNITS_HELP}")
        # Fraction keeps "1.5GB" exact, where a float would round.
        exact = Fraction(number) * scale
        if exact.denominator != 1:
            raise ValueError(f"{field} must come to a whole number of bytes, got {value!r} ({float(exact)} bytes)")
        n = int(exact)
    if n < 0:
        raise ValueError(f"{field} must be >= 0 bytes, got {value!r}")
    if n > MAX_BYTES:
        raise ValueError(f"{field} must be at most 2**63 - 1 bytes, got {value!r}")
    return n


def format_bytes(n: int) -> str:
    """A human size for `n` bytes: "1 GiB", "1.5 GB", "5000 GiB", "512 B".

    The largest unit that states `n` exactly (a whole number, or under 1000 with at most three
    decimals) is used, so the text parses back to `n` with parse_bytes. Otherwise the size is
    rounded and the exact count follows: "1.18 MiB (1234567 B)".
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_bytes needs an int, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"format_bytes needs a byte count >= 0, got {n}")
    for name, scale in _DISPLAY_UNITS:
        whole, rest = divmod(n, scale)
        if whole >= 1 and (rest == 0 or (whole < 1000 and rest * 1000 % scale == 0)):
            decimals = f"{rest * 1000 // scale:03d}".rstrip("0")
            return f"{whole}.{decimals} {name}" if decimals else f"{whole} {name}"
    if n < 1024:
        return f"{n} B"
    name, scale = next((name, scale) for name, scale in _DISPLAY_UNITS if "i" in name and n >= scale)
    return f"{n / scale:.2f} {name} ({n} B)"


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, one of {_listing(allowed)}, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(f"{field} must be one of {_listing(allowed)}, got {value!r}")
    return value


def _listing(allowed: tuple) -> str:
    return ", ".join(repr(a) for a in allowed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """How the pager places pages across the GPU, host and disk tiers.

    page_size      tokens per page: 16, 32, 64, 128 or 256.
    gpu_budget     bytes of KV in GPU frames (int or size string, stored as int).
    host_budget    bytes of KV in pinned host slots; 0 turns the host tier off.
    disk_budget    bytes of KV in disk slots; 0 turns the disk tier off.
    disk_path      folder of the disk store; None lets the engine make a temporary one.
    io_backend     disk reads: "auto" (cuFile where a check on the store's own file finds it
                   returns the right bytes at least as fast as POSIX, else POSIX), "cufile" (an
                   error naming the reason where cuFile is not usable) or "posix".
    zero_copy      whether the attention kernel reads host slots in place instead of faulting.
    prefetch       whether the engine brings each step's sequences within the kernel's reach
                   for their next step right after it (Engine.prefetch): disk pages into host
                   slots, and, without zero_copy, host pages into free GPU frames.
    write_policy   "write_back" (a sealed page goes down a tier when evicted) or "write_through"
                   (as soon as it is sealed).
    fault_mode     "service" (faults are serviced inside the op) or "forbid" (a fault raises
                   FaultError; keeping the pages within reach is the caller's part, as
                   SlotDecoder.reserve does; for CUDA graphs).
    replacement    which page the GPU tier evicts: "lru" (least recently used) or "span"
                   (span-aware: the page attention comes back to least often, by the mass the
                   kernel reports, ties by recency; each sequence's first span_sink_pages and
                   last span_window_pages pages go only when nothing else is left).
    span_share     a step counts for a page under "span" when the page draws at least
                   span_share times its fair share of the step's attention mass (the mass over
                   the pages); a number > 0. A page's score is the share of its steps that count.
    span_decay     how fast a page's score forgets, in [0, 1): each step's weight in it is
                   multiplied by span_decay per later step (0.995: a memory of about 200 steps).
                   A page keeps its score while evicted.
    span_sink_pages, span_window_pages
                   pages kept at the start (attention sinks) and end (local window) of each
                   sequence under "span".
    """

    page_size: int = 256
    gpu_budget: int | str = "1GiB"
    host_budget: int | str = 0
    disk_budget: int | str = 0
    disk_path: str | os.PathLike | None = None
    io_backend: str = "auto"
    zero_copy: bool = True
    prefetch: bool = True
    write_policy: str = "write_back"
    fault_mode: str = "service"
    replacement: str = "lru"
    span_decay: float = 0.995
    span_share: float = 0.3
    span_sink_pages: int = 1
    span_window_pages: int = 4

    def __post_init__(self) -> None:
        # Frozen: normalised values go in through object.__setattr__.
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int):
            raise TypeError(
                f"Policy.page_size must be an int, one of {PAGE_SIZES}, "
                f"got {type(self.page_size).__name__} {self.page_size!r}"
            )
        if self.page_size not in PAGE_SIZES:
            raise ValueError(f"Policy.page_size must be one of {PAGE_SIZES} (tokens per page), got {self.page_size}")
        for name in ("gpu_budget", "host_budget", "disk_budget"):
            store(name, parse_bytes(getattr(self, name), field=f"Policy.{name}"))
        store("disk_path", _disk_path(self.disk_path))
        _choice("Policy.io_backend", self.io_backend, IO_BACKENDS)
        for name in ("zero_copy", "prefetch"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"Policy.{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
        _choice("Policy.write_policy", self.write_policy, WRITE_POLICIES)
        _choice("Policy.fault_mode", self.fault_mode, FAULT_MODES)
        _choice("Policy.replacement", self.replacement, REPLACEMENTS)
        if isinstance(self.span_decay, bool) or not isinstance(self.span_decay, (int, float)):
            raise TypeError(f"Policy.span_decay must be a number in [0, 1), got "
                            f"{type(self.span_decay).__name__} {self.span_decay!r}")
        if not 0 <= self.span_decay < 1:
            raise ValueError(f"Policy.span_decay must be in [0, 1), got {self.span_decay!r}")
        store("span_decay", float(self.span_decay))
        if isinstance(self.span_share, bool) or not isinstance(self.span_share, (int, float)):
            raise TypeError(f"Policy.span_share must be a number > 0 (of a page's fair share), got "
                            f"{type(self.span_share).__name__} {self.span_share!r}")
        try:
            share = float(self.span_share)
        except OverflowError:  # an int too large for a float
            share = math.inf
        if not (math.isfinite(share) and share > 0):
            raise ValueError(f"Policy.span_share must be a finite number > 0 (of a page's fair share), "
                             f"got {self.span_share!r}")
        store("span_share", share)
        for name in ("span_sink_pages", "span_window_pages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Policy.{name} must be an int >= 0 (pages), got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(f"Policy.{name} must be >= 0 (pages), got {value}")

    # ----- constructors and conversions -----

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> Policy:
        """A Policy from a flat mapping of field names to values; an unknown key is an error."""
        if not isinstance(settings, Mapping):
            raise TypeError(f"Policy.from_dict needs a mapping of settings, got {type(settings).__name__}")
        _check_keys(settings, "Policy.from_dict")
        return cls(**settings)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> Policy:
        """A Policy from a TOML file.

        When the file has a top-level `[policy]` table, that table alone is read, so the file may
        hold other programs' sections too; otherwise every top-level key is a setting. TOML has
        no null: leave disk_path out for a temporary folder. Needs Python 3.11+ (tomllib) or the
        `tomli` package.
        """
        try:
            import tomllib
        except ModuleNotFoundError:
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise RuntimeError(
                    "Policy.from_toml needs tomllib (Python 3.11+) or the tomli package (pip install tomli)"
                ) from None
        if not isinstance(path, (str, bytes, os.PathLike)):
            # open() would take an int as a file descriptor and close it.
            raise TypeError(f"Policy.from_toml needs a file path, got {type(path).__name__} {path!r}")
        with open(path, "rb") as file:
            try:
                document = tomllib.load(file)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"Policy.from_toml: {os.fspath(path)!s} is not valid TOML: {exc}") from exc
        if "policy" in document:
            settings = document["policy"]
            if not isinstance(settings, dict):
                raise TypeError(
                    f"Policy.from_toml: 'policy' in {os.fspath(path)!s} must be a table, "
                    f"got {type(settings).__name__} {settings!r}"
                )
            # The table is read alone; a setting outside it would be silently ignored.
            outside = sorted(key for key in document if key in _FIELD_NAMES)
            if outside:
                raise ValueError(
                    f"Policy.from_toml: {os.fspath(path)!s} has a [policy] table, which is read alone, and "
                    f"also sets {outside} outside it; move them into [policy]"
                )
        else:
            settings = document
        _check_keys(settings, f"Policy.from_toml({os.fspath(path)!s})")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a flat dict (budgets in int bytes); from_dict rebuilds the same Policy."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Policy:
        """A copy with `changes` applied, validated like a new Policy."""
        _check_keys(changes, "Policy.replace")
        return dataclasses.replace(self, **changes)

    # ----- sizing -----

    def page_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
        """Bytes of one page: [num_layers][2 (K, V)][num_kv_heads][page_size][head_dim] elements."""
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("element_size", element_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Policy.page_bytes: {name} must be a positive int, got {value!r}")
        return num_layers * 2 * num_kv_heads * self.page_size * head_dim * element_size

    def frames(self, page_bytes: int) -> dict[str, int]:
        """Whole pages each tier's budget holds: {"gpu": frames, "host": slots, "disk": slots}.

        Budgets are floored to whole pages. The GPU must hold at least one page, and a host or
        disk budget that is set (non-zero) must hold one too, since a tier that floors to nothing
        is surely not what was meant. No tier may hold more pages than a PTE can index (2**30).
        """
        if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or page_bytes < 1:
            raise ValueError(f"Policy.frames: page_bytes must be a positive int, got {page_bytes!r}")
        counts = {}
        for tier in ("gpu", "host", "disk"):
            budget = getattr(self, f"{tier}_budget")
            count = budget // page_bytes
            if count == 0 and (tier == "gpu" or budget > 0):
                off = "" if tier == "gpu" else " or 0 to turn the tier off"
                raise ValueError(
                    f"Policy.{tier}_budget of {format_bytes(budget)} holds no whole page of "
                    f"{format_bytes(page_bytes)}; set it to at least {format_bytes(page_bytes)}{off}"
                )
            if count > MAX_PAGES_PER_TIER:
                raise ValueError(
                    f"Policy.{tier}_budget of {format_bytes(budget)} holds {count} pages of "
                    f"{format_bytes(page_bytes)}, more than a page-table entry can index "
                    f"({MAX_PAGES_PER_TIER}); lower the budget or use larger pages"
                )
            counts[tier] = count
        return counts

    # ----- display -----

    def describe(self) -> str:
        """The settings, one a line, with human byte sizes."""

        def budget(n: int) -> str:
            return format_bytes(n) + (" (tier off)" if n == 0 else "")

        rows = [
            ("page_size", f"{self.page_size} tokens"),
            ("gpu_budget", format_bytes(self.gpu_budget)),
            ("host_budget", budget(self.host_budget)),
            ("disk_budget", budget(self.disk_budget)),
            ("disk_path", self.disk_path if self.disk_path is not None else "(temporary folder)"),
            ("io_backend", self.io_backend),
            ("zero_copy", "on" if self.zero_copy else "off"),
            ("prefetch", "on" if self.prefetch else "off"),
            ("write_policy", self.write_policy),
            ("fault_mode", self.fault_mode),
            ("replacement", self.replacement),
        ]
        if self.replacement == "span":
            rows += [("span_decay", f"{self.span_decay:g}"), ("span_share", f"{self.span_share:g}"),
                     ("span_sink_pages", str(self.span_sink_pages)),
                     ("span_window_pages", str(self.span_window_pages))]
        width = max(len(name) for name, _ in rows)
        return "Policy\n" + "\n".join(f"  {name.ljust(width)}  {text}" for name, text in rows)

    def __str__(self) -> str:
        return self.describe()


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(Policy))


def _check_keys(settings: Mapping[str, Any], where: str) -> None:
    unknown = [key for key in settings if key not in _FIELD_NAMES]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), _FIELD_NAMES, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise ValueError(f"{where}: unknown setting(s) {', '.join(hints)}; known settings: {', '.join(_FIELD_NAMES)}")


def _disk_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"Policy.disk_path must be a str, an os.PathLike or None, got {type(value).__name__} {value!r}"
        )
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"Policy.disk_path must be a text path, got {type(path).__name__} {path!r}")
    if not path.strip():
        raise ValueError(f"Policy.disk_path must be a folder path or None (a temporary folder), got {path!r}")
    return path
