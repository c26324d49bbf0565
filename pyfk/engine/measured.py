"""`backend="auto"` on CUDA by measurement: which exact backend was fastest for the nearest
measured problem on this GPU.

The table (JSON, version 1) holds what benchmarks/gpu_suite.py measured, turned into entries
by benchmarks/derive_auto.py:

    {"version": 1, "note": "...", "entries": [
      {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "dtype": "bfloat16", "combine": "product",
       "M": 50000, "N": 1281167, "widths": [64, 128, 256, 512], "k": 32,
       "seconds": {"triton": 0.41, "cuda": 0.9, "torch": 9.1}, "estimated": ["torch"],
       "source": "gpu_suite_<stamp>.json", "commit": "...", "date": "..."}]}

    M: queries; N: pool rows searched; widths: the per-scale widths L_j (those of z_j; g_j has
    the same width), as the suite records them -- not the per-segment widths (z_1, g_1, ...);
    k: neighbours per query; dtype: the pool's dtype; seconds: one pyfk.topk call per backend;
    estimated: backends whose seconds were timed on a query slice and scaled linearly in M.

Tables read: the packaged `measured_cuda.json` (beside this module) and, if the environment
variable PYFK_AUTO_TABLE names one, a user table. A user entry replaces a packaged entry for
the same problem (gpu, dtype, combine, M, N, widths, k) and wins ties in distance. Tables are
JSON only (nothing in them is executed); a malformed one raises ValueError naming the file.

The choice (`choose_backend`, pure): entries of this GPU's name (if none, of its compute
capability, said in the reason) with the problem's combine and at least one available backend;
those of the problem's dtype if any; the nearest by |log(work ratio)|, then |log(k ratio)|,
where work = M * N * sum(widths) (proportional to the suite's flops, 4 * sum(L) * M * N for
combine="product"); its fastest available backend. A nearest entry more than FAR_WORK_RATIO
away in work is still used -- it is the closest evidence there is, and the fixed order is no
better informed -- and the reason says so. No usable entry: the fixed order's first.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from pyfk.engine.layout import COMBINES, Layout

TABLE_VERSION = 1
TABLE_ENV = "PYFK_AUTO_TABLE"
PACKAGED_TABLE = Path(__file__).with_name("measured_cuda.json")
# A nearest entry this many times more or less work than the problem is named "far" in the reason.
FAR_WORK_RATIO = 100.0
DTYPES = ("float16", "bfloat16", "float32", "float64")
TABLE_KEYS = ("version", "entries", "note")
ENTRY_REQUIRED = ("gpu", "capability", "dtype", "combine", "M", "N", "widths", "k", "seconds")
ENTRY_OPTIONAL = ("estimated", "source", "commit", "date")
PROBLEM_KEYS = ("M", "N", "widths", "k", "dtype", "combine")
_CAPABILITY = re.compile(r"^\d+\.\d+$")

__all__ = ["FAR_WORK_RATIO", "PACKAGED_TABLE", "TABLE_ENV", "Measurement", "Problem", "as_problem",
           "choose_backend", "current_gpu", "dtype_name", "load_table", "table_entries", "table_json",
           "updated_entries", "write_table"]


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1


def dtype_name(dtype) -> str:
    """The table's name of a torch or NumPy dtype: torch.bfloat16 -> "bfloat16", np.float32 -> "float32"."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name


@dataclass(frozen=True)
class Problem:
    """One search as the table describes it: M queries against N pool rows, per-scale widths
    L_j (z_j's), k neighbours (None: a dense similarity, no top-k; k is then not compared),
    the pool's dtype name and the combine. work = M * N * sum(widths)."""

    M: int
    N: int
    widths: tuple[int, ...]
    k: int | None
    dtype: str
    combine: str = "product"

    def __post_init__(self):
        for name in ("M", "N"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"problem.{name}: expected a positive integer, got {getattr(self, name)!r}")
        widths = self.widths
        if (isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths
                or not all(_positive_int(w) for w in widths)):
            raise ValueError(f"problem.widths: expected a non-empty sequence of positive integers, got {widths!r}")
        if self.k is not None and not _positive_int(self.k):
            raise ValueError(f"problem.k: expected a positive integer or None, got {self.k!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"problem.dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"problem.combine: expected one of {list(COMBINES)}, got {self.combine!r}")
        object.__setattr__(self, "M", int(self.M))
        object.__setattr__(self, "N", int(self.N))
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))
        object.__setattr__(self, "k", None if self.k is None else int(self.k))

    @classmethod
    def for_layout(cls, M: int, N: int, layout: Layout, k: int | None, dtype) -> Problem:
        """The problem of a search on `layout` (per-segment widths z_1, g_1, ... or z_1, z_2, ...):
        its per-scale widths are the z_j segments'. dtype: a torch/NumPy dtype or its name."""
        widths = layout.widths[0::2] if layout.paired else layout.widths
        return cls(M, N, tuple(widths), k, dtype if isinstance(dtype, str) else dtype_name(dtype), layout.combine)

    @property
    def work(self) -> int:
        return self.M * self.N * sum(self.widths)

    def describe(self) -> str:
        return f"M={self.M} N={self.N} widths={list(self.widths)} k={self.k} {self.dtype} {self.combine}"


