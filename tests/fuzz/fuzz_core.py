"""The fuzzer's contract and the checks every case shares (imported by the worker
subprocess and by the hypothesis properties; not a test module).

Contract (DESIGN.md section 7, issue 9): a call on a bad or borderline input either
returns a result that matches the float64 NumPy oracle (tests/oracle.py) or raises
ValueError/TypeError whose message names the offending argument; never another
exception type, never a crash, and the inputs are not modified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import pyfk
from tests.oracle import similarity64, tolerance

# ----------------------------------------------------------------------------- cases

EXPECTS = ("raise", "ok", "either")


@dataclass
class Call:
    """What one case runs: a nullary `fn`, the objects it must not modify (`watch`) and,
    for a call that returns, `check(result)` raising AssertionError unless the result
    matches the oracle."""

    fn: Callable
    watch: list = field(default_factory=list)
    check: Callable | None = None


@dataclass
class Case:
    """One named input. expect: "raise" (a ValueError/TypeError naming one of `names`),
    "ok" (a result matching the oracle) or "either" (one of the two). `exc`: the
    accepted exception types (narrower for masked arrays: TypeError, or wider where a
    documented type exists: FileNotFoundError, BackendUnavailable). mode: where the
    name must appear -- "label" (the `name:` prefix pyfk's messages start with, or a
    `name:` anywhere) or "word" (anywhere as a whole word: store paths and entries).
    mention: a substring the message must also hold (the offending value as given)."""

    name: str
    api: str
    expect: str
    names: tuple
    build: Callable
    exc: tuple = (ValueError, TypeError)
    mode: str = "label"
    note: str = ""
    mention: str = ""  # a value the message must report as given (e.g. an unwrapped uint64)

    def __post_init__(self):
        assert self.expect in EXPECTS, self.expect
        assert self.expect == "ok" or self.names, self.name


def names_argument(msg: str, names, mode: str = "label") -> bool:
    """Whether `msg` names one of `names` (see Case)."""
    for n in names:
        esc = re.escape(n)
        if mode == "word":
            if re.search(rf"(?<![\w]){esc}(?![\w])", msg):
                return True
            continue
        label = msg.split(": ", 1)[0] if ": " in msg else ""
        for tok in re.split(r"[\s/,]+", label):
            tok = tok.strip("'\"`()")
            base = re.sub(r"\[.*$", "", tok)
            if tok == n or base == n or tok.startswith((n + "[", n + ".")) or base.endswith("." + n):
                return True
        if re.search(rf"(?<![\w.\[]){esc}(\[[^\]]*\])*(\.\w+)*\s*:", msg):
            return True
    return False


# ----------------------------------------------------------------------------- inputs unchanged

class DirWatch:
    """Watch a directory (or file) tree: names, kinds, link targets and file contents."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def snapshot(self):
        out = []
        if not os.path.lexists(self.path):
            return ("absent",)
        if os.path.isfile(self.path) and not os.path.islink(self.path):
            return ("file", _file_digest(self.path))
        for root, dirs, files in os.walk(self.path):
            dirs.sort()
            for name in sorted(dirs + files):
                p = os.path.join(root, name)
                rel = os.path.relpath(p, self.path)
                if os.path.islink(p):
                    out.append((rel, "link", os.readlink(p)))
                elif os.path.isfile(p):
                    out.append((rel, "file", _file_digest(p)))
                elif os.path.isdir(p):
                    out.append((rel, "dir"))
                else:
                    out.append((rel, "other"))
        return tuple(out)


def _file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(b) -> str:
    return hashlib.sha1(b).hexdigest()


_BIG = 1 << 27


def _np_root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _snap_np(a: np.ndarray):
    meta = (type(a).__name__, a.dtype.str, a.shape, a.strides, bool(a.flags.writeable))
    target = a if a.nbytes <= _BIG else _np_root(a)
    if target.nbytes > _BIG:
        return meta + ("too-big",)
    if a.dtype.hasobject:
        body = repr([repr(x) for x in np.asarray(target).reshape(-1)[:10000].tolist()]).encode()
    else:
        body = np.ascontiguousarray(target).tobytes()
    return meta + (_digest(body),)


