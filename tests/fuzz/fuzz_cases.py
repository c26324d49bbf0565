"""The registry of named bad and borderline inputs to the public API (not a test module).

Every entry is a `Case` (tests/fuzz/fuzz_core.py): a builder that makes fresh inputs
and a call, what is expected ("raise" naming an argument, "ok" matching the oracle,
"either"), and where it comes from (`note`: the issue-9 item or DESIGN.md section 7).
tests/fuzz/test_fuzz_api.py runs them all in a subprocess (a crash or a runaway
allocation fails the case, not pytest) and asserts how many there are.
"""

from __future__ import annotations

import copy
import fractions
import json
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pyfk
from pyfk.features.store import DescriptorStore
from tests.conftest import make_arrays
from tests.fuzz.fuzz_core import (
    Call,
    Case,
    DirWatch,
    both,
    f64,
    oracle_kcentre,
    oracle_select,
    oracle_similarity,
    oracle_topk,
    to_np,
)
from tests.models import mlp

REGISTRY: dict[str, Case] = {}

M, N, WIDTHS = 4, 20, (5, 6)
F32_MAX = float(np.finfo(np.float32).max)
VE_TE = (ValueError, TypeError)
MASKED = "issue 9 item 10: masked arrays are refused with a TypeError"
ITEM5 = "issue 9 item 5: finite values near the float32 range"
ITEM6 = "issue 9 item 6: torch inputs with requires_grad=True are accepted (detached)"
ITEM12 = "issue 9 item 12"
D7 = "DESIGN.md section 7"


def add(name, api, expect, names, build, *, exc=VE_TE, mode="label", note="", mention=""):
    if name in REGISTRY:
        raise AssertionError(f"duplicate fuzz case {name!r}")
    REGISTRY[name] = Case(name, api, expect, tuple(names), build, exc, mode, note, mention)


def bad_cases() -> list[str]:
    """Cases whose input is bad (a clear error is the only right answer, or the oracle
    decides for a borderline value): everything but the plain "ok" controls."""
    return [n for n, c in REGISTRY.items() if c.expect != "ok"]


# ----------------------------------------------------------------------------- data

def data(seed=0, m=M, n=N, widths=WIDTHS, dtype=np.float32, integer=False):
    rng = np.random.default_rng(seed)
    qz, qg = make_arrays(rng, m, widths, dtype, integer)
    pz, pg = make_arrays(rng, n, widths, dtype, integer)
    return qz, qg, pz, pg


def tt(arrays, dtype=None, requires_grad=False):
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if dtype is not None:
            t = t.to(dtype)
        if requires_grad:
            t = t.clone().requires_grad_(True)
        out.append(t)
    return out


def topk_call(qz, qg, pz, pg, **kw):
    """pyfk.topk(Descriptors(qz, qg), Descriptors(pz, pg), **kw), Descriptors made inside
    the call (so a constructor error counts too), with the topk oracle."""
    kw.setdefault("k", 3)

    def fn():
        return pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), **kw)
    return Call(fn, [qz, qg, pz, pg, kw], oracle_topk(qz, qg, pz, pg, **kw))


def sim_call(qz, qg, pz, pg, **kw):
    def fn():
        return pyfk.similarity(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), **kw)
    return Call(fn, [qz, qg, pz, pg, kw], oracle_similarity(qz, qg, pz, pg, **kw))


def val_data(seed=1, n_val=12, n_pool=N, widths=WIDTHS, integer=False, dtype=np.float32):
    rng = np.random.default_rng(seed)
    vz, vg = make_arrays(rng, n_val, widths, dtype, integer)
    pz, pg = make_arrays(rng, n_pool, widths, dtype, integer)
    y = rng.integers(0, 3, n_val)
    y_hat = y.copy()
    y_hat[::3] = (y[::3] + 1) % 3  # 4 errors out of 12
    return pz, pg, vz, vg, y, y_hat


def select_call(pz, pg, vz, vg, budget=6, exact=False, kcentre=False, **kw):
    """pyfk.select(Descriptors(pz, pg), Descriptors(vz, vg), budget, **kw) and its oracle
    (exact=True: the rank-major oracle on exact scores; kcentre=True: return_details and
    the farthest-first oracle on the centres)."""
    if kcentre:
        kw["return_details"] = True

    def fn():
        return pyfk.select(pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg), budget, **kw)
    check = oracle_select(pz, pg, vz, vg, budget, exact=exact, **kw)
    if kcentre:
        check = both(check, oracle_kcentre(pz, pg, vz, vg, budget, **kw))
    return Call(fn, [pz, pg, vz, vg, budget, kw], check)


def probs_data(n=N, c=4, seed=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c))
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(dtype)


def entropy64(p):
    p = f64(p)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def oracle_acquire(score64, n, budget, labeled=None, exact_scores=True):
    """check(Selection): `budget` distinct unlabeled in-range int64 picks; with score64 (N,)
    the picks are a top-`budget` set under it (ties tolerated) and the reported scores match."""
    def check(sel):
        assert isinstance(sel, pyfk.Selection), f"expected a Selection, got {type(sel).__name__}"
        idx, scores = sel.indices, sel.scores
        assert isinstance(idx, np.ndarray) and idx.dtype == np.int64, "indices: expected int64 NumPy"
        assert idx.shape == (int(budget),), f"expected {int(budget)} picks, got {idx.shape}"
        assert len(np.unique(idx)) == len(idx) and ((idx >= 0) & (idx < n)).all(), "bad or repeated picks"
        lab = np.zeros(0, np.int64) if labeled is None else np.unique(to_np(labeled).astype(np.int64))
        assert not np.isin(idx, lab).any(), "picked a labeled row"
        if score64 is None:
            return
        avail = np.setdiff1d(np.arange(n), lab)
        rest = np.setdiff1d(avail, idx)
        if rest.size:
            assert score64[idx].min() >= score64[rest].max() - 1e-9, "not a top-budget set under the oracle score"
        if exact_scores:
            np.testing.assert_allclose(scores, score64[idx], rtol=1e-6, atol=1e-9)
    return check


# ----------------------------------------------------------------------------- Descriptors(...)

NP_BAD_DTYPES = {
    "int8": np.int8, "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint64": np.uint64,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128, "object": object,
    "str": "U3", "bytes": "S3", "datetime64": "M8[s]", "timedelta64": "m8[s]",
    "structured": [("a", "f4"), ("b", "f4")], "void": "V4",
}
TORCH_BAD_DTYPES = {
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint8": torch.uint8, "bool": torch.bool, "complex64": torch.complex64, "complex128": torch.complex128,
}
if hasattr(torch, "float8_e4m3fn"):
    TORCH_BAD_DTYPES["float8_e4m3fn"] = torch.float8_e4m3fn


def np_as(a, dtype):
    dt = np.dtype(dtype)
    if dt.kind in "MmV" or dt.fields is not None:
        return np.zeros(a.shape, dtype=dt)
    return a.astype(dt)


def _desc_dtype_cases():
    for label, dtype in NP_BAD_DTYPES.items():
        def build(ctx, dtype=dtype):
            qz, qg, pz, pg = data()
            z = [np_as(pz[0], dtype), pz[1]]
            return Call(lambda: pyfk.Descriptors(z, pg), [z, pg])
        add(f"Descriptors/numpy-dtype-{label}-z0", "Descriptors", "raise", ("z[0]", "z"), build, note=D7)

        def build_t(ctx, dtype=dtype):
            qz, qg, pz, pg = data()
            pg = [pg[0], np_as(pg[1], dtype)]
            return topk_call(qz, qg, pz, pg)
        add(f"topk/pool-numpy-dtype-{label}-g1", "topk", "raise", ("g[1]", "g", "pool"), build_t, note=D7)
    for label, dtype in TORCH_BAD_DTYPES.items():
        def build(ctx, dtype=dtype):
            qz, qg, pz, pg = data()
            qz = tt(qz)
            qz[1] = qz[1].to(dtype)
            return topk_call(qz, tt(qg), tt(pz), tt(pg))
        add(f"topk/queries-torch-dtype-{label}-z1", "topk", "raise", ("z[1]", "z", "queries"), build, note=D7)

    def build_ld(ctx):
        qz, qg, pz, pg = data()
        pz = [pz[0].astype(np.longdouble), pz[1]]
        return topk_call(qz, qg, pz, pg)
    add("topk/pool-numpy-dtype-longdouble", "topk", "either", ("z[0]", "z", "pool"), build_ld,
        note="float128 is not one of the documented dtypes: refuse, or compute correctly")


def _desc_structure_cases():
    a = lambda: data()[2]  # noqa: E731
    bad_z = {
        "int": lambda: 5, "str": lambda: "abc", "bytes": lambda: b"abc", "None-scale": lambda: [None],
        "dict": lambda: {"z0": a()[0]}, "nested-list": lambda: [a()[0].tolist()],
        "empty-list": lambda: [], "empty-tuple": lambda: (), "float": lambda: 1.5,
        "array-and-list": lambda: [a()[0], a()[1].tolist()], "set": lambda: {1, 2},
        "0d": lambda: [np.array(1.0, np.float32)], "1d": lambda: [a()[0][0]],
        "3d": lambda: [a()[0][:, :, None]], "4d": lambda: [a()[0][None, :, :, None]],
        "zero-columns": lambda: [a()[0][:, :0]], "zero-by-zero": lambda: [np.zeros((0, 0), np.float32)],
        "single-3d-array": lambda: a()[0][:, :, None],
        "torch-0d": lambda: [torch.tensor(1.0)], "torch-1d": lambda: [torch.ones(5)],
        "torch-3d": lambda: [torch.ones(4, 5, 2)], "torch-zero-columns": lambda: [torch.ones(4, 0)],
        "rows-mismatch": lambda: [a()[0], a()[1][:7]],
        "numpy-torch-mix": lambda: [a()[0], torch.from_numpy(a()[1])],
        "python-scalar-scale": lambda: [3.0],
    }
    for label, make in bad_z.items():
        def build(ctx, make=make):
            z = make()
            return Call(lambda: pyfk.Descriptors(z), [z])
        add(f"Descriptors/z-{label}", "Descriptors", "raise", ("z", "z[0]", "z[1]", "z/g"), build, note=D7)
    bad_g = {
        "int": lambda z: 7, "str": lambda z: "g", "count-short": lambda z: [z[0]],
        "count-long": lambda z: [z[0], z[1], z[1]], "empty": lambda z: [],
        "rows-mismatch": lambda z: [z[0][:5], z[1]], "width-mismatch": lambda z: [z[0], z[1][:, :4]],
        "torch-with-numpy-z": lambda z: [torch.from_numpy(z[0]), torch.from_numpy(z[1])],
        "None-scale": lambda z: [z[0], None],
    }
    for label, make in bad_g.items():
        def build(ctx, make=make):
            z = data()[2]
            g = make(z)
            return Call(lambda: pyfk.Descriptors(z, g), [z, g])
        add(f"Descriptors/g-{label}", "Descriptors", "raise", ("g", "g[0]", "g[1]", "z/g"), build, note=D7)

    def build_gen(ctx):
        z = data()[2]
        return Call(lambda: pyfk.Descriptors(a for a in z), [z])
    add("Descriptors/z-generator", "Descriptors", "either", ("z",), build_gen,
        note="a generator of arrays: accept it or refuse it naming z")


# ----------------------------------------------------------------------------- topk: k, options, strings

K_BAD = {
    "0": 0, "-1": -1, "-2**63": -2**63, "2**63": 2**63, "2**64": 2**64, "10**30": 10**30, "N+1": N + 1,
    "True": True, "False": False, "2.5": 2.5, "3.0": 3.0, "nan": float("nan"), "inf": float("inf"),
    "str-3": "3", "None": None, "bytes-3": b"3", "np.float32-3": np.float32(3), "np.bool_": np.bool_(True),
    "complex-3": complex(3, 0), "list-3": [3], "array-3": np.array([3]), "np.int64-0": np.int64(0),
    "np.uint64-max": np.uint64(2**64 - 1), "np.int8--1": np.int8(-1), "fraction-3": fractions.Fraction(3, 1),
}
K_OK = {"np.int64-3": np.int64(3), "np.int8-3": np.int8(3), "np.uint64-3": np.uint64(3), "np.int32-N": np.int32(N),
        "1": 1, "N": N}


