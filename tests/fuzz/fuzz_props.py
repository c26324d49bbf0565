"""Hypothesis properties over the public API (not a test module: tests/fuzz/test_fuzz_api.py
runs each in a subprocess, so a segfault in the C++ kernel fails the test instead of
killing pytest).

Every property is the contract of tests/fuzz/fuzz_core.py: a result matching the float64
oracle, or a ValueError/TypeError naming the argument; inputs unchanged. Settings are
deterministic (derandomize=True, no example database): CI reruns the same examples.
PYFK_FUZZ_SCALE multiplies every max_examples (e.g. 10 for a long local run).
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyfk
from pyfk.features.store import DescriptorStore
from tests.fuzz.fuzz_core import (
    check_property,
    f64,
    oracle_select,
    oracle_similarity,
    oracle_topk,
)

SCALE = float(os.environ.get("PYFK_FUZZ_SCALE", "1"))
EXACT_CPU = [b["name"] for b in pyfk.backends() if b["available"] and b["exact"] and "cpu" in b["devices"]]


def fuzz(max_examples: int):
    return settings(max_examples=max(1, int(max_examples * SCALE)), deadline=None, derandomize=True,
                    database=None, print_blob=False, suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- arrays

NP_FLOATS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
T_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float64": torch.float64}
NP_LAYOUTS = ["c", "fortran", "neg_rows", "neg_cols", "col_step", "row_step", "unaligned", "col_slice"]
T_LAYOUTS = ["c", "transposed", "col_step", "offset", "expand_cols"]


def _values(rng, n, L, mode, max_exp):
    if mode == "integer":
        return rng.integers(-2, 3, size=(n, L)).astype(np.float64)
    if mode == "constant_rows":
        return np.repeat(rng.integers(-3, 4, size=(n, 1)).astype(np.float64), L, axis=1)
    x = rng.standard_normal((n, L))
    if mode == "scaled":
        x *= 10.0 ** rng.integers(-20, max_exp + 1)
    return x


def _np_layout(a, layout):
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "neg_rows":
        return a[::-1].copy()[::-1]
    if layout == "neg_cols":
        return a[:, ::-1].copy()[:, ::-1]
    if layout == "col_step":
        return np.repeat(a, 2, axis=1)[:, ::2]
    if layout == "row_step":
        return np.repeat(a, 2, axis=0)[1::2]
    if layout == "col_slice":
        return np.hstack([a, a, a])[:, a.shape[1]:2 * a.shape[1]]
    if layout == "unaligned":
        buf = bytearray(a.nbytes + 1)
        out = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        out[...] = a
        return out
    return np.ascontiguousarray(a)


def _torch_layout(t, layout):
    if layout == "transposed":
        return t.T.contiguous().T
    if layout == "col_step":
        return t.repeat_interleave(2, dim=1)[:, ::2]
    if layout == "offset":
        return torch.cat([t, t])[t.shape[0]:]
    if layout == "expand_cols" and t.shape[1] >= 1:
        return t[:, :1].expand(-1, t.shape[1])
    return t.contiguous()


@st.composite
def matrix(draw, n, L, kind, mode, max_exp=12):
    """One (n, L) float array: NumPy or torch, any supported float dtype, an unusual layout."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "numpy":
        dname = draw(st.sampled_from(sorted(NP_FLOATS)))
        cap = 3 if dname == "float16" else max_exp
        a = _values(rng, n, L, mode, cap).astype(NP_FLOATS[dname])
        return _np_layout(a, draw(st.sampled_from(NP_LAYOUTS)))
    dname = draw(st.sampled_from(sorted(T_FLOATS)))
    cap = 3 if dname == "float16" else max_exp
    t = torch.from_numpy(_values(rng, n, L, mode, cap)).to(T_FLOATS[dname])
    t = _torch_layout(t, draw(st.sampled_from(T_LAYOUTS)))
    if draw(st.booleans()):
        t = t.detach().clone().requires_grad_(True) if draw(st.booleans()) else t * torch.ones(
            (), dtype=t.dtype, requires_grad=True)  # a leaf or a non-leaf that requires grad
    return t