def as_problem(problem) -> Problem:
    """A Problem, or a Mapping with keys M, N, widths, k, dtype (and optionally combine) made into one."""
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, Mapping):
        missing = [key for key in PROBLEM_KEYS[:-1] if key not in problem]
        unknown = sorted(set(problem) - set(PROBLEM_KEYS))
        if missing or unknown:
            raise ValueError(f"problem: expected the keys {list(PROBLEM_KEYS)} (combine optional), got "
                             f"{sorted(problem)}" + (f"; missing {missing}" if missing else "")
                             + (f"; unknown {unknown}" if unknown else ""))
        return Problem(**problem)
    raise TypeError(f"problem: expected a pyfk.engine.measured.Problem or a dict with keys {list(PROBLEM_KEYS)}, "
                    f"got {type(problem).__name__}")


@dataclass(frozen=True)
class Measurement:
    """One table entry: the seconds of one pyfk.topk call per backend for one problem on one GPU."""

    gpu: str
    capability: str
    dtype: str
    combine: str
    M: int
    N: int
    widths: tuple[int, ...]
    k: int
    seconds: dict = field(hash=False)
    estimated: tuple[str, ...] = ()
    source: str | None = None
    commit: str | None = None
    date: str | None = None

    @property
    def key(self) -> tuple:
        """What makes two entries the same problem (a later one replaces an earlier one)."""
        return (self.gpu, self.dtype, self.combine, self.M, self.N, self.widths, self.k)

    @property
    def work(self) -> int:
        return self.M * self.N * sum(self.widths)

    def to_json(self) -> dict:
        out = {"gpu": self.gpu, "capability": self.capability, "dtype": self.dtype, "combine": self.combine,
               "M": self.M, "N": self.N, "widths": list(self.widths), "k": self.k, "seconds": dict(self.seconds)}
        if self.estimated:
            out["estimated"] = list(self.estimated)
        for name in ("source", "commit", "date"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, obj, where: str) -> Measurement:
        """An entry checked field by field; `where` (file and index) starts every error message."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        missing = [key for key in ENTRY_REQUIRED if key not in obj]
        if missing:
            raise ValueError(f"{where}: missing fields {missing} (an entry needs {list(ENTRY_REQUIRED)})")
        unknown = sorted(set(obj) - set(ENTRY_REQUIRED) - set(ENTRY_OPTIONAL))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown} (expected {list(ENTRY_REQUIRED + ENTRY_OPTIONAL)})")
        if not isinstance(obj["gpu"], str) or not obj["gpu"]:
            raise ValueError(f"{where}.gpu: expected a GPU name string, got {obj['gpu']!r}")
        if not isinstance(obj["capability"], str) or not _CAPABILITY.match(obj["capability"]):
            raise ValueError(f"{where}.capability: expected a string 'major.minor' such as '9.0', "
                             f"got {obj['capability']!r}")
        if obj["dtype"] not in DTYPES:
            raise ValueError(f"{where}.dtype: expected one of {list(DTYPES)}, got {obj['dtype']!r}")
        if obj["combine"] not in COMBINES:
            raise ValueError(f"{where}.combine: expected one of {list(COMBINES)}, got {obj['combine']!r}")
        for name in ("M", "N", "k"):
            if not _positive_int(obj[name]):
                raise ValueError(f"{where}.{name}: expected a positive integer, got {obj[name]!r}")
        widths = obj["widths"]
        if not isinstance(widths, list) or not widths or not all(_positive_int(w) for w in widths):
            raise ValueError(f"{where}.widths: expected a non-empty list of positive integers (per-scale L_j), "
                             f"got {widths!r}")
        seconds = obj["seconds"]
        if not isinstance(seconds, dict) or not seconds:
            raise ValueError(f"{where}.seconds: expected a non-empty object of backend name -> seconds, "
                             f"got {seconds!r}")
        for name, value in seconds.items():
            if not name or "[" in name:
                raise ValueError(f"{where}.seconds: expected backend names (no variants such as 'triton[merge]'), "
                                 f"got {name!r}")
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value <= 0):
                raise ValueError(f"{where}.seconds[{name!r}]: expected a positive finite number, got {value!r}")
        estimated = obj.get("estimated", [])
        if not isinstance(estimated, list) or not all(isinstance(n, str) and n in seconds for n in estimated):
            raise ValueError(f"{where}.estimated: expected a list of backend names from seconds "
                             f"{sorted(seconds)}, got {estimated!r}")
        for name in ("source", "commit", "date"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise ValueError(f"{where}.{name}: expected a string or null, got {obj[name]!r}")
        return cls(obj["gpu"], obj["capability"], obj["dtype"], obj["combine"], int(obj["M"]), int(obj["N"]),
                   tuple(int(w) for w in widths), int(obj["k"]), {n: float(s) for n, s in seconds.items()},
                   tuple(estimated), obj.get("source"), obj.get("commit"), obj.get("date"))


# ----------------------------------------------------------------------------- tables

def parse_table(doc, where: str) -> list[Measurement]:
    """The entries of a decoded table document; `where` (the file) starts every error message."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object with 'version' and 'entries', got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(TABLE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown top-level fields {unknown} (expected {list(TABLE_KEYS)})")
    if "version" not in doc or isinstance(doc["version"], bool) or doc["version"] != TABLE_VERSION:
        raise ValueError(f"{where}: expected version {TABLE_VERSION}, got {doc.get('version', 'no version')!r}")
    if not isinstance(doc.get("entries"), list):
        raise ValueError(f"{where}: expected 'entries' to be a list, got {type(doc.get('entries')).__name__}")
    entries, seen = [], {}
    for i, obj in enumerate(doc["entries"]):
        entry = Measurement.from_json(obj, f"{where}: entries[{i}]")
        if entry.key in seen:
            raise ValueError(f"{where}: entries[{i}] repeats the problem of entries[{seen[entry.key]}] "
                             "(same gpu, dtype, combine, M, N, widths, k)")
        seen[entry.key] = i
        entries.append(entry)
    return entries