def _topk_k_cases():
    for label, k in K_BAD.items():
        def build(ctx, k=k):
            return topk_call(*data(), k=k)
        add(f"topk/k={label}", "topk", "raise", ("k",), build, note=D7 + ": negative or non-integer k, k > pool")
    for label, k in K_OK.items():
        def build(ctx, k=k):
            return topk_call(*data(), k=k)
        add(f"topk/k-ok={label}", "topk", "ok", (), build)

    def build_t(ctx):
        return topk_call(*data(), k=torch.tensor(3))
    add("topk/k=torch-0d-int", "topk", "either", ("k",), build_t)

    def build_default(ctx):
        qz, qg, pz, pg = data()
        return Call(lambda: pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)), [qz, qg, pz, pg],
                    oracle_topk(qz, qg, pz, pg, k=min(32, N)))
    add("topk/default-k-32-on-20-row-pool", "topk", "either", ("k",), build_default,
        note="topk returns (M, k): refusing the default k=32 on 20 rows naming k, or clamping, are both fine")

    def build_huge(ctx):
        z = data()[2]
        big = 1 << 20
        qz = [np.broadcast_to(z[0][0], (big, 5)), np.broadcast_to(z[1][0], (big, 6))]
        pz = [np.broadcast_to(z[0][1], (big, 5)), np.broadcast_to(z[1][1], (big, 6))]
        return topk_call(qz, qz, pz, pz, k=big)
    add("topk/k-huge-valid-2**20x2**20", "topk", "raise", ("k",), build_huge,
        note=ITEM12 + ": a huge valid k reaches the allocator")

    def build_excl_k(ctx):
        return topk_call(*data(), k=N - 2, exclude=[0, 1, 2])
    add("topk/k-above-available-after-exclude", "topk", "raise", ("k", "exclude"), build_excl_k, note=D7)


STRINGS = {
    "combine": {"PRODUCT": "PRODUCT", "empty": "", "None": None, "int": 1, "trailing-space": "product ",
                "list": ["product"], "bytes": b"product", "unknown": "kronecker"},
    "normalize": {"L2": "L2", "zscore": "zscore", "None": None, "empty": "", "int": 0, "nul": "pcc\x00",
                  "bool": True},
    "backend": {"gpu": "gpu", "empty": "", "None": None, "int": 3, "CPU": "CPU", "auto-space": "auto ",
                "path": "../cpu", "list": ["cpu"]},
}


def _topk_string_cases():
    for arg, values in STRINGS.items():
        for label, value in values.items():
            def build(ctx, arg=arg, value=value):
                return topk_call(*data(), **{arg: value})
            add(f"topk/{arg}={label}", "topk", "raise", (arg,), build, note=D7)
    for name in ("triton", "cuda"):
        backend = pyfk.engine.registry.get(name)
        if backend.unavailable_reason() is None and backend.accepts("cpu"):
            continue  # triton under TRITON_INTERPRET=1 (set by tests/engine/test_triton.py) runs CPU tensors
        def build(ctx, name=name):
            return topk_call(*data(), backend=name)
        add(f"topk/backend={name}-unavailable", "topk", "raise", ("backend",), build,
            exc=VE_TE + (pyfk.BackendUnavailable,), note="README: an unavailable backend raises BackendUnavailable")


OPTIONS_BAD = {
    "unknown-key": {"bogus": 1}, "threads-negative": {"threads": -1}, "threads-float": {"threads": 2.5},
    "threads-str": {"threads": "2"}, "threads-bool": {"threads": True}, "threads-list": {"threads": [2]},
    "isa-unknown": {"isa": "avx9000"}, "isa-int": {"isa": 5}, "not-a-dict-str": "threads=2",
    "not-a-dict-list": [("threads", 2)], "not-a-dict-int": 5, "int-key": {1: 2},
}


def _topk_option_cases():
    for label, opts in OPTIONS_BAD.items():
        def build(ctx, opts=opts):
            return topk_call(*data(), backend="cpu", options=opts)
        add(f"topk/options={label}", "topk", "raise", ("options", "threads", "isa"), build,
            note="README Backends: unknown or invalid options raise naming them")

    def build_torch(ctx):
        return topk_call(*data(), backend="torch", options={"threads": 2})
    add("topk/options-threads-on-torch-backend", "topk", "raise", ("options",), build_torch)
    for label, opts in {"threads-huge": {"threads": 10**6}, "threads-zero": {"threads": 0},
                        "threads-None": {"threads": None}, "threads-np-int": {"threads": np.int64(2)}}.items():
        def build(ctx, opts=opts):
            return topk_call(*data(), backend="cpu", options=opts)
        add(f"topk/options={label}", "topk", "either", ("options", "threads"), build)


# ----------------------------------------------------------------------------- exclude / labeled index sets

def index_sets(n):
    return {
        "duplicates": [1, 1], "negative": [-1], "equal-n": [n], "2**40": [2**40], "float-array": np.array([1.0, 2.0]),
        "float-list": [1.5], "bool-mask": np.ones(n, bool), "bool-list": [True, False],
        "uint64-2**63+3": np.array([2**63 + 3], np.uint64), "uint64-max": np.array([2**64 - 1], np.uint64),
        "2d": np.array([[1, 2]]), "0d-array": np.array(3), "python-int": 3, "strings": ["1"],
        "with-None": [1, None], "dict": {1: 2}, "str": "1,2", "python-2**70": [2**70], "int8-negative":
        np.array([-1], np.int8), "uint8-255": np.array([255], np.uint8), "torch-negative": torch.tensor([-1]),
        "torch-float": torch.tensor([1.0]), "torch-bool": torch.tensor([True, False]),
        "datetime": np.array(["2020-01-01"], "M8[D]"), "masked": np.ma.masked_array([1, 2], mask=[0, 1]),
        "complex": np.array([1 + 0j]), "all-rows": np.arange(n),
    }


UINT64_AS_GIVEN = {"uint64-2**63+3": str(2**63 + 3), "uint64-max": str(2**64 - 1)}
INDEX_EITHER = {"empty-float": lambda n: np.array([], float), "set": lambda n: {1, 2},
                "object-small-ints": lambda n: np.array([1, 2], dtype=object),
                "empty-2d": lambda n: np.zeros((0, 2), np.int64)}
INDEX_OK = {"range": lambda n: range(0, 5), "torch-int": lambda n: torch.tensor([3, 0]),
            "int8": lambda n: np.array([1, 2], np.int8), "uint64-small": lambda n: np.array([4], np.uint64),
            "tuple": lambda n: (5, 6), "empty-list": lambda n: []}


def _index_cases():
    for label, idx in index_sets(N).items():
        def build(ctx, idx=idx):
            return topk_call(*data(), exclude=copy.deepcopy(idx))
        add(f"topk/exclude={label}", "topk", "raise", ("exclude",), build,
            note=(ITEM12 + ": report the value as given, not wrapped" if "uint64" in label
                  else MASKED if label == "masked" else D7), mention=UINT64_AS_GIVEN.get(label, ""))
    for label, make in INDEX_EITHER.items():
        def build(ctx, make=make):
            return topk_call(*data(), exclude=make(N))
        add(f"topk/exclude={label}", "topk", "either", ("exclude",), build)
    for label, make in INDEX_OK.items():
        def build(ctx, make=make):
            return topk_call(*data(), exclude=make(N))
        add(f"topk/exclude-ok={label}", "topk", "ok", (), build)
    for label in ("duplicates", "negative", "equal-n", "float-array", "bool-mask", "uint64-2**63+3", "2d",
                  "with-None", "all-rows", "masked"):
        def build(ctx, label=label):
            pz, pg, vz, vg, y, y_hat = val_data()
            return select_call(pz, pg, vz, vg, 3, val_labels=y, val_pred=y_hat,
                               exclude=copy.deepcopy(index_sets(N)[label]))
        add(f"select/exclude={label}", "select", "raise", ("exclude",), build,
            note=ITEM12 if "uint64" in label else D7, mention=UINT64_AS_GIVEN.get(label, ""))
    for label in ("duplicates", "negative", "equal-n", "float-array", "bool-mask", "uint64-2**63+3",
                  "uint64-max", "2d", "all-rows", "python-2**70", "torch-negative", "masked"):
        def build(ctx, label=label):
            p = probs_data()
            labeled = copy.deepcopy(index_sets(N)[label])
            return Call(lambda: pyfk.acquire("entropy", pyfk.PoolInputs(probs=p), 3, labeled=labeled),
                        [p, labeled], oracle_acquire(entropy64(p), N, 3, labeled))
        add(f"acquire/labeled={label}", "acquire", "raise", ("labeled",), build,
            note=ITEM12 if "uint64" in label else D7, mention=UINT64_AS_GIVEN.get(label, ""))


# ----------------------------------------------------------------------------- values, strides, torch

def _inject(arrays, j, row, col, value):
    out = [a.copy() for a in arrays]
    out[j][row, col] = value
    return out