@st.composite
def problem(draw, max_m=5, max_n=30, max_exp=12, extreme=False):
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, max_n))
    s = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 8), min_size=s, max_size=s))
    kind = draw(st.sampled_from(["numpy", "torch"]))
    combine = draw(st.sampled_from(["product", "sum", "features"]))
    normalize = draw(st.sampled_from(["pcc", "l2", "none"]))
    mode = draw(st.sampled_from(["normal", "integer", "constant_rows", "scaled"]))
    if extreme:
        mode = "extreme"
    cap = 6 if normalize == "none" else max_exp

    def arrays(rows):
        if mode == "extreme":
            out = []
            for L in widths:
                rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
                scale = draw(st.sampled_from([1e18, 1e19, 2e19, 1e20, 1e25, 1e30, 1e36, 3e38]))
                a = (np.clip(rng.standard_normal((rows, L)), -1, 1) * scale).astype(np.float32)
                if draw(st.booleans()):
                    a[draw(st.integers(0, rows - 1))] /= np.float32(scale)  # one ordinary row
                out.append(a if kind == "numpy" else torch.from_numpy(a))
            return out
        return [draw(matrix(rows, L, kind, mode, cap)) for L in widths]

    qz, pz = arrays(m), arrays(n)
    qg = arrays(m) if combine != "features" or draw(st.booleans()) else None
    pg = arrays(n) if qg is not None else None
    return dict(qz=qz, qg=qg, pz=pz, pg=pg, combine=combine, normalize=normalize, kind=kind, n=n, m=m)


def _descriptors(z, g):
    return pyfk.Descriptors(z, g)


# ----------------------------------------------------------------------------- properties

@fuzz(100)
@given(st.data())
def prop_topk_and_similarity_match_oracle(data):
    """Valid random inputs (all dtypes, layouts, requires_grad, exclude sets, backends) match
    the float64 oracle: topk tie-tolerantly, similarity within the float32 budget."""
    p = data.draw(problem())
    backend = data.draw(st.sampled_from(["auto"] + EXACT_CPU))
    exclude = data.draw(st.none() | st.lists(st.integers(0, p["n"] - 1), unique=True, max_size=p["n"] - 1))
    if exclude is not None:
        form = data.draw(st.sampled_from(["list", "int32", "int64", "uint64", "torch"]))
        exclude = {"list": list, "int32": lambda e: np.array(e, np.int32), "int64": lambda e: np.array(e, np.int64),
                   "uint64": lambda e: np.array(e, np.uint64), "torch": lambda e: torch.tensor(e, dtype=torch.long)
                   }[form](exclude)
    available = p["n"] - (0 if exclude is None else len(exclude))
    k = data.draw(st.integers(1, available))
    kw = dict(k=k, combine=p["combine"], normalize=p["normalize"], backend=backend, exclude=exclude)
    qz, qg, pz, pg = p["qz"], p["qg"], p["pz"], p["pg"]
    check_property(lambda: pyfk.topk(_descriptors(qz, qg), _descriptors(pz, pg), **kw),
                   [qz, qg, pz, pg, kw], oracle_topk(qz, qg, pz, pg, **kw), (), expect="ok")
    skw = dict(combine=p["combine"], normalize=p["normalize"], backend=backend)
    check_property(lambda: pyfk.similarity(_descriptors(qz, qg), _descriptors(pz, pg), **skw),
                   [qz, qg, pz, pg], oracle_similarity(qz, qg, pz, pg, **skw), (), expect="ok")