def load_table(path, what: str = "table") -> list[Measurement]:
    """The entries of the table file `path` (json.loads only). ValueError naming the file when it
    cannot be read or is malformed; `what` names where the path came from (e.g. PYFK_AUTO_TABLE)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: expected a readable JSON table file, got {str(path)!r} ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: expected a JSON table, got invalid JSON ({exc})") from None
    return parse_table(doc, str(path))


# path -> ((mtime_ns, size), entries): a table is re-read when its file (or the env var naming it) changes.
_CACHE: dict[str, tuple[tuple[int, int], list[Measurement]]] = {}


def _cached_table(path: Path, what: str) -> list[Measurement]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{what}: expected a readable JSON table file, got {str(path)!r} ({exc})") from None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    entries = load_table(path, what)
    _CACHE[str(path)] = (stamp, entries)
    return entries


def clear_cache() -> None:
    _CACHE.clear()


def table_entries() -> list[Measurement]:
    """The entries "auto" consults: PYFK_AUTO_TABLE's (if set) first, then the packaged table's
    that it does not replace (same gpu, dtype, combine, M, N, widths, k)."""
    packaged = _cached_table(PACKAGED_TABLE, "packaged table")
    user_path = os.environ.get(TABLE_ENV, "").strip()
    if not user_path:
        return list(packaged)
    user = _cached_table(Path(user_path).expanduser(), TABLE_ENV)
    keys = {e.key for e in user}
    return list(user) + [e for e in packaged if e.key not in keys]


def updated_entries(old: Sequence[Measurement], new: Sequence[Measurement]) -> list[Measurement]:
    """`old` with each entry of the same problem as one in `new` replaced in place, the rest of
    `new` appended (a later one of `new` wins over an earlier one of the same problem)."""
    latest = {e.key: e for e in new}
    out = [latest.pop(e.key, e) for e in old]
    return out + list(latest.values())


def table_json(entries: Sequence[Measurement], note: str | None = None) -> str:
    """A version-1 table as text, one entry per line (small diffs when an entry changes)."""
    head = {"version": TABLE_VERSION}
    if note:
        head["note"] = note
    lines = [json.dumps(e.to_json()) for e in entries]
    body = "[\n    " + ",\n    ".join(lines) + "\n  ]" if lines else "[]"
    return "{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items()) + \
        f'  "entries": {body}\n}}\n'


def write_table(path, entries: Sequence[Measurement], note: str | None = None) -> Path:
    """Write a table atomically (beside it, then os.replace: a kill leaves the old file or the new)."""
    path = Path(path)
    text = table_json(entries, note)
    parse_table(json.loads(text), str(path))  # never write a table that would not load
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- the choice

def current_gpu(device) -> tuple[str | None, str | None]:
    """(name, "major.minor") of the CUDA device `device`, or (None, None) if it cannot be asked.
    The one place "auto" looks at the GPU (tests replace it)."""
    dev = torch.device(device)
    try:
        p = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
    except (RuntimeError, AssertionError, ValueError):  # no CUDA build or no such device
        return None, None
    return p.name, f"{p.major}.{p.minor}"


def _seconds(entry: Measurement, name: str) -> str:
    return f"{name} {entry.seconds[name]:.3g} s" + (" (est.)" if name in entry.estimated else "")


def choose_backend(entries: Sequence[Measurement], gpu: str | None, capability: str | None, problem: Problem,
                   available: Sequence[str]) -> tuple[str, str]:
    """(backend name, reason): the fastest of `available` (exact backends that can run here, in
    the fixed auto_priority order) in the entry nearest to `problem` (see the module docstring);
    `available[0]` when no entry is usable."""
    problem = as_problem(problem)
    available = list(available)
    if not available:
        raise ValueError("available: expected at least one available backend name, got none")
    label = gpu or "this GPU (name unknown)"

    def usable(candidates):
        return [e for e in candidates if e.combine == problem.combine and any(n in e.seconds for n in available)]

    notes = []
    found = usable([e for e in entries if gpu is not None and e.gpu == gpu])
    if not found:
        found = usable([e for e in entries if capability is not None and e.capability == capability])
        if found:
            notes.append(f"no measurement for {label}: using one of compute capability {capability}")
    if not found:
        for_gpu = any((gpu is not None and e.gpu == gpu) or (capability is not None and e.capability == capability)
                      for e in entries)
        if for_gpu:
            return available[0], (f"no measurement for {label} with combine={problem.combine!r} naming one of "
                                  f"{available}: fixed order")
        return available[0], f"no measurement for {label}: fixed order"
    same_dtype = [e for e in found if e.dtype == problem.dtype]
    if same_dtype:
        found = same_dtype
    else:
        notes.append(f"no {problem.dtype} measurement: using {sorted({e.dtype for e in found})}")

    def distance(e: Measurement) -> tuple[Fraction, Fraction]:
        # |log(a / b)| ordered as the exact ratio max/min >= 1: equal distances tie exactly
        work = Fraction(max(e.work, problem.work), min(e.work, problem.work))
        k = Fraction(1) if problem.k is None else Fraction(max(e.k, problem.k), min(e.k, problem.k))
        return work, k

    # min over (distance, position): on a tie the earlier entry (a PYFK_AUTO_TABLE one) wins
    entry = min(enumerate(found), key=lambda ie: (distance(ie[1]), ie[0]))[1]
    ranked = sorted((n for n in entry.seconds if n in available), key=lambda n: (entry.seconds[n], available.index(n)))
    choice = ranked[0]
    reason = (f"measured on {entry.gpu}: " + " < ".join(_seconds(entry, n) for n in ranked)
              + f" at M={entry.M} N={entry.N} widths={list(entry.widths)} k={entry.k} {entry.dtype} {entry.combine}"
              + (f" ({entry.source})" if entry.source else "") + f"; this problem: {problem.describe()}")
    faster = [n for n in entry.seconds if n not in available and entry.seconds[n] < entry.seconds[choice]]
    if faster:
        notes.append("faster there but not available here: " + ", ".join(_seconds(entry, n) for n in sorted(faster)))
    ratio = float(distance(entry)[0])
    if ratio > FAR_WORK_RATIO:
        notes.append(f"far: that shape does {ratio:.3g}x {'more' if entry.work > problem.work else 'less'} work than "
                     "this problem; used anyway (nothing nearer was measured, and the fixed order is no better "
                     "informed)")
    return choice, "; ".join([reason, *notes])