def _value_cases():
    specials = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    for side in ("queries", "pool"):
        for part in ("z", "g"):
            for label, v in specials.items():
                def build(ctx, side=side, part=part, v=v):
                    qz, qg, pz, pg = data()
                    arrays = {"queries": {"z": qz, "g": qg}, "pool": {"z": pz, "g": pg}}
                    arrays[side][part] = _inject(arrays[side][part], 1, 2, 3, v)
                    a = arrays
                    return topk_call(a["queries"]["z"], a["queries"]["g"], a["pool"]["z"], a["pool"]["g"])
                add(f"topk/{side}-{part}1-{label}", "topk", "raise", (side,), build, note=D7 + ": NaN/Inf")
    for label, dtype in {"float16": np.float16, "float64": np.float64}.items():
        def build(ctx, dtype=dtype):
            qz, qg, pz, pg = data(dtype=dtype)
            return topk_call(qz, qg, _inject(pz, 0, 0, 0, np.nan), pg)
        add(f"topk/pool-nan-{label}", "topk", "raise", ("pool",), build, note=D7)
    for label, dtype in {"bfloat16": torch.bfloat16, "float16": torch.float16}.items():
        def build(ctx, dtype=dtype):
            qz, qg, pz, pg = data()
            pg = tt(_inject(pg, 1, 4, 0, np.inf), dtype)
            return topk_call(tt(qz, dtype), tt(qg, dtype), tt(pz, dtype), pg)
        add(f"topk/pool-inf-torch-{label}", "topk", "raise", ("pool",), build, note=D7)

    def build_f16_overflow(ctx):
        qz, qg, pz, pg = data()
        pz = [a.astype(np.float16) for a in pz]
        pz[0][3, 1] = np.float16(65504) * np.float16(2)  # inf in float16
        return topk_call(qz, qg, pz, pg)
    add("topk/pool-float16-overflowed-to-inf", "topk", "raise", ("pool",), build_f16_overflow, note=D7)

    def build_nan_excluded(ctx):
        qz, qg, pz, pg = data()
        return topk_call(qz, qg, _inject(pz, 0, 7, 0, np.nan), pg, exclude=[7])
    add("topk/pool-nan-in-excluded-row", "topk", "either", ("pool",), build_nan_excluded)

    # huge finite values (issue 9 item 5): squares overflow float32 above ~1.8e19
    for label, scale in {"1e19": 1e19, "1e20": 1e20, "3e38": 3e38, "f32max": F32_MAX}.items():
        for normalize in ("pcc", "l2", "none"):
            for side in ("pool", "queries"):
                def build(ctx, scale=scale, normalize=normalize, side=side):
                    qz, qg, pz, pg = data()
                    f = lambda arrs: [np.clip(a, -1, 1) * np.float32(scale) for a in arrs]  # noqa: E731
                    if side == "pool":
                        pz = f(pz)
                    else:
                        qg = f(qg)
                    return topk_call(qz, qg, pz, pg, normalize=normalize)
                add(f"topk/{side}-huge-{label}-{normalize}", "topk", "either", (side,), build, note=ITEM5)

    def build_one_huge_row(ctx):
        qz, qg, pz, pg = data()
        pz = [a.copy() for a in pz]
        pz[1][5] *= np.float32(4e19)
        return topk_call(qz, qg, pz, pg)
    add("topk/pool-one-row-4e19-pcc", "topk", "either", ("pool",), build_one_huge_row, note=ITEM5)

    def build_f64_beyond(ctx):
        qz, qg, pz, pg = data(dtype=np.float64)
        pz = [a * 1e300 for a in pz]
        return topk_call(qz, qg, pz, pg)
    add("topk/pool-float64-1e300-pcc", "topk", "either", ("pool",), build_f64_beyond, note=ITEM5)

    def build_f64_beyond_none(ctx):
        qz, qg, pz, pg = data(dtype=np.float64)
        pz = [a * 1e300 for a in pz]
        return topk_call(qz, qg, pz, pg, normalize="none")
    add("topk/pool-float64-1e300-none", "topk", "raise", ("pool",), build_f64_beyond_none, note=ITEM5)

    def build_torch_huge(ctx):
        qz, qg, pz, pg = data()
        return topk_call(tt(qz), tt(qg), tt([a * np.float32(1e19) for a in pz]), tt(pg), normalize="l2")
    add("topk/pool-torch-1e19-l2", "topk", "either", ("pool",), build_torch_huge, note=ITEM5)

    def build_sum_none(ctx):
        qz, qg, pz, pg = data()
        return topk_call(qz, [a * np.float32(1e19) for a in qg], pz, [a * np.float32(1e19) for a in pg],
                         combine="sum", normalize="none")
    add("topk/both-1e19-sum-none", "topk", "either", ("pool", "queries"), build_sum_none, note=ITEM5)

    borderline = {
        "denormal-1e-40": lambda a: np.full_like(a, 1e-40) * (1 + np.arange(a.shape[1], dtype=np.float32)),
        "all-equal-rows": lambda a: np.ones_like(a),
        "all-zero": lambda a: np.zeros_like(a),
        "tiny-1e-30": lambda a: a * np.float32(1e-30),
        "large-1e15": lambda a: a * np.float32(1e15),
        "integers": lambda a: np.round(a * 2),
        "float16-max": lambda a: np.sign(a).astype(np.float16) * np.float16(65504),
    }
    for label, f in borderline.items():
        for normalize in ("pcc", "l2", "none"):
            def build(ctx, f=f, normalize=normalize):
                qz, qg, pz, pg = data()
                return topk_call(qz, qg, [f(a) for a in pz], [f(a) for a in pg], normalize=normalize, k=5)
            expect = "either" if (label == "large-1e15" and normalize == "none") else "ok"
            add(f"topk/pool-{label}-{normalize}", "topk", expect, ("pool",), build)


def _stride_cases():
    """Valid inputs with unusual memory layouts: the kernels must read them right (these reach
    the C++ kernel; a crash fails the case in the subprocess)."""
    def unaligned(a, dtype=np.float32):
        a = np.ascontiguousarray(a, dtype=dtype)
        buf = bytearray(a.nbytes + 1)
        out = np.frombuffer(buf, dtype=dtype, count=a.size, offset=1).reshape(a.shape)
        out[...] = a
        return out

    def zero_col_stride(a):
        return np.broadcast_to(a[:, :1], a.shape)

    def overlapping(a):
        base = np.ascontiguousarray(a).reshape(-1)
        return np.lib.stride_tricks.as_strided(base, shape=(a.shape[0] - 1, a.shape[1]),
                                               strides=(base.itemsize * 1, base.itemsize))

    layouts = {
        "col-step-2": lambda a: np.repeat(a, 2, axis=1)[:, ::2],
        "neg-rows": lambda a: a[::-1].copy()[::-1],
        "neg-cols": lambda a: a[:, ::-1].copy()[:, ::-1],
        "neg-both": lambda a: a[::-1, ::-1].copy()[::-1, ::-1],
        "fortran": np.asfortranarray,
        "transposed": lambda a: a.T.copy().T,
        "col-slice": lambda a: np.hstack([a, a])[:, :a.shape[1]],
        "row-step-3": lambda a: np.repeat(a, 3, axis=0)[::3],
        "unaligned-f32": unaligned,
        "unaligned-f16": lambda a: unaligned(a, np.float16),
        "unaligned-f64": lambda a: unaligned(a, np.float64),
        "zero-row-stride": lambda a: np.broadcast_to(a[0], a.shape),
        "zero-col-stride": zero_col_stride,
        "read-only": lambda a: (lambda b: (b.setflags(write=False), b)[1])(a.copy()),
        "f16-col-step": lambda a: np.repeat(a.astype(np.float16), 2, axis=1)[:, 1::2],
        "f64-neg-rows": lambda a: a.astype(np.float64)[::-1].copy()[::-1],
        "f16-fortran": lambda a: np.asfortranarray(a.astype(np.float16)),
    }
    for label, f in layouts.items():
        for side in ("pool", "queries"):
            def build(ctx, f=f, side=side):
                qz, qg, pz, pg = data()
                if side == "pool":
                    pz, pg = [f(a) for a in pz], [f(a) for a in pg]
                else:
                    qz, qg = [f(a) for a in qz], [f(a) for a in qg]
                return topk_call(qz, qg, pz, pg, k=4, backend="cpu")
            add(f"topk/{side}-layout-{label}", "topk", "ok", (), build)

    # a dimension of size 1 with a negative stride: NumPy calls such an array C-contiguous
    one_row = {"queries-one-row-neg-row-stride": ("queries", lambda a: a[:1][::-1].copy()[::-1]),
               "pool-one-row-neg-row-stride": ("pool", lambda a: a[:1][::-1].copy()[::-1]),
               "both-one-column-neg-col-stride": ("both", lambda a: a[:, :1][:, ::-1].copy()[:, ::-1])}
    for label, (side, f) in one_row.items():
        for api in ("topk", "similarity"):
            def build(ctx, side=side, f=f, api=api):
                qz, qg, pz, pg = data()
                if side in ("pool", "both"):
                    pz, pg = [f(a) for a in pz], [f(a) for a in pg]
                if side in ("queries", "both"):
                    qz, qg = [f(a) for a in qz], [f(a) for a in qg]
                if api == "similarity":
                    return sim_call(qz, qg, pz, pg)
                return topk_call(qz, qg, pz, pg, k=1)
            add(f"{api}/{label}", api, "ok", (), build)

    def build_overlap(ctx):
        qz, qg, pz, pg = data()
        return topk_call(qz, qg, [overlapping(a) for a in pz], [overlapping(a) for a in pg], k=4)
    add("topk/pool-layout-overlapping-rows", "topk", "ok", (), build_overlap)

    def build_memmap(ctx):
        qz, qg, pz, pg = data()
        path = os.path.join(ctx.dir, "pool.f32")
        mm = np.memmap(path, dtype=np.float32, mode="w+", shape=pz[0].shape)
        mm[...] = pz[0]
        mm.flush()
        ro = np.memmap(path, dtype=np.float32, mode="r", shape=pz[0].shape)
        return topk_call(qz, qg, [ro, pz[1]], pg)
    add("topk/pool-readonly-memmap", "topk", "ok", (), build_memmap)

    torch_layouts = {
        "transposed": lambda t: t.T.contiguous().T,
        "col-step": lambda t: t.repeat_interleave(2, dim=1)[:, ::2],
        "expand-rows": lambda t: t[:1].expand(t.shape[0], -1),
        "storage-offset": lambda t: torch.cat([t, t])[t.shape[0]:],
        "overlapping": lambda t: torch.as_strided(t.contiguous().reshape(-1), (t.shape[0] - 1, t.shape[1]), (1, 1)),
        "bf16-transposed": lambda t: t.to(torch.bfloat16).T.contiguous().T,
        "f16-col-step": lambda t: t.to(torch.float16).repeat_interleave(2, dim=1)[:, 1::2],
        "f64-transposed": lambda t: t.double().T.contiguous().T,
    }
    for label, f in torch_layouts.items():
        for backend in ("cpu", "torch"):
            def build(ctx, f=f, backend=backend):
                qz, qg, pz, pg = data()
                return topk_call(tt(qz), tt(qg), [f(t) for t in tt(pz)], [f(t) for t in tt(pg)], k=4,
                                 backend=backend)
            add(f"topk/pool-torch-layout-{label}-{backend}", "topk", "ok", (), build)


def _torch_cases():
    for side in ("queries", "pool", "both"):
        for dtype_label, dtype in {"f32": None, "bf16": torch.bfloat16}.items():
            def build(ctx, side=side, dtype=dtype):
                qz, qg, pz, pg = data()
                rq, rp = side in ("queries", "both"), side in ("pool", "both")
                return topk_call(tt(qz, dtype, rq), tt(qg, dtype, rq), tt(pz, dtype, rp), tt(pg, dtype, rp))
            add(f"topk/{side}-requires-grad-{dtype_label}", "topk", "ok", (), build, note=ITEM6)

    def build_nonleaf(ctx):
        qz, qg, pz, pg = data()
        w = torch.tensor(2.0, requires_grad=True)
        pz = [t * w for t in tt(pz)]
        return topk_call(tt(qz), tt(qg), pz, tt(pg))
    add("topk/pool-non-leaf-requires-grad", "topk", "ok", (), build_nonleaf, note=ITEM6)

    def build_sim(ctx):
        qz, qg, pz, pg = data()
        return sim_call(tt(qz, None, True), tt(qg, None, True), tt(pz), tt(pg))
    add("similarity/queries-requires-grad", "similarity", "ok", (), build_sim, note=ITEM6)

    def build_sel(ctx):
        pz, pg, vz, vg, y, y_hat = val_data()
        return select_call(tt(pz, None, True), tt(pg, None, True), tt(vz, None, True), tt(vg, None, True), 6,
                           val_labels=torch.from_numpy(y), val_pred=torch.from_numpy(y_hat))
    add("select/all-requires-grad", "select", "ok", (), build_sel, note=ITEM6)

    def build_meta(ctx):
        qz, qg, pz, pg = data()
        meta = lambda arrs: [torch.empty(a.shape, device="meta") for a in arrs]  # noqa: E731
        return topk_call(meta(qz), meta(qg), meta(pz), meta(pg))
    add("topk/meta-device-tensors", "topk", "raise", ("queries", "pool", "z", "backend", "device"), build_meta,
        exc=VE_TE + (pyfk.BackendUnavailable,))

    def build_sparse(ctx):
        qz, qg, pz, pg = data()
        return topk_call(tt(qz), tt(qg), [t.to_sparse() for t in tt(pz)], tt(pg))
    add("topk/pool-sparse-tensor", "topk", "either", ("pool", "z[0]", "z"), build_sparse)

    def build_mixed(ctx):
        qz, qg, pz, pg = data()
        return topk_call(qz, qg, tt(pz), tt(pg))
    add("topk/numpy-queries-torch-pool", "topk", "raise", ("queries", "pool"), build_mixed, note=D7)

    def build_matrix(ctx):
        qz, qg, pz, pg = data()
        return topk_call(qz, qg, [np.asmatrix(a) for a in pz], pg)
    add("topk/pool-np-matrix", "topk", "either", ("pool", "z[0]", "z"), build_matrix)