def _snap_torch(t: torch.Tensor, seen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad = t.grad if t.is_leaf else None
    meta = ("tensor", str(t.dtype), tuple(t.shape), str(t.device), bool(t.requires_grad),
            int(t._version), None if grad is None else _snap_torch(grad, seen))
    if t.layout != torch.strided:
        meta += (str(t.layout),)
    else:
        meta += (t.stride(), t.storage_offset())
    if t.device.type == "meta" or t.numel() > _BIG // 4 or t.layout != torch.strided:
        return meta
    x = t.detach().cpu().contiguous()
    try:
        body = x.numpy().tobytes()
    except (TypeError, RuntimeError):  # bfloat16, float8, ...: hash the raw bytes
        try:
            body = x.reshape(-1).view(torch.uint8).numpy().tobytes()
        except RuntimeError:
            return meta
    return meta + (_digest(body),)


def snapshot(obj, seen=None, depth=0):
    """A comparable summary of everything reachable from `obj` that a call could modify."""
    seen = set() if seen is None else seen
    if depth > 8:
        return ("deep",)
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return ("v", type(obj).__name__, repr(obj))
    if isinstance(obj, DirWatch):
        return ("dir", obj.snapshot())
    if id(obj) in seen:
        return ("seen", id(obj))
    seen.add(id(obj))
    if isinstance(obj, np.ma.MaskedArray):
        return ("ma", id(obj), _snap_np(obj.data), _snap_np(np.ma.getmaskarray(obj)), repr(obj.fill_value))
    if isinstance(obj, np.ndarray):
        return ("np", id(obj), _snap_np(obj))
    if isinstance(obj, np.generic):
        return ("npv", type(obj).__name__, repr(obj))
    if isinstance(obj, torch.Tensor):
        return ("t", id(obj), _snap_torch(obj, seen))
    if isinstance(obj, torch.nn.Module):
        return ("module", id(obj), tuple((n, m.training) for n, m in obj.named_modules()),
                tuple((n, _snap_torch(p, seen)) for n, p in obj.named_parameters()),
                tuple((n, _snap_torch(b, seen)) for n, b in obj.named_buffers()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, id(obj), tuple(snapshot(x, seen, depth + 1) for x in obj))
    if isinstance(obj, dict):
        return ("dict", id(obj), tuple((repr(k), snapshot(v, seen, depth + 1)) for k, v in obj.items()))
    if isinstance(obj, (set, frozenset)):
        return ("set", id(obj), tuple(sorted(repr(x) for x in obj)))
    if dataclasses.is_dataclass(obj) or type(obj).__module__.startswith(("pyfk", "torch.utils.data", "tests")):
        attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else {}
        if isinstance(obj, torch.utils.data.DataLoader):
            attrs = {"dataset": obj.dataset}
        return ("obj", type(obj).__name__, id(obj),
                tuple((k, snapshot(v, seen, depth + 1)) for k, v in attrs.items()))
    return ("other", type(obj).__name__, id(obj))


def _diff(a, b, path="input"):
    """A short description of where two snapshots differ."""
    if type(a) is not type(b) or not isinstance(a, tuple) or len(a) != len(b):
        return path
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return _diff(x, y, f"{path}/{a[0] if isinstance(a[0], str) else ''}[{i}]")
    return path


# ----------------------------------------------------------------------------- evaluation

def _summary(x) -> str:
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}(" + ", ".join(_summary(v) for v in x[:4]) + ")"
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__}{tuple(x.shape)} {x.dtype}"
    r = repr(x)
    return r if len(r) < 120 else r[:117] + "..."


def evaluate(case: Case, ctx) -> dict:
    """Run one case; a dict with `ok` and, if not, what happened and what was expected."""
    res = {"name": case.name, "api": case.api, "expect": case.expect, "names": list(case.names),
           "note": case.note}
    try:
        call = case.build(ctx)
    except Exception:
        res.update(ok=False, what="the test's own input builder failed", detail=traceback.format_exc(limit=4))
        return res
    try:
        before = snapshot(call.watch)
    except Exception:
        res.update(ok=False, what="the test's own input snapshot failed", detail=traceback.format_exc(limit=4))
        return res
    raised = result = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call.fn()
        except BaseException as exc:  # noqa: BLE001  (anything at all is reported)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raised = exc
    problems = []
    after = snapshot(call.watch)
    if before != after:
        problems.append(f"inputs modified ({_diff(before, after)})")
    want = f"ValueError/TypeError naming {list(case.names)}"
    if raised is not None:
        msg = str(raised)
        res["what"] = f"raised {type(raised).__module__}.{type(raised).__name__}: {msg[:400]}"
        if not isinstance(raised, case.exc):
            problems.append(f"wrong exception type (expected {'/'.join(e.__name__ for e in case.exc)})")
            res["detail"] = "".join(traceback.format_exception(raised)[-6:])[-2500:]
        elif case.expect == "ok":
            problems.append("raised on a valid input (expected a result matching the oracle)")
        elif not names_argument(msg, case.names, case.mode):
            problems.append(f"message does not name the argument (expected one of {list(case.names)})")
        elif case.mention and case.mention not in msg:
            problems.append(f"message does not report the offending value as given ({case.mention})")
    else:
        res["what"] = f"returned {_summary(result)}"
        if case.expect == "raise":
            problems.append(f"returned instead of raising {want}")
        elif call.check is not None:
            try:
                call.check(result)
            except AssertionError as exc:
                problems.append(f"result differs from the float64 oracle: {str(exc)[:600]}")
            except Exception:
                problems.append("oracle check failed: " + traceback.format_exc(limit=3)[-800:])
    res["ok"] = not problems
    res["problems"] = problems
    res["expected"] = {"raise": want, "ok": "a result matching the oracle",
                       "either": f"a result matching the oracle or {want}"}[case.expect]
    return res