@fuzz(60)
@given(st.data())
def prop_extreme_values_correct_or_refused(data):
    """Finite float32 values from 1e18 to 3e38 (squares overflow float32 above ~1.8e19):
    the oracle's answer, or a ValueError naming queries/pool (issue 9 item 5)."""
    p = data.draw(problem(max_m=3, max_n=12, extreme=True))
    api = data.draw(st.sampled_from(["topk", "similarity"]))
    qz, qg, pz, pg = p["qz"], p["qg"], p["pz"], p["pg"]
    kw = dict(combine=p["combine"], normalize=p["normalize"])
    if api == "topk":
        kw["k"] = data.draw(st.integers(1, p["n"]))
        fn = lambda: pyfk.topk(_descriptors(qz, qg), _descriptors(pz, pg), **kw)  # noqa: E731
        check = oracle_topk(qz, qg, pz, pg, **kw)
    else:
        fn = lambda: pyfk.similarity(_descriptors(qz, qg), _descriptors(pz, pg), **kw)  # noqa: E731
        check = oracle_similarity(qz, qg, pz, pg, **kw)
    check_property(fn, [qz, qg, pz, pg, kw], check, ("queries", "pool"), expect="either")


NP_BAD = [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64, np.complex128, object, "U3"]
T_BAD = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
CORRUPTIONS = ["dtype", "ndim0", "ndim1", "ndim3", "zero_cols", "rows", "width", "nan", "inf", "masked",
               "list", "none", "scalar"]


@fuzz(120)
@given(st.data())
def prop_bad_arrays_are_named(data):
    """One corrupted array (dtype, rank, zero columns, rows/width mismatch, NaN/Inf,
    masked, not an array) anywhere in queries/pool/val: a ValueError/TypeError naming
    where it is (TypeError for masked arrays)."""
    api = data.draw(st.sampled_from(["topk", "similarity", "select"]))
    kind = data.draw(st.sampled_from(["numpy", "torch"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    widths = [3, 4]
    m, n = 6, 15
    arrs = {(side, part): [rng.standard_normal((rows, L)).astype(np.float32) for L in widths]
            for side, rows in (("q", m), ("p", n)) for part in ("z", "g")}
    side, part, j = data.draw(st.sampled_from(["q", "p"])), data.draw(st.sampled_from(["z", "g"])), \
        data.draw(st.integers(0, 1))
    how = data.draw(st.sampled_from(CORRUPTIONS if kind == "numpy" else [c for c in CORRUPTIONS if c != "masked"]))
    a = arrs[(side, part)][j]
    if how == "dtype":
        a = a.astype(data.draw(st.sampled_from(NP_BAD))) if kind == "numpy" else a
    elif how == "ndim0":
        a = a[0, 0].copy()
    elif how == "ndim1":
        a = a[0].copy()
    elif how == "ndim3":
        a = a[:, :, None].copy()
    elif how == "zero_cols":
        a = a[:, :0].copy()
    elif how == "rows":
        a = a[:-1].copy()
    elif how == "width":
        a = np.hstack([a, a[:, :1]])
    elif how in ("nan", "inf"):
        a = a.astype(data.draw(st.sampled_from([np.float16, np.float32, np.float64])))
        a[data.draw(st.integers(0, a.shape[0] - 1)), data.draw(st.integers(0, a.shape[1] - 1))] = \
            np.nan if how == "nan" else -np.inf
    elif how == "masked":
        a = np.ma.masked_array(a, mask=rng.random(a.shape) < 0.3)
    elif how == "list":
        a = a.tolist()
    elif how == "none":
        a = None
    elif how == "scalar":
        a = 1.0
    arrs[(side, part)] = [x for x in arrs[(side, part)]]
    if kind == "torch":
        for key in arrs:
            arrs[key] = [torch.from_numpy(x) if isinstance(x, np.ndarray) and not isinstance(x, np.ma.MaskedArray)
                         and x.dtype.kind == "f" else x for x in arrs[key]]
        if how == "dtype":
            a = torch.from_numpy(a).to(data.draw(st.sampled_from(T_BAD)))
        elif isinstance(a, np.ndarray) and a.dtype.kind == "f":
            a = torch.from_numpy(a)
    arrs[(side, part)][j] = a
    qz, qg, pz, pg = arrs[("q", "z")], arrs[("q", "g")], arrs[("p", "z")], arrs[("p", "g")]
    sname = {"q": "val" if api == "select" else "queries", "p": "pool"}[side]
    names = (sname, "z", "g", f"z[{j}]", f"g[{j}]", "z/g")  # a constructor error names the array it checks
    if api == "topk":
        fn = lambda: pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), k=3)  # noqa: E731
    elif api == "similarity":
        fn = lambda: pyfk.similarity(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg))  # noqa: E731
    else:
        fn = lambda: pyfk.select(pyfk.Descriptors(pz, pg), pyfk.Descriptors(qz, qg), 3)  # noqa: E731
    check_property(fn, [qz, qg, pz, pg], None, names, expect="raise",
                   exc=(TypeError,) if how == "masked" else (ValueError, TypeError))