def _masked_cases():
    def masked(a, hide_nan=True):
        d = a.copy()
        mask = np.zeros(a.shape, bool)
        if hide_nan:
            d[1, 1] = np.nan
            mask[1, 1] = True
        return np.ma.masked_array(d, mask=mask)

    for side in ("queries", "pool"):
        for hide in (True, False):
            def build(ctx, side=side, hide=hide):
                qz, qg, pz, pg = data()
                if side == "pool":
                    pz = [masked(pz[0], hide), pz[1]]
                else:
                    qg = [qg[0], masked(qg[1], hide)]
                return topk_call(qz, qg, pz, pg)
            add(f"topk/{side}-masked-{'hidden-nan' if hide else 'nothing-masked'}", "topk", "raise",
                (side, "z", "g", "z[0]", "g[1]"), build, exc=(TypeError,), note=MASKED)

    def build_sim(ctx):
        qz, qg, pz, pg = data()
        return sim_call(qz, qg, [masked(pz[0]), pz[1]], pg)
    add("similarity/pool-masked", "similarity", "raise", ("pool", "z", "z[0]"), build_sim, exc=(TypeError,),
        note=MASKED)

    def build_sel(ctx):
        pz, pg, vz, vg, y, y_hat = val_data()
        return select_call(pz, pg, [masked(vz[0]), vz[1]], vg, 6, val_labels=y, val_pred=y_hat)
    add("select/val-masked", "select", "raise", ("val", "z", "z[0]"), build_sel, exc=(TypeError,), note=MASKED)

    def build_probs(ctx):
        p = np.ma.masked_array(probs_data(), mask=np.zeros((N, 4), bool))
        return Call(lambda: pyfk.acquire("entropy", pyfk.PoolInputs(probs=p), 3), [p])
    add("acquire/probs-masked", "acquire", "raise", ("pool.probs", "probs"), build_probs, exc=(TypeError,),
        note=MASKED)


def _mismatch_cases():
    cases = {
        "pool-one-scale-fewer": lambda qz, qg, pz, pg: (qz, qg, pz[:1], pg[:1], ("pool",)),
        "pool-widths-swapped": lambda qz, qg, pz, pg: (qz, qg, [pz[1], pz[0]], [pg[1], pg[0]], ("pool",)),
        "pool-no-g-product": lambda qz, qg, pz, pg: (qz, qg, pz, None, ("pool",)),
        "queries-no-g-product": lambda qz, qg, pz, pg: (qz, None, pz, pg, ("queries",)),
        "pool-zero-rows": lambda qz, qg, pz, pg: (qz, qg, [a[:0] for a in pz], [a[:0] for a in pg], ("pool",)),
        "queries-zero-rows": lambda qz, qg, pz, pg: ([a[:0] for a in qz], [a[:0] for a in qg], pz, pg,
                                                     ("queries",)),
        "pool-one-column-more": lambda qz, qg, pz, pg: (qz, qg, [np.hstack([a, a[:, :1]]) for a in pz],
                                                        [np.hstack([a, a[:, :1]]) for a in pg], ("pool",)),
    }
    for label, make in cases.items():
        def build(ctx, make=make):
            qz, qg, pz, pg, _ = make(*data())
            return topk_call(qz, qg, pz, pg)
        names = make(*data())[4]
        add(f"topk/{label}", "topk", "raise", names, build, note=D7)

    def build_gwidth(ctx):
        qz, qg, pz, pg = data()
        pgw = [np.hstack([a, a]) for a in pg]
        return Call(lambda: pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pgw, same_widths=False), k=3),
                    [qz, qg, pz, pgw])
    add("topk/pool-g-widths-differ", "topk", "raise", ("pool",), build_gwidth, note=D7)

    def build_features(ctx):
        qz, qg, pz, pg = data()
        return topk_call(qz, None, pz, None, combine="features")
    add("topk/features-without-g-ok", "topk", "ok", (), build_features)
    others = {"pool-ndarray": lambda p: p.z[0], "pool-None": lambda p: None, "pool-list": lambda p: p.z,
              "pool-dict": lambda p: {"z": p.z}, "pool-str": lambda p: "pool_store/"}
    for label, make in others.items():
        def build(ctx, make=make):
            qz, qg, pz, pg = data()
            q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
            bad = make(p)
            return Call(lambda: pyfk.topk(q, bad, k=3), [q, p, bad])
        add(f"topk/{label}", "topk", "raise", ("pool",), build, note=D7)

    def build_q_none(ctx):
        qz, qg, pz, pg = data()
        p = pyfk.Descriptors(pz, pg)
        return Call(lambda: pyfk.topk(None, p, k=3), [p])
    add("topk/queries-None", "topk", "raise", ("queries",), build_q_none, note=D7)


# ----------------------------------------------------------------------------- similarity

def _similarity_cases():
    def build_big(ctx):
        z = data()[2]
        qz = [np.broadcast_to(z[0][0], (1 << 15, 5)), np.broadcast_to(z[1][0], (1 << 15, 6))]
        pz = [np.broadcast_to(z[0][1], (1 << 14, 5)), np.broadcast_to(z[1][1], (1 << 14, 6))]
        return sim_call(qz, qz, pz, pz)
    add("similarity/dense-2**29-too-large", "similarity", "raise", ("queries", "pool"), build_big, note=D7)
    simple = {
        "pool-nan": (lambda qz, qg, pz, pg: (qz, qg, _inject(pz, 0, 1, 1, np.nan), pg), {}, ("pool",), "raise"),
        "queries-inf": (lambda qz, qg, pz, pg: (_inject(qz, 1, 0, 0, np.inf), qg, pz, pg), {}, ("queries",),
                        "raise"),
        "pool-widths": (lambda qz, qg, pz, pg: (qz, qg, [pz[1], pz[0]], [pg[1], pg[0]]), {}, ("pool",), "raise"),
        "combine-bad": (lambda *a: a, {"combine": "prod"}, ("combine",), "raise"),
        "normalize-bad": (lambda *a: a, {"normalize": "std"}, ("normalize",), "raise"),
        "backend-bad": (lambda *a: a, {"backend": "gpu"}, ("backend",), "raise"),
        "options-unknown": (lambda *a: a, {"backend": "cpu", "options": {"bogus": 1}}, ("options",), "raise"),
        "pool-zero-rows": (lambda qz, qg, pz, pg: (qz, qg, [a[:0] for a in pz], [a[:0] for a in pg]), {},
                           ("pool",), "raise"),
        "pool-huge-1e19-pcc": (lambda qz, qg, pz, pg: (qz, qg, [a * np.float32(1e19) for a in pz], pg), {},
                               ("pool",), "either"),
        "pool-huge-1e19-none": (lambda qz, qg, pz, pg: (qz, qg, [a * np.float32(1e19) for a in pz], pg),
                                {"normalize": "none"}, ("pool",), "either"),
        "float16-ok": (lambda *a: [[x.astype(np.float16) for x in arrs] for arrs in a], {}, (), "ok"),
        "neg-strides-ok": (lambda *a: [[x[::-1].copy()[::-1] for x in arrs] for arrs in a], {}, (), "ok"),
        "features-l2-ok": (lambda *a: a, {"combine": "features", "normalize": "l2"}, (), "ok"),
        "sum-none-ok": (lambda *a: a, {"combine": "sum", "normalize": "none"}, (), "ok"),
    }
    for label, (make, kw, names, expect) in simple.items():
        def build(ctx, make=make, kw=kw):
            return sim_call(*make(*data()), **kw)
        add(f"similarity/{label}", "similarity", expect, names, build, note=D7 if expect != "ok" else "")

    def build_bf16(ctx):
        qz, qg, pz, pg = data()
        return sim_call(*(tt(a, torch.bfloat16) for a in (qz, qg, pz, pg)))
    add("similarity/torch-bf16-ok", "similarity", "ok", (), build_bf16)

    def build_none(ctx):
        qz, qg, pz, pg = data()
        q = pyfk.Descriptors(qz, qg)
        return Call(lambda: pyfk.similarity(q, None), [q])
    add("similarity/pool-None", "similarity", "raise", ("pool",), build_none, note=D7)


# ----------------------------------------------------------------------------- select

SELECT_SCALARS = {
    "budget": {"0": 0, "-1": -1, "N+1": N + 1, "True": True, "2.5": 2.5, "None": None, "str": "3", "2**64": 2**64,
               "np.float64": np.float64(3)},
    "k": {"0": 0, "N+1": N + 1, "2.5": 2.5, "True": True, "-3": -3, "str": "8"},
    "seed": {"-1": -1, "2**63": 2**63, "1.5": 1.5, "None": None, "True": True, "str": "0"},
}


def _select_cases():
    for arg, values in SELECT_SCALARS.items():
        for label, value in values.items():
            def build(ctx, arg=arg, value=value):
                pz, pg, vz, vg, y, y_hat = val_data()
                kw = {"val_labels": y, "val_pred": y_hat, arg: value}
                budget = kw.pop("budget", 6)
                return select_call(pz, pg, vz, vg, budget, **kw)
            add(f"select/{arg}={label}", "select", "raise", (arg,), build, note=D7)
    oks = {
        "budget-np.int64": {"budget": np.int64(5)}, "seed-np.uint64": {"seed": np.uint64(7)},
        "seed-max": {"seed": 2**63 - 1}, "k-explicit-N": {"k": N},
        "default-k-budget-3-on-20-rows": {"budget": 3},
    }
    for label, kw in oks.items():
        def build(ctx, kw=kw):
            pz, pg, vz, vg, y, y_hat = val_data()
            kw = dict(kw)
            budget = kw.pop("budget", 6)
            return select_call(pz, pg, vz, vg, budget, val_labels=y, val_pred=y_hat, **kw)
        add(f"select/ok-{label}", "select", "ok", (), build,
            note="issue 9 item 11: the default k is clamped to the pool" if "default" in label else "")

    def build_exact(ctx):
        pz, pg, vz, vg, y, y_hat = val_data(integer=True, n_pool=30)
        ex = [0, 5, 7]
        return select_call(pz, pg, vz, vg, 6, val_labels=y, val_pred=y_hat, k=2, normalize="none", exclude=ex,
                           exact=True)
    add("select/ok-integer-exact-rank-major", "select", "ok", (), build_exact)
    labels = {
        "labels-short": ({"val_labels": lambda y: y[:-1]}, ("val_labels",)),
        "labels-float": ({"val_labels": lambda y: y + 0.5}, ("val_labels",)),
        "labels-2d": ({"val_labels": lambda y: y[:, None]}, ("val_labels",)),
        "labels-str": ({"val_labels": lambda y: y.astype(str)}, ("val_labels",)),
        "labels-bool": ({"val_labels": lambda y: y > 0}, ("val_labels",)),
        "labels-nan": ({"val_labels": lambda y: np.where(y > 0, np.nan, 0.0)}, ("val_labels",)),
        "labels-scalar": ({"val_labels": lambda y: 3}, ("val_labels",)),
        "pred-long": ({"val_pred": lambda y: np.r_[y, y]}, ("val_pred",)),
        "labels-only": ({"val_pred": lambda y: None}, ("val_labels", "val_pred")),
        "pred-only": ({"val_labels": lambda y: None}, ("val_labels", "val_pred")),
        "labels-masked": ({"val_labels": lambda y: np.ma.masked_array(y, mask=y > 1)}, ("val_labels",)),
    }
    for label, (mods, names) in labels.items():
        def build(ctx, mods=mods):
            pz, pg, vz, vg, y, y_hat = val_data()
            kw = {"val_labels": y, "val_pred": y_hat}
            for key, f in mods.items():
                kw[key] = f(kw[key])
            return select_call(pz, pg, vz, vg, 6, **kw)
        add(f"select/{label}", "select", "raise", names, build,
            exc=(TypeError,) if "masked" in label else VE_TE, note=MASKED if "masked" in label else D7)
    structural = {
        "val-no-g": (lambda pz, pg, vz, vg: (pz, pg, vz, None), {}, ("val",)),
        "pool-no-g": (lambda pz, pg, vz, vg: (pz, None, vz, vg), {}, ("pool",)),
        "pool-widths-swapped": (lambda pz, pg, vz, vg: ([pz[1], pz[0]], [pg[1], pg[0]], vz, vg), {}, ("pool",)),
        "val-nan": (lambda pz, pg, vz, vg: (pz, pg, _inject(vz, 0, 0, 0, np.nan), vg), {}, ("val",)),
        "pool-inf": (lambda pz, pg, vz, vg: (pz, _inject(pg, 1, 3, 0, np.inf), vz, vg), {}, ("pool",)),
        "val-zero-rows": (lambda pz, pg, vz, vg: (pz, pg, [a[:0] for a in vz], [a[:0] for a in vg]), {},
                          ("val", "val_labels")),
        "pool-zero-rows": (lambda pz, pg, vz, vg: ([a[:0] for a in pz], [a[:0] for a in pg], vz, vg), {},
                           ("pool", "exclude", "budget")),
        "combine-bad": (lambda *a: a, {"combine": "max"}, ("combine",)),
        "normalize-bad": (lambda *a: a, {"normalize": "minmax"}, ("normalize",)),
        "backend-bad": (lambda *a: a, {"backend": "tpu"}, ("backend",)),
        "options-unknown": (lambda *a: a, {"backend": "cpu", "options": {"nope": 1}}, ("options",)),
        "exclude-leaves-fewer-than-budget": (lambda *a: a, {"exclude": list(range(16))}, ("budget",)),
    }
    for label, (make, kw, names) in structural.items():
        def build(ctx, make=make, kw=kw):
            pz, pg, vz, vg, y, y_hat = val_data()
            pz, pg, vz, vg = make(pz, pg, vz, vg)
            if vz[0].shape[0] != len(y):
                y, y_hat = None, None
            return select_call(pz, pg, vz, vg, 6, val_labels=y, val_pred=y_hat, **kw)
        add(f"select/{label}", "select", "raise", names, build, note=ITEM5 if "huge" in label else D7)

    def build_huge_pcc(ctx):
        pz, pg, vz, vg, y, y_hat = val_data()
        return select_call([a * np.float32(1e19) for a in pz], pg, vz, vg, 6, val_labels=y, val_pred=y_hat)
    add("select/pool-huge-1e19-pcc", "select", "either", ("pool",), build_huge_pcc, note=ITEM5)

    def build_huge_none(ctx):
        pz, pg, vz, vg, y, y_hat = val_data()
        return select_call([a * np.float32(1e19) for a in pz], pg, vz, vg, 6, val_labels=y, val_pred=y_hat,
                           normalize="none")
    add("select/pool-huge-1e19-none", "select", "either", ("pool",), build_huge_none, note=ITEM5)
    for normalize in ("pcc", "l2", "none"):
        for scale in (1e19, 1e30):
            def build_kcentre_huge(ctx, normalize=normalize, scale=scale):
                pz, pg, vz, vg, y, y_hat = val_data()
                return select_call(pz, pg, [a * np.float32(scale) for a in vz], vg, 2, val_labels=y, val_pred=y_hat,
                                   normalize=normalize, kcentre=True)
            add(f"select/val-huge-{scale:.0e}-{normalize}-k-centre", "select", "either", ("val",),
                build_kcentre_huge, note=ITEM5 + " (k-centre distances square the validation rows)")

    def build_kcentre_ok(ctx):
        pz, pg, vz, vg, y, y_hat = val_data()
        return select_call(pz, pg, vz, vg, 2, val_labels=y, val_pred=y_hat, kcentre=True)
    add("select/ok-k-centre-farthest-first", "select", "ok", (), build_kcentre_ok)
    for label, bad in {"pool-None": ("pool", None), "val-None": ("val", None), "pool-ndarray": ("pool", "array"),
                       "val-list": ("val", "list")}.items():
        def build(ctx, bad=bad):
            pz, pg, vz, vg, y, y_hat = val_data()
            p, v = pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg)
            which, what = bad
            obj = None if what is None else (pz[0] if what == "array" else vz)
            args = {"pool": p, "val": v, which: obj}
            return Call(lambda: pyfk.select(args["pool"], args["val"], 3), [p, v, obj])
        add(f"select/{label}", "select", "raise", (bad[0],), build, note=D7)