def check_property(fn, watch, check, names, *, expect="either", exc=(ValueError, TypeError), mode="label"):
    """The same contract for one hypothesis example: raises AssertionError on a violation."""
    case = Case("hypothesis", "?", expect, tuple(names) or ("?",), lambda ctx: Call(fn, watch, check), exc, mode)
    res = evaluate(case, None)
    assert res["ok"], format_failure(res)


def format_failure(res: dict) -> str:
    lines = [f"{res['name']}: {'; '.join(res.get('problems', []))}",
             f"  what happened: {res.get('what', '?')}",
             f"  expected:      {res.get('expected', '?')}"]
    if res.get("note"):
        lines.append(f"  note:          {res['note']}")
    if res.get("detail"):
        lines.append("  detail:\n" + "\n".join("    " + ln for ln in res["detail"].splitlines()[-12:]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- oracles

def f64(a):
    """Exact float64 copy of a NumPy array / torch tensor (any float dtype, strides)."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    if isinstance(a, np.ma.MaskedArray):
        a = a.data
    return np.array(a, dtype=np.float64)


def f64s(arrays):
    if arrays is None:
        return None
    if isinstance(arrays, (np.ndarray, torch.Tensor)):
        arrays = [arrays]
    return [f64(a) for a in arrays]


def to_np(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def index_array(idx) -> np.ndarray:
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    return np.asarray(list(idx) if isinstance(idx, (set, range)) else idx).astype(np.int64).reshape(-1)


def _is_torch(arrays) -> bool:
    first = arrays if isinstance(arrays, (np.ndarray, torch.Tensor)) else arrays[0]
    return isinstance(first, torch.Tensor)


def _kind_ok(x, torch_in):
    want = torch.Tensor if torch_in else np.ndarray
    assert isinstance(x, want), f"expected {want.__name__} output for {'torch' if torch_in else 'NumPy'} input, " \
                                f"got {type(x).__name__}"


def oracle_topk(qz, qg, pz, pg, k, combine="product", normalize="pcc", exclude=None, **_):
    """check(result) for pyfk.topk on Descriptors(qz, qg) x Descriptors(pz, pg)."""
    def check(result):
        assert isinstance(result, tuple) and len(result) == 2, f"expected (scores, index), got {_summary(result)}"
        scores, index = result
        torch_in = _is_torch(qz)
        _kind_ok(scores, torch_in)
        _kind_ok(index, torch_in)
        s, i = to_np(scores), to_np(index)
        assert s.dtype == np.float32, f"scores: expected float32, got {s.dtype}"
        args = (f64s(qz), f64s(qg), f64s(pz), f64s(pg), combine, normalize)
        R = similarity64(*args)
        searched = np.ones(R.shape[1], dtype=bool)
        if exclude is not None:
            ex = index_array(exclude)
            searched[ex] = False
            assert not np.isin(i, ex).any(), "index: returned an excluded pool row"
        # NaN/Inf in an excluded row may be accepted (the cpu backend never reads such rows):
        # the searched rows must be finite, and the tolerance is theirs
        assert np.isfinite(R[:, searched]).all(), "oracle R is not finite (the case should have raised)"
        pz_s = [a[searched] for a in args[2]]
        pg_s = None if args[3] is None else [a[searched] for a in args[3]]
        tol = tolerance(args[0], args[1], pz_s, pg_s, combine, normalize)
        R[:, ~searched] = -np.inf
        pyfk.testing.assert_topk_valid(s, i, R, int(k), tol)
    return check


def oracle_similarity(qz, qg, pz, pg, combine="product", normalize="pcc", **_):
    def check(result):
        _kind_ok(result, _is_torch(qz))
        r = to_np(result)
        assert r.dtype == np.float32, f"expected float32, got {r.dtype}"
        args = (f64s(qz), f64s(qg), f64s(pz), f64s(pg), combine, normalize)
        R = similarity64(*args)
        assert r.shape == R.shape, f"expected shape {R.shape}, got {r.shape}"
        tol = tolerance(*args)
        bad = ~np.isclose(r, R, rtol=0, atol=tol)
        assert not bad.any(), f"R differs at {np.argwhere(bad)[0].tolist()}: {r[bad][:3]} vs {R[bad][:3]} (tol {tol})"
    return check


def rank_major64(S, centres, k, budget):
    """The rank-major rule on exact scores: rank by rank, best first, ties to the
    smaller pool index then the earlier centre; k doubles until `budget` indices.
    Excluded pool columns hold -inf."""
    avail = int(np.isfinite(S[0]).sum())
    k = min(k, avail)
    sub = S[centres]
    cols = np.broadcast_to(np.arange(S.shape[1]), sub.shape)
    while True:
        order = np.lexsort((cols, -sub), axis=-1)[:, :k]
        best = np.take_along_axis(sub, order, 1)
        seen, out = set(), []
        for r in range(k):
            for _, idx, _c in sorted((-best[c, r], order[c, r], c) for c in range(len(centres))):
                if idx not in seen:
                    seen.add(idx)
                    out.append(int(idx))
                    if len(out) == budget:
                        return np.array(out)
        if k >= avail:
            return np.array(out)
        k = min(avail, 2 * k)


def oracle_select(pz, pg, vz, vg, budget, val_labels=None, val_pred=None, k=None, combine="product",
                  normalize="pcc", exclude=None, exact=False, use_all=False, **_):
    """check(chosen) for pyfk.select. Always: `budget` distinct in-range int64 indices, none
    excluded. When every query is a centre (#queries <= budget): each query's best pool
    score is reached by a chosen index (rank 1 comes first); with exact=True (integer data,
    normalize='none') the chosen indices equal the rank-major oracle."""
    def check(chosen):
        if isinstance(chosen, dict):
            chosen = chosen["indices"]
        assert isinstance(chosen, np.ndarray), f"expected a NumPy array, got {type(chosen).__name__}"
        assert chosen.dtype == np.int64, f"expected int64, got {chosen.dtype}"
        n = f64s(pz)[0].shape[0]
        assert chosen.shape == (int(budget),), f"expected {int(budget)} indices, got shape {chosen.shape}"
        assert len(np.unique(chosen)) == len(chosen), "repeated indices"
        assert ((chosen >= 0) & (chosen < n)).all(), "index out of range"
        R = similarity64(f64s(vz), f64s(vg), f64s(pz), f64s(pg), combine, normalize)
        if exclude is not None:
            ex = index_array(exclude)
            assert not np.isin(chosen, ex).any(), "chose an excluded row"
            R[:, ex] = -np.inf
        if use_all or val_labels is None or val_pred is None:
            queries = np.arange(R.shape[0])
        else:
            queries = np.flatnonzero(to_np(val_labels) != to_np(val_pred))
            if queries.size == 0:
                queries = np.arange(R.shape[0])
        if len(queries) > int(budget):
            return
        tol = tolerance(f64s(vz), f64s(vg), f64s(pz), f64s(pg), combine, normalize)
        best = R[queries].max(1)
        got = R[queries][:, chosen].max(1)
        assert (got >= best - tol).all(), "a query's rank-1 neighbour is missing from the selection"
        if exact:
            kk = min(32, int((R[0] > -np.inf).sum())) if k is None else int(k)
            expected = rank_major64(R, queries, kk, int(budget))
            np.testing.assert_array_equal(chosen, expected)
    return check


def oracle_kcentre(pz, pg, vz, vg, budget, val_labels=None, val_pred=None, combine="product", normalize="pcc",
                   **_):
    """check(details) for pyfk.select(..., return_details=True) when budget < #errors: the
    centres are `budget` distinct error rows picked farthest-first under the float64 kernel
    distance d^2(a, b) = R(a,a) + R(b,b) - 2 R(a,b) (the first, seeded pick taken as given)."""
    def check(details):
        assert isinstance(details, dict), f"expected the details dict, got {type(details).__name__}"
        centres = np.asarray(details["centres"])
        errors = np.flatnonzero(to_np(val_labels) != to_np(val_pred))
        assert len(centres) == int(budget) < len(errors), (len(centres), budget, len(errors))
        assert len(set(centres.tolist())) == len(centres) and np.isin(centres, errors).all(), "bad centres"
        V = similarity64(f64s(vz), f64s(vg), f64s(vz), f64s(vg), combine, normalize)
        tol = 4 * tolerance(f64s(vz), f64s(vg), f64s(vz), f64s(vg), combine, normalize)
        d2 = np.diag(V)[:, None] + np.diag(V)[None, :] - 2 * V
        for i in range(1, len(centres)):
            others = np.setdiff1d(errors, centres[:i])
            far = d2[np.ix_(others, centres[:i])].min(1)
            got = d2[centres[i], centres[:i]].min()
            assert got >= far.max() - tol, (f"centre {i} (val row {centres[i]}) is at d^2={got:.6g} from the "
                                            f"earlier centres; row {others[far.argmax()]} is farther ({far.max():.6g})")
    return check


def both(*checks):
    def check(result):
        for c in checks:
            c(result)
    return check