INDEX_NP = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float32,
            np.float64, np.bool_]
INDEX_T = [torch.int16, torch.int32, torch.int64, torch.uint8, torch.float32, torch.bool]


@fuzz(150)
@given(st.data())
def prop_index_sets(data):
    """Random exclude / labeled sets (duplicates, negatives, out of range, huge uint64,
    floats, bools, 2-D, any container): valid -> the oracle's answer without those rows;
    invalid -> a ValueError/TypeError naming the argument."""
    n = 12
    values = data.draw(st.lists(st.integers(-3, n + 3) | st.sampled_from([2**31, 2**63 - 1, 2**63 + 3, 2**64 - 1]),
                                max_size=8))
    form = data.draw(st.sampled_from(["list", "tuple", "numpy", "torch"]))
    twod = data.draw(st.booleans()) and len(values) % 2 == 0 and len(values) > 0
    idx = values
    try:
        if form == "numpy":
            dtype = data.draw(st.sampled_from(INDEX_NP))
            with np.errstate(all="ignore"):
                idx = np.array(values, dtype=object).astype(dtype) if values else np.array([], dtype)
        elif form == "torch":
            dtype = data.draw(st.sampled_from(INDEX_T))
            idx = torch.tensor([v if -2**63 <= v < 2**63 else 0 for v in values], dtype=torch.int64).to(dtype)
        elif form == "tuple":
            idx = tuple(values)
    except (OverflowError, RuntimeError, ValueError):
        idx = list(values)
    if twod:
        idx = idx.reshape(2, -1) if hasattr(idx, "reshape") else [list(idx[:len(idx) // 2]), list(idx[len(idx) // 2:])]
    # what the index set holds, as the library should read it
    if isinstance(idx, torch.Tensor):
        kind_int = not idx.dtype.is_floating_point and idx.dtype != torch.bool
        content, ndim = idx.reshape(-1).tolist(), idx.dim()
    elif isinstance(idx, np.ndarray):
        kind_int = idx.dtype.kind in "iu"
        content, ndim = idx.reshape(-1).tolist(), idx.ndim
    else:
        kind_int = all(isinstance(v, int) for v in values)
        content, ndim = list(values), 2 if twod else 1
    api = data.draw(st.sampled_from(["topk", "select", "acquire"]))
    need = 2
    if len(content) == 0:
        expect, names = "either", ("exclude", "labeled")
    elif not kind_int or ndim != 1 or len(set(content)) != len(content) or not all(0 <= v < n for v in content):
        expect, names = "raise", ("exclude", "labeled")
    elif n - len(content) < need:
        expect, names = "raise", ("exclude", "labeled", "k", "budget")
    else:
        expect, names = "ok", ()
    rng = np.random.default_rng(len(values))
    z, g = [rng.standard_normal((n, 3)).astype(np.float32)], [rng.standard_normal((n, 3)).astype(np.float32)]
    qz, qg = [rng.standard_normal((3, 3)).astype(np.float32)], [rng.standard_normal((3, 3)).astype(np.float32)]
    ok_idx = np.array(content, np.int64) if expect == "ok" else None
    if api == "topk":
        fn = lambda: pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(z, g), k=need, exclude=idx)  # noqa: E731
        check = oracle_topk(qz, qg, z, g, k=need, exclude=ok_idx)
        names = tuple(x for x in names if x not in ("labeled", "budget"))
    elif api == "select":
        fn = lambda: pyfk.select(pyfk.Descriptors(z, g), pyfk.Descriptors(qz, qg), need, k=need,  # noqa: E731
                                 exclude=idx)
        check = oracle_select(z, g, qz, qg, need, k=need, exclude=ok_idx)
        names = tuple(x for x in names if x != "labeled")
    else:
        p = np.full((n, 3), 1 / 3)
        p[:, 0] += np.linspace(0, 0.3, n)
        p /= p.sum(1, keepdims=True)
        fn = lambda: pyfk.acquire("least_confidence", pyfk.PoolInputs(probs=p), need, labeled=idx)  # noqa: E731

        def check(sel):
            assert len(sel.indices) == need and not np.isin(sel.indices, ok_idx).any()
            assert len(set(sel.indices.tolist())) == need
        names = tuple(x for x in names if x not in ("exclude", "k"))
    check_property(fn, [idx, z, g, qz, qg], check, names, expect=expect)


SCALAR_ARGS = [("topk", "k", 1, 10), ("select", "budget", 1, 10), ("select", "k", 1, 10),
               ("select", "seed", 0, 2**63 - 1), ("acquire", "budget", 1, 10), ("acquire", "seed", 0, 2**63 - 1)]
NP_INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@fuzz(150)
@given(st.data())
def prop_scalar_arguments(data):
    """k / budget / seed from everything a caller might pass (huge ints, negative, floats,
    NaN, bools, None, strings, NumPy scalars): valid integers in range -> the oracle's
    answer; anything else -> a ValueError/TypeError naming the argument."""
    api, arg, lo, hi = data.draw(st.sampled_from(SCALAR_ARGS))
    value = data.draw(
        st.integers(-2**70, 2**70) | st.integers(-3, 13) | st.floats() | st.booleans() | st.none()
        | st.text(max_size=3) | st.builds(lambda t, v: t(v), st.sampled_from(NP_INTS), st.integers(0, 12))
        | st.builds(np.float64, st.integers(0, 12)) | st.builds(np.bool_, st.booleans())
        | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -2**63, np.uint64(2**64 - 1), np.int64(-1)]))
    valid = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and lo <= int(value) <= hi
    if (api, arg) == ("select", "k") and value is None:
        valid = True  # select's documented default (32, clamped to the pool)
    n = 10
    rng = np.random.default_rng(0)
    z, g = [rng.standard_normal((n, 4)).astype(np.float32)], [rng.standard_normal((n, 4)).astype(np.float32)]
    qz, qg = [rng.standard_normal((3, 4)).astype(np.float32)], [rng.standard_normal((3, 4)).astype(np.float32)]
    if api == "topk":
        fn = lambda: pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(z, g), k=value)  # noqa: E731
        check = oracle_topk(qz, qg, z, g, k=value if valid else 1)
    elif api == "select":
        kw = {"budget": 3, "k": 4, "seed": 0, arg: value}
        fn = lambda: pyfk.select(pyfk.Descriptors(z, g), pyfk.Descriptors(qz, qg), kw["budget"],  # noqa: E731
                                 k=kw["k"], seed=kw["seed"])
        check = oracle_select(z, g, qz, qg, kw["budget"] if valid or arg != "budget" else 1, k=kw["k"])
    else:
        kw = {"budget": 3, "seed": 0, arg: value}
        probs = np.full((n, 2), 0.5)
        probs[:, 0] = np.linspace(0.05, 0.95, n)
        probs[:, 1] = 1 - probs[:, 0]
        fn = lambda: pyfk.acquire("random", pyfk.PoolInputs(probs=probs), kw["budget"], seed=kw["seed"])  # noqa: E731

        def check(sel):
            assert len(sel.indices) == int(kw["budget"]) and len(set(sel.indices.tolist())) == int(kw["budget"])
    check_property(fn, [value, z, g, qz, qg], check, (arg,), expect="ok" if valid else "raise")