# ----------------------------------------------------------------------------- acquire

def _acquire_cases():
    def entropy_call(p=None, budget=3, labeled=None, strategy="entropy", pool=None, **kw):
        p = probs_data() if p is None else p
        pool = pyfk.PoolInputs(probs=p) if pool is None else pool
        return Call(lambda: pyfk.acquire(strategy, pool, budget, labeled=labeled, **kw), [p, pool, labeled, kw],
                    oracle_acquire(entropy64(p), len(p), budget, labeled))

    bad = {
        "strategy-unknown": (lambda: entropy_call(strategy="nope"), ("strategy",)),
        "strategy-None": (lambda: entropy_call(strategy=None), ("strategy",)),
        "strategy-int": (lambda: entropy_call(strategy=3), ("strategy",)),
        "strategy-upper": (lambda: entropy_call(strategy="ENTROPY"), ("strategy",)),
        "pool-dict": (lambda: entropy_call(pool={"probs": probs_data()}), ("pool",)),
        "val-dict": (lambda: entropy_call(val={"labels": [1]}), ("val",)),
        "unknown-param": (lambda: entropy_call(k=3), ("k", "entropy", "params")),
        "budget-0": (lambda: entropy_call(budget=0), ("budget",)),
        "budget--1": (lambda: entropy_call(budget=-1), ("budget",)),
        "budget-N+1": (lambda: entropy_call(budget=N + 1), ("budget",)),
        "budget-True": (lambda: entropy_call(budget=True), ("budget",)),
        "budget-2.5": (lambda: entropy_call(budget=2.5), ("budget",)),
        "budget-exceeds-unlabeled": (lambda: entropy_call(budget=5, labeled=list(range(17))), ("budget",)),
        "seed--1": (lambda: entropy_call(seed=-1), ("seed",)),
        "seed-1.5": (lambda: entropy_call(seed=1.5), ("seed",)),
        "seed-True": (lambda: entropy_call(seed=True), ("seed",)),
        "probs-1d": (lambda: entropy_call(p=probs_data()[:, 0]), ("pool.probs", "probs")),
        "probs-3d": (lambda: entropy_call(p=probs_data()[:, :, None]), ("pool.probs", "probs")),
        "probs-int": (lambda: entropy_call(p=np.eye(4, dtype=np.int64)[np.arange(N) % 4]), ("pool.probs", "probs")),
        "probs-bool": (lambda: entropy_call(p=np.eye(4, dtype=bool)[np.arange(N) % 4]), ("pool.probs", "probs")),
        "probs-complex": (lambda: entropy_call(p=probs_data().astype(complex)), ("pool.probs", "probs")),
        "probs-object": (lambda: entropy_call(p=probs_data().astype(object)), ("pool.probs", "probs")),
        "probs-nan": (lambda: entropy_call(p=_inject([probs_data()], 0, 3, 1, np.nan)[0]), ("pool.probs", "probs")),
        "probs-negative": (lambda: entropy_call(p=probs_data() * np.r_[-1, 1, 1, 1]), ("pool.probs", "probs")),
        "probs-not-summing-to-1": (lambda: entropy_call(p=probs_data() * 2), ("pool.probs", "probs")),
        "probs-zero-classes": (lambda: entropy_call(p=np.zeros((N, 0))), ("pool.probs", "probs")),
        "probs-zero-rows": (lambda: entropy_call(p=np.zeros((0, 4))), ("pool.probs", "probs", "pool")),
        "probs-str": (lambda: entropy_call(p=probs_data().astype(str)), ("pool.probs", "probs")),
        "n-disagrees": (lambda: entropy_call(pool=pyfk.PoolInputs(probs=probs_data(), n=N - 1)), ("pool",)),
        "missing-field": (lambda: entropy_call(pool=pyfk.PoolInputs(n=N)), ("pool.probs", "probs")),
        "no-fields": (lambda: entropy_call(strategy="random", pool=pyfk.PoolInputs()), ("pool",)),
        "pool-n-True": (lambda: entropy_call(strategy="random", pool=pyfk.PoolInputs(n=True)), ("pool.n", "n")),
        "pool-n--1": (lambda: entropy_call(strategy="random", pool=pyfk.PoolInputs(n=-1)), ("pool.n", "n")),
        "pool-n-2.5": (lambda: entropy_call(strategy="random", pool=pyfk.PoolInputs(n=2.5)), ("pool.n", "n")),
        "pool-n-str": (lambda: entropy_call(strategy="random", pool=pyfk.PoolInputs(n="20")), ("pool.n", "n")),
        "pool-n-0": (lambda: entropy_call(strategy="random", pool=pyfk.PoolInputs(n=0)), ("pool.n", "n", "pool")),
        "mc-probs-2d": (lambda: entropy_call(strategy="bald", pool=pyfk.PoolInputs(mc_probs=probs_data())),
                        ("pool.mc_probs", "mc_probs")),
        "mc-probs-nan": (lambda: entropy_call(strategy="bald", pool=pyfk.PoolInputs(
            mc_probs=np.stack([_inject([probs_data()], 0, 0, 0, np.nan)[0], probs_data()]))),
            ("pool.mc_probs", "mc_probs")),
        "margin-one-class": (lambda: entropy_call(strategy="margin", p=np.ones((N, 1))), ("pool.probs", "probs")),
    }
    for label, (make, names) in bad.items():
        add(f"acquire/{label}", "acquire", "raise", names, lambda ctx, make=make: make(), note=D7)
    oks = {
        "entropy-float16": lambda: entropy_call(p=probs_data(dtype=np.float16)),
        "entropy-torch-requires-grad": lambda: entropy_call(
            p=torch.from_numpy(probs_data()).requires_grad_(True)),
        "entropy-labeled-torch": lambda: entropy_call(labeled=torch.tensor([0, 4, 9])),
        "entropy-neg-strides": lambda: entropy_call(p=probs_data()[::-1].copy()[::-1]),
        "entropy-budget-np.int64": lambda: entropy_call(budget=np.int64(4)),
        "random-n-only": lambda: Call(lambda: pyfk.acquire("random", pyfk.PoolInputs(n=N), 5, seed=3), [],
                                      oracle_acquire(None, N, 5)),
    }
    for label, make in oks.items():
        add(f"acquire/ok-{label}", "acquire", "ok", (), lambda ctx, make=make: make(),
            note=ITEM6 if "grad" in label else "")

    # PFK family and diversity strategies
    def pfk_call(strategy="pfk", budget=4, labeled=None, mutate=None, **kw):
        pz, pg, vz, vg, y, y_hat = val_data()
        parts = {"pz": pz, "pg": pg, "vz": vz, "vg": vg, "y": y, "y_hat": y_hat}
        if mutate:
            mutate(parts)

        def fn():
            pool = pyfk.PoolInputs(descriptors=pyfk.Descriptors(parts["pz"], parts["pg"]))
            val = pyfk.ValInputs(pyfk.Descriptors(parts["vz"], parts["vg"]), parts["y"], parts["y_hat"])
            return pyfk.acquire(strategy, pool, budget, labeled=labeled, val=val, **kw)
        return Call(fn, [parts, labeled, kw], oracle_acquire(None, N, budget, labeled))

    pfk_bad = {
        "pfk-no-val": (lambda: Call(lambda: pyfk.acquire("pfk", pyfk.PoolInputs(
            descriptors=pyfk.Descriptors(*data()[2:])), 3), []), ("val", "val.descriptors")),
        "pfk-k-0": (lambda: pfk_call(k=0), ("k",)),
        "pfk-k-str": (lambda: pfk_call(k="3"), ("k",)),
        "pfk-normalize-bad": (lambda: pfk_call(normalize="zz"), ("normalize",)),
        "pfk-val-nan": (lambda: pfk_call(mutate=lambda d: d.update(vz=_inject(d["vz"], 0, 0, 0, np.nan))),
                        ("val", "val.descriptors")),
        "pfk-val-labels-short": (lambda: pfk_call(mutate=lambda d: d.update(y=d["y"][:-1])),
                                 ("val_labels", "val.labels", "labels")),
        "pfk-val-labels-float": (lambda: pfk_call(mutate=lambda d: d.update(y=d["y"] + 0.25)),
                                 ("val_labels", "val.labels", "labels")),
        "pfk-pool-widths": (lambda: pfk_call(mutate=lambda d: d.update(pz=[d["pz"][1], d["pz"][0]],
                                                                        pg=[d["pg"][1], d["pg"][0]])),
                            ("pool", "pool.descriptors")),
        "pfk-labeled-dup": (lambda: pfk_call(labeled=[2, 2]), ("labeled",)),
        "pfk-use_all-str": (lambda: pfk_call(use_all="no"), ("use_all",)),
        "pfk-pool-masked": (lambda: pfk_call(mutate=lambda d: d.update(
            pz=[np.ma.masked_array(d["pz"][0]), d["pz"][1]])), ("pool", "z", "z[0]", "pool.descriptors")),
    }
    for label, (make, names) in pfk_bad.items():
        exc = (TypeError,) if "masked" in label else VE_TE
        note = MASKED if "masked" in label else ITEM5 if "huge" in label else D7
        add(f"acquire/{label}", "acquire", "raise", names, lambda ctx, make=make: make(), exc=exc, note=note)
    def build_pfk_huge(ctx):
        return pfk_call(normalize="none", mutate=lambda d: d.update(vz=[a * np.float32(1e19) for a in d["vz"]]))
    add("acquire/pfk-val-huge-1e19-none", "acquire", "either", ("val", "val.descriptors"), build_pfk_huge,
        note=ITEM5)
    for label, kw in {"pfk": {}, "pcc": {"strategy": "pcc"}, "pfk_sum-labeled": {"strategy": "pfk_sum",
                                                                               "labeled": [1, 2, 3]},
                      "pfk-requires-grad": {"mutate": lambda d: d.update(pz=tt(d["pz"], None, True),
                                                                        pg=tt(d["pg"], None, True),
                                                                        vz=tt(d["vz"], None, True),
                                                                        vg=tt(d["vg"], None, True))}}.items():
        add(f"acquire/ok-{label}", "acquire", "ok", (), lambda ctx, kw=kw: pfk_call(**kw),
            note=ITEM6 if "grad" in label else "")

    def diversity(strategy, field_value, budget=4):
        """field_value: {field: a nullary maker}, called inside the call (a constructor error counts)."""
        def fn():
            return pyfk.acquire(strategy, pyfk.PoolInputs(**{k: make() for k, make in field_value.items()}), budget)
        return Call(fn, [], oracle_acquire(None, N, budget))

    z = lambda: data()[2]  # noqa: E731
    div = {
        "coreset-features-nan": ("raise", lambda: diversity("coreset", {"features": lambda: pyfk.Descriptors(
            _inject(z(), 0, 2, 2, np.nan))}), ("pool.features", "features", "pool")),
        "coreset-features-masked": ("raise", lambda: diversity("coreset", {"features": lambda: pyfk.Descriptors(
            [np.ma.masked_array(z()[0])])}), ("pool.features", "features", "pool", "z[0]", "z")),
        "badge-nan": ("raise", lambda: diversity("badge", {"badge": lambda: pyfk.Descriptors(
            [z()[0]], [_inject(z(), 1, 0, 0, np.nan)[1]], same_widths=False)}), ("pool.badge", "badge", "pool")),
        "badge-no-g": ("raise", lambda: diversity("badge", {"badge": lambda: pyfk.Descriptors([z()[0]])}),
                       ("pool.badge", "badge", "pool")),
        "coreset-features-ndarray": ("raise", lambda: diversity("coreset", {"features": lambda: z()[0]}),
                                     ("pool.features", "features")),
        "coreset-ok": ("ok", lambda: diversity("coreset", {"features": lambda: pyfk.Descriptors(z())}), ()),
        "coreset-requires-grad-ok": ("ok", lambda: diversity("coreset", {"features": lambda: pyfk.Descriptors(
            tt(z(), None, True))}), ()),
        "badge-ok": ("ok", lambda: diversity("badge", {"badge": lambda: pyfk.Descriptors(
            [z()[0]], [z()[1]], same_widths=False)}), ()),
        "coreset-features-huge-1e19-pcc": ("either", lambda: diversity("coreset", {"features": lambda: pyfk.Descriptors(
            [a * np.float32(1e19) for a in z()])}), ("pool.features", "features", "pool")),
    }
    for label, (expect, make, names) in div.items():
        exc = (TypeError,) if "masked" in label else VE_TE
        note = MASKED if "masked" in label else ITEM6 if "grad" in label else D7 if expect != "ok" else ""
        add(f"acquire/{label}", "acquire", expect, names, lambda ctx, make=make: make(), exc=exc, note=note)


# ----------------------------------------------------------------------------- extract

LAYERS = ["0", "2"]


def tiny_model(seed=0, classes=5):
    torch.manual_seed(seed)
    return mlp(classes)


def tiny_batches(n=10, batch=4, seed=0, classes=5, labels=None, with_ids=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, classes, (n,), generator=g) if labels is None else labels
    out = []
    for s in range(0, n, batch):
        b = (x[s:s + batch], y[s:s + batch])
        out.append(b + (torch.arange(s, s + len(b[0])) + 100,) if with_ids else b)
    return out


def extract_oracle(model, batches, pseudo):
    """z and g of layers "0" and "2" of tests.models.mlp, written out by hand in float64."""
    m = copy.deepcopy(model).double().eval()
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([torch.as_tensor(b[1]).reshape(-1).long() for b in batches])
    h0 = m[0](x).detach().requires_grad_(True)
    h2 = m[2](torch.relu(h0))
    p2 = torch.zeros_like(h2, requires_grad=True)
    logits = m[4](torch.tanh(h2 + p2))
    target = y if pseudo == "true" else logits.argmax(1)
    g0, g2 = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), [h0, p2])
    return [h0.detach().numpy(), h2.detach().numpy()], [g0.numpy(), g2.numpy()]


def oracle_extract(model, batches, pseudo):
    zs, gs = extract_oracle(model, batches, pseudo)

    def check(ext):
        assert isinstance(ext, pyfk.Extraction), f"expected an Extraction, got {type(ext).__name__}"
        d = ext.descriptors
        for got, want, what in [(d.z[j], zs[j], f"z[{j}]") for j in range(2)] + \
                               [(d.g[j], gs[j], f"g[{j}]") for j in range(2)]:
            got = f64(got)
            assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)
    return check


_UNSET = object()


def extract_call(model=_UNSET, batches=_UNSET, layers=_UNSET, oracle_pseudo=None, **kw):
    model = tiny_model() if model is _UNSET else model
    batches = tiny_batches() if batches is _UNSET else batches
    layers = list(LAYERS) if layers is _UNSET else layers
    check = None if oracle_pseudo is None else oracle_extract(model, batches, oracle_pseudo)
    return Call(lambda: pyfk.extract(model, batches, layers, **kw), [model, batches, layers, kw], check)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.act(self.act(self.fc1(x))))


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


class _TupleTap(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.pair, self.fc2 = nn.Linear(12, 8), _Pair(), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.pair(self.fc1(x))[0])


class _Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.side, self.fc2 = nn.Linear(12, 8), nn.Linear(12, 3), nn.Linear(8, 5)

    def forward(self, x):
        self.side(x)
        return self.fc2(self.fc1(x))


class _Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 1)

    def forward(self, x):
        return self.fc1(x).reshape(-1)


class _NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 5, 12)

    def forward(self, x):
        return self.conv(x[:, None, :]).reshape(x.shape[0], 5)


def _with_labels(values):
    b = tiny_batches()
    y = torch.tensor(values) if not isinstance(values, torch.Tensor) else values
    return [(x, y[i * 4:i * 4 + len(x)]) for i, (x, _) in enumerate(b)]