@fuzz(60)
@given(st.data())
def prop_select_exact_rank_major(data):
    """select on small-integer descriptors with normalize='none' (exact scores, many ties):
    equal to the rank-major oracle when every error is a centre; structurally valid otherwise."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n_val, n_pool = data.draw(st.integers(1, 12)), data.draw(st.integers(2, 40))
    widths = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    combine = data.draw(st.sampled_from(["product", "sum", "features"]))
    kind = data.draw(st.sampled_from(["numpy", "torch"]))
    mk = lambda rows: [rng.integers(-2, 3, (rows, L)).astype(np.float32) for L in widths]  # noqa: E731
    vz, vg, pz, pg = mk(n_val), mk(n_val), mk(n_pool), mk(n_pool)
    if kind == "torch":
        vz, vg, pz, pg = ([torch.from_numpy(a) for a in arrs] for arrs in (vz, vg, pz, pg))
    y = rng.integers(0, 3, n_val)
    y_hat = np.where(rng.random(n_val) < 0.4, (y + 1) % 3, y)
    exclude = data.draw(st.none() | st.lists(st.integers(0, n_pool - 1), unique=True, max_size=n_pool - 1))
    available = n_pool - (0 if exclude is None else len(exclude))
    budget = data.draw(st.integers(1, available))
    k = data.draw(st.none() | st.integers(1, available))
    kw = dict(val_labels=y, val_pred=y_hat, k=k, combine=combine, normalize="none", exclude=exclude,
              seed=data.draw(st.integers(0, 5)))
    if k is None:
        del kw["k"]
    check_property(lambda: pyfk.select(pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg), budget, **kw),
                   [pz, pg, vz, vg, kw], oracle_select(pz, pg, vz, vg, budget, exact=True, **kw), (), expect="ok")


@fuzz(60)
@given(st.data())
def prop_uncertainty_strategies(data):
    """entropy / margin / least_confidence on random probabilities (float16/32/64, NumPy or
    torch with requires_grad, odd strides): a top-budget set under the float64 score."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n, c = data.draw(st.integers(1, 30)), data.draw(st.integers(2, 6))
    logits = rng.standard_normal((n, c)) * data.draw(st.sampled_from([0.1, 1.0, 5.0]))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    form = data.draw(st.sampled_from(["f64", "f32", "f16", "neg", "torch", "torch-grad"]))
    probs = {"f64": lambda: p, "f32": lambda: p.astype(np.float32), "f16": lambda: p.astype(np.float16),
             "neg": lambda: p[::-1].copy()[::-1], "torch": lambda: torch.from_numpy(p.astype(np.float32)),
             "torch-grad": lambda: torch.from_numpy(p).requires_grad_(True)}[form]()
    strategy = data.draw(st.sampled_from(["entropy", "margin", "least_confidence"]))
    labeled = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1))
    budget = data.draw(st.integers(1, n - len(labeled)))
    q = f64(probs)
    score = {"entropy": lambda: -(q * np.log(np.where(q > 0, q, 1.0))).sum(1),
             "margin": lambda: -np.diff(np.sort(q, 1)[:, -2:], axis=1)[:, 0],
             "least_confidence": lambda: 1 - q.max(1)}[strategy]()

    def check(sel):
        idx = sel.indices
        assert idx.shape == (budget,) and len(set(idx.tolist())) == budget
        assert not np.isin(idx, labeled).any()
        rest = np.setdiff1d(np.setdiff1d(np.arange(n), labeled), idx)
        if rest.size:
            assert score[idx].min() >= score[rest].max() - 1e-9, "not a top-budget set"
        np.testing.assert_allclose(sel.scores, score[idx], rtol=1e-6, atol=1e-9)
    check_property(lambda: pyfk.acquire(strategy, pyfk.PoolInputs(probs=probs), budget, labeled=labeled),
                   [probs, labeled], check, (), expect="ok")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                               max_size=3), max_leaves=6)