def _extract_cases():
    l12 = "issue 9 item 12: labels outside the class range raise torch's IndexError"
    bad = {
        "model-None": (lambda: extract_call(model=None), ("model",), D7),
        "model-str": (lambda: extract_call(model="resnet18"), ("model",), D7),
        "model-function": (lambda: extract_call(model=lambda x: x), ("model",), D7),
        "layers-str": (lambda: extract_call(layers="0"), ("layers",), D7),
        "layers-empty": (lambda: extract_call(layers=[]), ("layers",), D7),
        "layers-unknown": (lambda: extract_call(layers=["0", "fc9"]), ("layers",), D7),
        "layers-duplicate": (lambda: extract_call(layers=["0", "0"]), ("layers",), D7),
        "layers-list-of-int": (lambda: extract_call(layers=[0]), ("layers",), D7),
        "layers-None": (lambda: extract_call(layers=None), ("layers",), D7),
        "layers-int": (lambda: extract_call(layers=5), ("layers",), D7),
        "pseudo_label-bad": (lambda: extract_call(pseudo_label="soft"), ("pseudo_label",), D7),
        "pseudo_label-None": (lambda: extract_call(pseudo_label=None), ("pseudo_label",), D7),
        "dtype-int8": (lambda: extract_call(dtype="int8"), ("dtype",), D7),
        "mc_passes-0": (lambda: extract_call(pseudo_label="mc", mc_passes=0), ("mc_passes",), D7),
        "mc_passes-True": (lambda: extract_call(pseudo_label="mc", mc_passes=True), ("mc_passes",), D7),
        "mc_passes-2.5": (lambda: extract_call(pseudo_label="mc", mc_passes=2.5), ("mc_passes",), D7),
        "projection-0": (lambda: extract_call(projection=0), ("projection",), D7),
        "projection--3": (lambda: extract_call(projection=-3), ("projection",), D7),
        "projection-2.5": (lambda: extract_call(projection=2.5), ("projection",), D7),
        "projection-str": (lambda: extract_call(projection="x"), ("projection",), D7),
        "projection-True": (lambda: extract_call(projection=True), ("projection",), D7),
        "loader-int": (lambda: extract_call(batches=5), ("loader",), D7),
        "loader-empty": (lambda: extract_call(batches=[]), ("loader",), D7),
        "loader-str-batches": (lambda: extract_call(batches=["abc"]), ("loader",), D7),
        "loader-4-tuples": (lambda: extract_call(batches=[b + (b[1], b[1]) for b in tiny_batches()]),
                            ("loader",), D7),
        "loader-label-count": (lambda: extract_call(batches=[(b[0], b[1][:-1]) for b in tiny_batches()]),
                               ("loader",), D7),
        "loader-numpy-inputs": (lambda: extract_call(batches=[(b[0].numpy(), b[1]) for b in tiny_batches()]),
                                ("loader",), D7),
        "labels-99-pseudo-true": (lambda: extract_call(batches=_with_labels([99] * 10), pseudo_label="true"),
                                  ("labels", "loader", "y"), l12),
        "labels-5-of-5-classes": (lambda: extract_call(batches=_with_labels([5] + [0] * 9), pseudo_label="true"),
                                  ("labels", "loader", "y"), l12),
        "labels--1-pseudo-true": (lambda: extract_call(batches=_with_labels([-1] * 10), pseudo_label="true"),
                                  ("labels", "loader", "y"), l12),
        "labels--100-pseudo-true": (lambda: extract_call(batches=_with_labels([-100] * 10), pseudo_label="true"),
                                    ("labels", "loader", "y"), l12 + " (-100 is cross_entropy's ignore_index: "
                                                                     "g would be silently 0)"),
        "labels-99-with_true": (lambda: extract_call(batches=_with_labels([99] * 10), with_true=True),
                                ("labels", "loader", "y"), l12),
        "labels-float-fractional": (lambda: extract_call(batches=_with_labels(torch.linspace(0, 3.5, 10)),
                                                         pseudo_label="true"),
                                    ("labels", "loader", "y"), D7 + ": wrong dtypes (1.7 silently becomes 1)"),
        "labels-2**40": (lambda: extract_call(batches=_with_labels([2**40] * 10), pseudo_label="true"),
                         ("labels", "loader", "y"), l12),
        "with_true-no-labels": (lambda: extract_call(batches=[(b[0],) for b in tiny_batches()], with_true=True),
                                ("pseudo_label/with_true", "with_true", "loader"), D7),
        "map-without-reference": (lambda: extract_call(pseudo_label="map"), ("map_reference",), D7),
        "map-reference-label-count": (lambda: extract_call(pseudo_label="map", map_reference=(
            pyfk.Descriptors([np.zeros((3, 16), np.float32), np.zeros((3, 9), np.float32)]), [0, 1])),
            ("map_reference",), D7),
        "badge-no-linear": (lambda: extract_call(model=_NoLinear(), layers=["conv"], badge=True), ("badge",), D7),
        "badge_layer-relu": (lambda: extract_call(badge=True, badge_layer="1"), ("badge_layer",), D7),
        "badge_layer-unknown": (lambda: extract_call(badge=True, badge_layer="head"), ("badge_layer",), D7),
        "shared-module-twice": (lambda: extract_call(model=_Twice(), layers=["act"]), ("layers",), D7),
        "tap-returns-tuple": (lambda: extract_call(model=_TupleTap(), layers=["pair"]), ("layers",), D7),
        "layer-not-influencing-logits": (lambda: extract_call(model=_Dead(), layers=["fc1", "side"]), ("layers",),
                                         D7),
        "model-1d-logits": (lambda: extract_call(model=_Flat(), layers=["fc1"]), ("model",), D7),
        "device-bogus": (lambda: extract_call(device="bogus"), ("device",), D7),
        "device-cuda-unavailable": (lambda: extract_call(device="cuda"), ("device",), D7),
        "seed-str-with-projection": (lambda: extract_call(projection=4, seed="x"), ("seed",), D7),
        "seed-float-with-projection": (lambda: extract_call(projection=4, seed=0.5), ("seed",), D7),
        "mc_degrees-nan": (lambda: extract_call(pseudo_label="mc", mc_passes=2, mc_degrees=float("nan")),
                           ("mc_degrees",), D7),
    }
    for label, (make, names, note) in bad.items():
        add(f"extract/{label}", "extract", "raise", names, lambda ctx, make=make: make(), note=note)

    def build_nan_store(ctx):
        b = tiny_batches()
        b[1][0][2, 3] = float("nan")
        ds = torch.utils.data.TensorDataset(torch.cat([x for x, _ in b]), torch.cat([y for _, y in b]))
        loader = torch.utils.data.DataLoader(ds, batch_size=4)
        store = os.path.join(ctx.dir, "nan_store")
        return Call(lambda: pyfk.extract(tiny_model(), loader, LAYERS, store=store), [loader])
    add("extract/nan-pixel-into-store", "extract", "raise", ("ids", "example", "examples", "batch", "loader"),
        build_nan_store, mode="word", note="issue 9 item 9: NaN produced during extraction is refused naming ids")

    def build_nan_mem(ctx):
        b = tiny_batches()
        b[0][0][1, 0] = float("nan")
        return extract_call(batches=b)
    add("extract/nan-pixel-in-memory", "extract", "raise", ("ids", "example", "examples", "batch", "loader"),
        build_nan_mem, mode="word", note="issue 9 item 9 (in memory: the result holds NaN that topk refuses later)")

    def build_symlink_store(ctx):
        target = os.path.join(ctx.dir, "precious.npy")
        np.save(target, np.arange(10.0))
        store = os.path.join(ctx.dir, "linked_store")
        os.makedirs(store)
        os.symlink(target, os.path.join(store, "z0.npy"))
        ds = torch.utils.data.TensorDataset(torch.randn(10, 12), torch.randint(0, 5, (10,)))
        loader = torch.utils.data.DataLoader(ds, batch_size=4)
        return Call(lambda: pyfk.extract(tiny_model(), loader, LAYERS, store=store),
                    [DirWatch(target), DirWatch(store)])
    add("extract/fresh-store-dir-holding-symlink", "extract", "raise", ("z0", "z0.npy", "symlink", "store"),
        build_symlink_store, mode="word", note="issue 9 item 4: a planted z0.npy -> file is overwritten")

    def build_store_is_file(ctx):
        path = os.path.join(ctx.dir, "a_file")
        with open(path, "w") as f:
            f.write("x")
        ds = torch.utils.data.TensorDataset(torch.randn(10, 12), torch.randint(0, 5, (10,)))
        loader = torch.utils.data.DataLoader(ds, batch_size=4)
        return Call(lambda: pyfk.extract(tiny_model(), loader, LAYERS, store=path), [DirWatch(path)])
    add("extract/store-path-is-a-file", "extract", "raise", ("store",), build_store_is_file, note=D7)

    oks = {
        "pseudo-true": dict(pseudo_label="true", oracle_pseudo="true"),
        "argmax": dict(oracle_pseudo="argmax"),
        "ids-in-batches": dict(batches=tiny_batches(with_ids=True), pseudo_label="true", oracle_pseudo="true"),
        "labels-2d-column": dict(batches=[(x, y[:, None]) for x, y in tiny_batches()], pseudo_label="true",
                                 oracle_pseudo="true"),
        "inputs-requires-grad": dict(batches=[(x.clone().requires_grad_(True), y) for x, y in tiny_batches()],
                                     pseudo_label="true", oracle_pseudo="true"),
        "model-params-frozen": dict(model=tiny_model().requires_grad_(False), pseudo_label="true",
                                    oracle_pseudo="true"),
        "float64-dtype": dict(dtype="float64", pseudo_label="true", oracle_pseudo="true"),
    }
    for label, kw in oks.items():
        def build(ctx, kw=kw):
            kw = dict(kw)
            return extract_call(**kw)
        add(f"extract/ok-{label}", "extract", "ok", (), build)


# ----------------------------------------------------------------------------- DescriptorStore.open

STORE_N = 6


def make_store(path, n=STORE_N, widths=(4, 3), dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for j, w in enumerate(widths):
        arrays[f"z{j}"] = ((w,), dtype)
        arrays[f"g{j}"] = ((w,), dtype)
    st = DescriptorStore.create(path, n, arrays)
    batch = {name: rng.standard_normal((n, *tail)).astype(dt) for name, (tail, dt) in arrays.items()}
    st.write(0, batch)
    st.commit(n)
    st.close()
    return batch


def read_manifest(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def write_manifest(path, m, raw=None):
    with open(os.path.join(path, "manifest.json"), "wb" if isinstance(raw, bytes) else "w") as f:
        f.write(raw if raw is not None else json.dumps(m))


def npy_bytes(header: dict | str, body: bytes = b"", version=(1, 0)) -> bytes:
    text = header if isinstance(header, str) else repr(header)
    text += " " * ((64 - (len(text) + 11) % 64) % 64) + "\n"
    if version == (1, 0):
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1") + body
    return b"\x93NUMPY" + bytes(version) + struct.pack("<I", len(text)) + text.encode("utf8") + body


def _manifest_mutations():
    def setkey(*path_value):
        *path, value = path_value

        def f(m):
            d = m
            for p in path[:-1]:
                d = d[p]
            d[path[-1]] = value
        return f

    def delkey(*path):
        def f(m):
            d = m
            for p in path[:-1]:
                d = d[p]
            del d[path[-1]]
        return f

    return {
        "missing-arrays-key": (delkey("arrays"), ("manifest",)),
        "missing-n": (delkey("n"), ("manifest",)),
        "format-other": (setkey("format", "npz-store"), ("manifest", "format")),
        "version-2": (setkey("version", 2), ("manifest", "version")),
        "version-str": (setkey("version", "1"), ("manifest", "version")),
        "version-true": (setkey("version", True), ("manifest", "version")),
        "n-negative": (setkey("n", -1), ("manifest", "n")),
        "n-float": (setkey("n", 6.0), ("manifest", "n")),
        "n-str": (setkey("n", "6"), ("manifest", "n")),
        "n-1e30": (setkey("n", 1e30), ("manifest", "n")),
        "rows_done-above-n": (setkey("rows_done", 7), ("manifest", "rows_done")),
        "rows_done-negative": (setkey("rows_done", -1), ("manifest", "rows_done")),
        "complete-str": (setkey("complete", "yes"), ("manifest", "complete")),
        "complete-true-rows-short": (lambda m: m.update(complete=True, rows_done=3), ("manifest", "complete")),
        "arrays-empty": (setkey("arrays", {}), ("manifest", "arrays")),
        "arrays-list": (setkey("arrays", []), ("manifest", "arrays")),
        "meta-list": (setkey("meta", []), ("manifest", "meta")),
        "name-dotdot": (lambda m: m["arrays"].update({"../x": m["arrays"].pop("g1")}), ("manifest", "../x")),
        "name-empty": (lambda m: m["arrays"].update({"": m["arrays"].pop("g1")}), ("manifest",)),
        "spec-missing-dtype": (delkey("arrays", "z0", "dtype"), ("z0",)),
        "spec-str": (setkey("arrays", "z0", "z0.npy"), ("z0",)),
        "file-escapes-dotdot": (setkey("arrays", "z0", "file", "../outside.npy"), ("z0",)),
        "file-absolute": (lambda m: None, ("z0",)),  # filled in by the builder (needs the path)
        "file-subdir": (setkey("arrays", "z0", "file", "sub/z0.npy"), ("z0",)),
        "file-manifest": (setkey("arrays", "z0", "file", "manifest.json"), ("z0",)),
        "file-empty": (setkey("arrays", "z0", "file", ""), ("z0",)),
        "file-int": (setkey("arrays", "z0", "file", 5), ("z0",)),
        "file-dot": (setkey("arrays", "z0", "file", "."), ("z0",)),
        "file-nul": (setkey("arrays", "z0", "file", "z0.npy\x00.txt"), ("z0",)),
        "shape-empty": (setkey("arrays", "z0", "shape", []), ("z0",)),
        "shape-negative": (setkey("arrays", "z0", "shape", [STORE_N, -1]), ("z0",)),
        "shape-float": (setkey("arrays", "z0", "shape", [STORE_N, 4.0]), ("z0",)),
        "shape-first-not-n": (setkey("arrays", "z0", "shape", [STORE_N + 1, 4]), ("z0",)),
        "shape-str": (setkey("arrays", "z0", "shape", "6,4"), ("z0",)),
        "dtype-object": (setkey("arrays", "z0", "dtype", "object"), ("z0",)),
        "dtype-complex": (setkey("arrays", "z0", "dtype", "complex64"), ("z0",)),
        "dtype-unicode": (setkey("arrays", "z0", "dtype", "<U3"), ("z0",)),
        "dtype-big-endian": (setkey("arrays", "z0", "dtype", ">f2"), ("z0",)),
        "dtype-unknown": (setkey("arrays", "z0", "dtype", "float17"), ("z0",)),
        "dtype-int-json": (setkey("arrays", "z0", "dtype", 5), ("z0",)),
        "dtype-float32-file-float16": (setkey("arrays", "z0", "dtype", "float32"), ("z0",)),
        "shape-width-differs-from-file": (setkey("arrays", "z0", "shape", [STORE_N, 5]), ("z0",)),
        "two-entries-share-a-file": (setkey("arrays", "g0", "file", "z0.npy"), ("g0", "z0", "z0.npy")),
        "g1-dropped-from-manifest": (delkey("arrays", "g1"), ("g1",)),
    }


def _store_cases():
    def store_open(ctx, mutate_dir, mode="r"):
        path = os.path.join(ctx.dir, "store")
        make_store(path)
        mutate_dir(path)
        return Call(lambda: DescriptorStore.open(path, mode), [DirWatch(ctx.dir)])

    notes = {"two-entries-share-a-file": "issue 9 item 8: a manifest whose arrays share a file",
             "g1-dropped-from-manifest": "issue 9 item 8: an array dropped from the manifest (scales z1 and g0 "
                                         "remain: the descriptors would silently lose a scale's gradients)"}
    for label, (mutate, names) in _manifest_mutations().items():
        def build(ctx, mutate=mutate, label=label):
            def mut(path):
                m = read_manifest(path)
                if label == "file-absolute":
                    m["arrays"]["z0"]["file"] = os.path.join(path, "z0.npy")
                else:
                    mutate(m)
                write_manifest(path, m)
            if label == "file-escapes-dotdot":
                np.save(os.path.join(ctx.dir, "outside.npy"), np.zeros((STORE_N, 4), np.float16))
            if label == "file-subdir":
                inner = mut

                def mut(path):  # noqa: F811  (the subdirectory holds a valid copy of z0.npy)
                    os.makedirs(os.path.join(path, "sub"))
                    np.save(os.path.join(path, "sub", "z0.npy"), np.load(os.path.join(path, "z0.npy")))
                    inner(path)
            return store_open(ctx, mut)
        add(f"DescriptorStore.open/manifest-{label}", "DescriptorStore.open", "raise", names, build, mode="word",
            note=notes.get(label, D7 + ": a store whose manifest does not match its arrays"))

    raw = {
        "not-json": b"{not json",
        "truncated-json": None,  # first half of the real manifest
        "empty-file": b"",
        "json-list": b"[]",
        "json-null": b"null",
        "non-utf8": b"\xff\xfe{\x00",
        "nan-n": None,  # the real manifest with "n": NaN
        "deeply-nested-meta": None,  # meta nested 100000 deep: json's recursion limit
        "huge-int-n": None,  # n: 10**5000 digits
    }
    for label, content in raw.items():
        def build(ctx, label=label, content=content):
            def mut(path):
                text = json.dumps(read_manifest(path))
                body = content
                if label == "truncated-json":
                    body = text[:len(text) // 2].encode()
                elif label == "nan-n":
                    body = text.replace(f'"n": {STORE_N}', '"n": NaN').encode()
                elif label == "deeply-nested-meta":
                    body = text.replace('"meta": {}', '"meta": ' + "[" * 100000 + "]" * 100000).encode()
                elif label == "huge-int-n":
                    body = text.replace(f'"n": {STORE_N}', '"n": 1' + "0" * 5000).encode()
                write_manifest(path, None, raw=body)
            return store_open(ctx, mut)
        add(f"DescriptorStore.open/manifest-raw-{label}", "DescriptorStore.open", "raise", ("manifest",), build,
            mode="word", note=D7)

    def files(label):
        def mut(path):
            z0 = os.path.join(path, "z0.npy")
            data0 = np.load(z0)
            size = os.path.getsize(z0)
            if label == "missing":
                os.remove(z0)
            elif label == "truncated-data":
                with open(z0, "r+b") as f:
                    f.truncate(size - 3)
            elif label == "truncated-header":
                with open(z0, "r+b") as f:
                    f.truncate(20)
            elif label == "empty":
                open(z0, "wb").close()
            elif label == "garbage":
                with open(z0, "wb") as f:
                    f.write(os.urandom(size))
            elif label == "fortran":
                with open(z0, "wb") as f:
                    f.write(npy_bytes({"descr": "<f2", "fortran_order": True, "shape": (STORE_N, 4)},
                                      data0.tobytes(order="F")))
            elif label == "header-version-3":
                with open(z0, "wb") as f:
                    f.write(npy_bytes({"descr": "<f2", "fortran_order": False, "shape": (STORE_N, 4)},
                                      data0.tobytes(), version=(3, 0)))
            elif label == "header-object-dtype":
                with open(z0, "wb") as f:
                    f.write(npy_bytes({"descr": "|O", "fortran_order": False, "shape": (STORE_N, 4)}, b"\0" * 200))
            elif label == "header-code":
                marker = os.path.join(os.path.dirname(path), "PWNED")
                with open(z0, "wb") as f:
                    f.write(npy_bytes("{'descr': '<f2', 'fortran_order': False, 'shape': (6, 4), "
                                      f"'x': __import__('os').system('touch {marker}')}}", data0.tobytes()))
            elif label == "header-shape-overflow":
                m = read_manifest(path)
                big = 2**62
                m["n"] = big
                m["rows_done"] = big
                for spec in m["arrays"].values():
                    spec["shape"][0] = big
                write_manifest(path, m)
                for spec in m["arrays"].values():
                    with open(os.path.join(path, spec["file"]), "wb") as f:
                        f.write(npy_bytes({"descr": "<f2", "fortran_order": False, "shape": tuple(spec["shape"])},
                                          b"\0" * 64))
            elif label == "header-wrong-dtype":
                with open(z0, "wb") as f:
                    f.write(npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (STORE_N, 4)},
                                      np.zeros((STORE_N, 4), np.float32).tobytes()))
            elif label == "header-big-endian":
                with open(z0, "wb") as f:
                    f.write(npy_bytes({"descr": ">f2", "fortran_order": False, "shape": (STORE_N, 4)},
                                      data0.astype(">f2").tobytes()))
            elif label == "is-a-directory":
                os.remove(z0)
                os.makedirs(z0)
            elif label == "symlink-outside":
                target = os.path.join(os.path.dirname(path), "elsewhere.npy")
                np.save(target, data0)
                os.remove(z0)
                os.symlink(target, z0)
            elif label == "symlink-inside-to-g0":
                os.remove(z0)
                os.symlink("g0.npy", z0)
            elif label == "dangling-symlink":
                os.remove(z0)
                os.symlink(os.path.join(path, "nowhere.npy"), z0)
            elif label == "manifest-symlink":
                real = os.path.join(os.path.dirname(path), "real_manifest.json")
                os.replace(os.path.join(path, "manifest.json"), real)
                os.symlink(real, os.path.join(path, "manifest.json"))
            elif label == "header-unbalanced-bracket":
                with open(z0, "r+b") as f:
                    f.seek(11)
                    f.write(b"[")
            elif label == "fifo":
                os.remove(z0)
                os.mkfifo(z0)
            else:
                raise AssertionError(label)
        return mut

    file_labels = {
        "missing": D7, "truncated-data": D7, "truncated-header": D7, "empty": D7, "garbage": D7, "fortran": D7,
        "header-version-3": D7, "header-object-dtype": D7 + ": never unpickle", "header-code": D7 + ": never "
        "execute code from a data file", "header-shape-overflow": D7 + ": a header whose size overflows int64",
        "header-wrong-dtype": D7, "header-big-endian": D7, "is-a-directory": D7,
        "symlink-outside": "issue 9 item 4: symlinks in a store are followed",
        "symlink-inside-to-g0": "issue 9 item 4 (and item 8: two arrays on one file)",
        "dangling-symlink": "issue 9 item 4", "manifest-symlink": "issue 9 item 4: refuse store files that are "
        "symlinks", "fifo": D7, "header-unbalanced-bracket": D7 + " (found by prop_store_corruption)",
    }
    for label, note in file_labels.items():
        names = ("manifest", "manifest.json", "symlink") if label == "manifest-symlink" else ("z0", "z0.npy")

        def build(ctx, label=label):
            call = store_open(ctx, files(label))
            if label == "header-code":
                marker = os.path.join(ctx.dir, "PWNED")
                inner = call.fn

                def fn():
                    try:
                        return inner()
                    finally:
                        assert not os.path.exists(marker), "the .npy header executed code"
                call.fn = fn
            return call
        add(f"DescriptorStore.open/file-{label}", "DescriptorStore.open", "raise", names, build, mode="word",
            note=note)

    def doc_fnf(label, make_path):
        def build(ctx):
            path = make_path(ctx)
            return Call(lambda: DescriptorStore.open(path), [DirWatch(ctx.dir)])
        add(f"DescriptorStore.open/{label}", "DescriptorStore.open", "raise", ("manifest", "store", "path"), build,
            mode="word", exc=VE_TE + (FileNotFoundError,),
            note="the docstring documents FileNotFoundError for a directory without a manifest")

    doc_fnf("no-manifest", lambda ctx: (os.makedirs(os.path.join(ctx.dir, "s")), os.path.join(ctx.dir, "s"))[1])
    doc_fnf("path-missing", lambda ctx: os.path.join(ctx.dir, "nothing_here"))
    doc_fnf("path-is-a-file", lambda ctx: (open(os.path.join(ctx.dir, "f"), "w").close(),
                                           os.path.join(ctx.dir, "f"))[1])

    def build_manifest_dir(ctx):
        path = os.path.join(ctx.dir, "store")
        make_store(path)
        os.remove(os.path.join(path, "manifest.json"))
        os.makedirs(os.path.join(path, "manifest.json"))
        return Call(lambda: DescriptorStore.open(path), [DirWatch(ctx.dir)])
    add("DescriptorStore.open/manifest-is-a-directory", "DescriptorStore.open", "raise", ("manifest",),
        build_manifest_dir, mode="word", exc=VE_TE + (FileNotFoundError,))
    for label, arg in {"path-None": None, "path-int": 5, "path-list": ["store"]}.items():
        def build(ctx, arg=arg):
            return Call(lambda: DescriptorStore.open(arg), [arg])
        add(f"DescriptorStore.open/{label}", "DescriptorStore.open", "raise", ("path",), build, note=D7)
    for label, mode in {"mode-w": "w", "mode-None": None, "mode-rb": "rb"}.items():
        def build(ctx, mode=mode):
            path = os.path.join(ctx.dir, "store")
            make_store(path)
            return Call(lambda: DescriptorStore.open(path, mode), [DirWatch(ctx.dir)])
        add(f"DescriptorStore.open/{label}", "DescriptorStore.open", "raise", ("mode",), build, note=D7)

    # stores fed to topk: the oracle on the memmaps, or a clear error naming pool
    def store_topk(ctx, mutate=None, rows_done=None, dtype="float16"):
        path = os.path.join(ctx.dir, "store")
        batch = make_store(path, n=12, dtype=dtype)
        if mutate is not None:
            mutate(path, batch)
        if rows_done is not None:
            m = read_manifest(path)
            m.update(rows_done=rows_done, complete=rows_done == 12)
            write_manifest(path, m)
        rng = np.random.default_rng(5)
        qz, qg = make_arrays(rng, 3, (4, 3))
        count = 12 if rows_done is None else rows_done
        pz = [batch["z0"][:count], batch["z1"][:count]]
        pg = [batch["g0"][:count], batch["g1"][:count]]
        k = max(1, min(3, count))

        def fn():
            return pyfk.topk(pyfk.Descriptors(qz, qg), DescriptorStore.open(path), k=k)
        return Call(fn, [qz, qg, DirWatch(ctx.dir)], oracle_topk(qz, qg, pz, pg, k=k))

    def nan_in_store(path, batch):
        mm = np.load(os.path.join(path, "g1.npy"), mmap_mode="r+")
        mm[4, 1] = np.nan
        mm.flush()
        del mm

    def int_g(path, batch):
        m = read_manifest(path)
        m["arrays"]["g0"]["dtype"] = "int16"
        write_manifest(path, m)
        np.save(os.path.join(path, "g0.npy"), np.zeros((12, 4), np.int16))

    add("topk/store-ok-float16", "topk", "ok", (), lambda ctx: store_topk(ctx))
    add("topk/store-ok-float32", "topk", "ok", (), lambda ctx: store_topk(ctx, dtype="float32"))
    add("topk/store-ok-partial-rows", "topk", "ok", (), lambda ctx: store_topk(ctx, rows_done=5))
    add("topk/store-nan", "topk", "raise", ("pool",), lambda ctx: store_topk(ctx, nan_in_store), note=D7)
    add("topk/store-zero-rows-done", "topk", "raise", ("pool",), lambda ctx: store_topk(ctx, rows_done=0),
        note=D7 + ": empty pool")
    add("topk/store-int-gradients", "topk", "raise", ("pool", "g0", "descriptors"),
        lambda ctx: store_topk(ctx, int_g), mode="word", note=D7)


# ----------------------------------------------------------------------------- build the registry

for _fn in (_desc_dtype_cases, _desc_structure_cases, _topk_k_cases, _topk_string_cases, _topk_option_cases,
            _index_cases, _value_cases, _stride_cases, _torch_cases, _masked_cases, _mismatch_cases,
            _similarity_cases, _select_cases, _acquire_cases, _extract_cases, _store_cases):
    _fn()