@fuzz(200)
@given(st.data())
def prop_store_corruption(data):
    """A valid store with one manifest field replaced / deleted / added, or one .npy file
    truncated or overwritten: DescriptorStore.open raises ValueError/TypeError naming the
    manifest or the array, or opens a store whose every array has its manifest shape and
    dtype, lives in its own regular file inside the directory, and reads without a crash."""
    root = tempfile.mkdtemp(prefix="pyfk-fuzz-store-")
    path = os.path.join(root, "store")
    n = 5
    arrays = {"z0": ((4,), "float16"), "g0": ((4,), "float16"), "z1": ((3,), "float32"), "g1": ((3,), "float32")}
    st_ = DescriptorStore.create(path, n, arrays)
    rng = np.random.default_rng(0)
    st_.write(0, {k: rng.standard_normal((n, *t)).astype(d) for k, (t, d) in arrays.items()})
    st_.commit(n)
    st_.close()
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    what = data.draw(st.sampled_from(["top", "array", "file", "bytes", "share"]))
    if what == "top":
        key = data.draw(st.sampled_from(["format", "version", "n", "rows_done", "complete", "arrays", "meta", "new"]))
        if data.draw(st.booleans()) and key != "new":
            del m[key]
        else:
            m[key] = data.draw(JSON)
    elif what in ("array", "share"):
        name = data.draw(st.sampled_from(sorted(arrays)))
        field = data.draw(st.sampled_from(["file", "shape", "dtype", "extra"]))
        if what == "share":
            m["arrays"][name]["file"] = data.draw(st.sampled_from(sorted(arrays))) + ".npy"
        elif data.draw(st.booleans()) and field != "extra":
            del m["arrays"][name][field]
        else:
            m["arrays"][name][field] = data.draw(JSON | st.sampled_from(
                [[n, 4], [n, 3], [n], [n, 4, 1], "float16", "float32", "int8", "<f2", ">f4", "z0.npy", "../z0.npy"]))
    if what in ("top", "array", "share"):
        with open(mpath, "w") as f:
            f.write(json.dumps(m))
    else:
        name = data.draw(st.sampled_from(sorted(arrays)))
        fpath = os.path.join(path, name + ".npy")
        size = os.path.getsize(fpath)
        cut = data.draw(st.integers(0, size))
        if data.draw(st.booleans()):
            with open(fpath, "r+b") as f:
                f.truncate(cut)
        else:
            junk = data.draw(st.binary(min_size=1, max_size=16))
            with open(fpath, "r+b") as f:
                f.seek(min(cut, size - 1))
                f.write(junk)

    def check(store):
        mm = json.load(open(mpath))
        files = [spec["file"] for spec in mm["arrays"].values()]
        assert len(set(files)) == len(files), f"manifest entries share a file: {files}"
        for name, spec in mm["arrays"].items():
            a = store.array(name)
            assert tuple(a.shape) == tuple(spec["shape"]) and a.dtype == np.dtype(spec["dtype"]), name
            f = os.path.join(path, spec["file"])
            assert os.path.dirname(os.path.realpath(f)) == os.path.realpath(path), f"{name} outside the store"
            assert os.path.isfile(f) and not os.path.islink(f), f"{name}: not a regular file"
            np.asarray(a).sum()  # every byte readable (a short file would SIGBUS here)
        if store.rows_done:
            try:
                store.descriptors()
            except (ValueError, TypeError):  # a store that holds no descriptors may say so
                pass

    names = ("manifest", "manifest.json", *arrays, *(a + ".npy" for a in arrays))
    try:
        check_property(lambda: DescriptorStore.open(path), [], check, names, expect="either", mode="word")
    finally:
        shutil.rmtree(root, ignore_errors=True)
