"""pyfk.distributed.audit on 1, 2 and 3 local gloo ranks: every rank's Audit equals -- every field,
floats bit for bit -- pyfk.audit on the concatenated labeled rows in one process; bad input on
one rank raises the same clear error on every rank, at once.

Spawning ranks is the cost (~3 s each), so each world size runs every case in one run_ranks
call: the ranks build the same seeded data (clustered descriptors with injected label flips),
each takes its contiguous shard, and the Audits come back to the parent, which computes the
single-process reference.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from harness import checked_cases, descriptors_of, run_ranks

import pyfk
from pyfk.distributed.audit import audit as sharded_audit  # robust to the package re-exporting `audit`

WIDTHS = [8, 5]
C = 3
FIELDS = ("indices", "scores", "given", "suggested", "flagged", "q", "neighbours", "neighbour_scores", "_labels")


# ----------------------------------------------------------------------------- data

def _problem(rng, n, *, widths=WIDTHS, classes=C, integer=False, distinct=None, g=True, flip=0.2, dup_probs=0):
    """Descriptors drawn around per-class centres, labels with ~`flip` of them changed to another
    class, and a noisy model's probabilities (float64 rows summing to 1). integer/distinct: small
    integer rows drawn from `distinct` distinct ones (exact ties, duplicates across shards);
    dup_probs: that many rows get the probabilities and label of row 0 (tied self-confidences)."""
    truth = rng.integers(0, classes, n)

    def arrays():
        if integer:
            rows = n if distinct is None else distinct
            out = [rng.integers(-2, 3, size=(rows, L)).astype(np.float32) for L in widths]
            if distinct is not None:
                pick = rng.integers(0, distinct, n)
                out = [a[pick] for a in out]
            return out
        return [(2.0 * rng.standard_normal((classes, L))[truth] + rng.standard_normal((n, L))).astype(np.float32)
                for L in widths]

    z, gg = arrays(), (arrays() if g else None)
    flipped = rng.random(n) < flip
    labels = np.where(flipped, (truth + rng.integers(1, classes, n)) % classes, truth).astype(np.int64)
    logits = 2.0 * np.eye(classes)[truth] + rng.standard_normal((n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if dup_probs:
        rows = rng.choice(np.arange(1, n), dup_probs, replace=False)
        probs[rows], labels[rows] = probs[0], labels[0]
    return dict(z=z, g=gg, labels=labels, probs=probs)


def _descriptors(data, rows=slice(None), kind="numpy", dtype=None):
    return descriptors_of(data["z"], data["g"], rows, kind, dtype)


def _case(name, data, sizes, *, with_probs=True, kind="numpy", dtype=None, per_rank=None, error=None, **kwargs):
    assert sum(sizes) == len(data["labels"]), name
    return dict(name=name, data=data, sizes=sizes, with_probs=with_probs, kind=kind, dtype=dtype, per_rank=per_rank,
                error=error, kwargs=kwargs)


def _cases(seed, world):
    """Every case for `world` ranks, from `seed` (the same in the parent and every rank)."""
    rng = np.random.default_rng(seed)

    def sizes(one, two, three):
        return {1: one, 2: two, 3: three}[world]

    cases = []
    if world > 1:  # --- errors first: the group must stay usable after each
        last = world - 1
        d = _problem(rng, 20)
        sz = sizes(None, (12, 8), (7, 5, 8))

        def on_rank(r, **changes):
            def change(rank, kw):
                return {**kw, **changes} if rank == r else kw
            return change

        def k_differs(rank, kw):
            return {**kw, "k": 3 + rank}

        def label_out_of_range(rank, kw):
            if rank == last:
                kw["local_labels"] = kw["local_labels"].copy()
                kw["local_labels"][1] = C
            return kw

        def nan_on_rank1(rank, kw):
            if rank == 1:
                desc = kw["local_descriptors"]
                desc.z[0] = desc.z[0].copy()
                desc.z[0][2, 1] = np.nan
            return kw

        def probs_wider_on_rank0(rank, kw):
            if rank == 0:
                kw["probs"] = np.c_[kw["probs"], np.zeros(len(kw["probs"]))]
            return kw

        def widths_on_rank1(rank, kw):
            if rank == 1:
                kw["local_descriptors"] = _descriptors(_problem(np.random.default_rng(0), sz[1], widths=[8, 6]))
            return kw

        prefix = {r: re.escape(f"rank {r} of {world}: ") for r in range(world)}
        cases += [
            _case("err alpha on rank 1", d, sz, k=3, per_rank=on_rank(1, alpha=1.5),
                  error=(ValueError, "^" + prefix[1] + re.escape("alpha: expected a weight in [0, 1], got 1.5") + "$")),
            _case("err k differs", d, sz, k=3, per_rank=k_differs,
                  error=(ValueError, r"^k: expected the same on every rank, got 3 on rank 0 and 4 on rank 1$")),
            _case("err alpha differs", d, sz, k=3, per_rank=on_rank(1, alpha=0.25),
                  error=(ValueError, r"^alpha: expected the same on every rank, got 0.5 on rank 0 and 0.25 on "
                                     r"rank 1$")),
            _case("err classes differ", d, sz, k=3, with_probs=False, per_rank=on_rank(last, classes=4),
                  error=(ValueError, rf"^classes: expected the same on every rank, got None on rank 0 and 4 on rank "
                                     rf"{last}$")),
            _case("err combine differs", d, sz, k=3, per_rank=on_rank(1, combine="product"),
                  error=(ValueError, r"^combine: expected the same on every rank, got features on rank 0 and product "
                                     r"on rank 1$")),
            _case("err label out of range on the last rank", d, sz, k=3, classes=C, per_rank=label_out_of_range,
                  error=(ValueError, "^" + prefix[last] + re.escape(f"local_labels: expected classes in [0, {C}), got "
                                                                    f"range [") + r"\d, 3\]$")),
            _case("err NaN on rank 1", d, sz, k=3, per_rank=nan_on_rank1,
                  error=(ValueError, "^" + prefix[1] + re.escape(f"local_descriptors: z[0] contains NaN or Inf values "
                                                                 f"(first at global row {sz[0] + 2}, local row 2)")
                         + "$")),
            _case("err probs wider on rank 0", d, sz, k=3, per_rank=probs_wider_on_rank0,
                  error=(ValueError, r"^probs: expected the same on every rank, got 4 columns on rank 0 and 3 columns "
                                     r"on rank 1$")),
            _case("err probs on some ranks only", d, sz, k=3, per_rank=on_rank(0, probs=None),
                  error=(ValueError, r"^probs: expected the same on every rank, got None on rank 0 and 3 columns on "
                                     r"rank 1$")),
            _case("err widths differ", d, sz, k=3, per_rank=widths_on_rank1,
                  error=(ValueError, r"^local_descriptors: expected the same on every rank, got widths \[8, 5\], "
                                     r"dtypes .* on rank 0 and widths \[8, 6\], dtypes .* on rank 1$")),
            _case("err query_block 0 everywhere", d, sz, k=3, query_block=0,
                  error=(ValueError, "^" + prefix[0] + r"query_block: expected an integer in \[1, \d+\], got 0$")),
            _case("err product without g", _problem(rng, 20, g=False), sz, k=3, combine="product",
                  error=(ValueError, "^" + prefix[0] + re.escape("local_descriptors: combine='product' needs gradients "
                                                                 "g, but local_descriptors.g is None"))),
            _case("err one labeled row", _problem(rng, 1), sizes(None, (0, 1), (0, 1, 0)), k=3,
                  error=(ValueError, r"^local_descriptors: expected at least 2 labeled rows over all ranks .*got 1$")),
        ]

    # --- equality with one process
    cases += [
        _case("features, no probs, unequal shards", _problem(rng, 23), sizes((23,), (15, 8), (4, 12, 7)),
              with_probs=False, k=5),
        _case("product, probs, an empty shard", _problem(rng, 26), sizes((26,), (0, 26), (10, 0, 16)), k=6,
              combine="product", alpha=0.3),
        _case("sum, k larger than every shard, query_block < shard", _problem(rng, 21),
              sizes((21,), (11, 10), (7, 7, 7)), k=12, combine="sum", query_block=4),
        _case("k >= n - 1, no probs", _problem(rng, 9), sizes((9,), (4, 5), (3, 3, 3)), with_probs=False, k=50),
        _case("k = n - 1, probs, query_block 1", _problem(rng, 8), sizes((8,), (5, 3), (2, 1, 5)), k=7,
              query_block=1, alpha=0.8),
        _case("exact ties, self pushed out", _problem(rng, 24, integer=True, distinct=4),
              sizes((24,), (13, 11), (9, 6, 9)), k=2, normalize="pcc"),
        _case("exact ties, normalize none, product", _problem(rng, 30, integer=True, distinct=7),
              sizes((30,), (17, 13), (10, 10, 10)), k=6, combine="product", normalize="none", alpha=0.5),
        _case("alpha 0: tied self-confidences across shards", _problem(rng, 22, dup_probs=6),
              sizes((22,), (11, 11), (8, 0, 14)), k=4, alpha=0.0),
        _case("classes beyond the labels, l2", _problem(rng, 19), sizes((19,), (9, 10), (9, 5, 5)), with_probs=False,
              k=3, classes=5, normalize="l2"),
        _case("n > MIN_QUERIES: a 2-row shard, blocks padded and not", _problem(rng, 70),
              sizes((70,), (2, 68), (40, 2, 28)), k=8, combine="product"),
        _case("n > MIN_QUERIES, query_block 5", _problem(rng, 45), sizes((45,), (20, 25), (15, 15, 15)), k=5,
              query_block=5, alpha=0.6),
        _case("fp16 descriptors", _problem(rng, 20), sizes((20,), (6, 14), (6, 8, 6)), dtype=np.float16, k=5,
              combine="product"),
        _case("torch bf16 descriptors", _problem(rng, 20), sizes((20,), (14, 6), (1, 12, 7)), kind="torch",
              dtype=torch.bfloat16, k=5, combine="sum"),
    ]
    return cases


# ----------------------------------------------------------------------------- ranks

def _call_args(case, rows=slice(None)):
    data = case["data"]
    kw = dict(case["kwargs"])
    kw["local_descriptors"] = _descriptors(data, rows, case["kind"], case["dtype"])
    kw["local_labels"] = data["labels"][rows]
    kw["probs"] = data["probs"][rows] if case["with_probs"] else None
    return kw


def _fields(report: pyfk.Audit) -> dict:
    return {**{f: getattr(report, f) for f in FIELDS}, "provenance": report.provenance}


def _rank_main(rank, world, seed):
    out = []
    for case in _cases(seed, world):
        offsets = np.r_[0, np.cumsum(case["sizes"])]
        kw = _call_args(case, slice(int(offsets[rank]), int(offsets[rank + 1])))
        if case["per_rank"] is not None:
            kw = case["per_rank"](rank, kw)
        t0 = time.perf_counter()
        try:
            report = sharded_audit(kw.pop("local_descriptors"), kw.pop("local_labels"), **kw)
        except (ValueError, TypeError) as exc:
            out.append(("error", type(exc).__name__, str(exc), time.perf_counter() - t0))
            continue
        out.append(("audit", type(report).__name__, _fields(report)))
    return out


# ----------------------------------------------------------------------------- parent

def _reference(case) -> dict:
    kw = _call_args(case)
    kw.pop("query_block", None)  # the distributed call's own
    return _fields(pyfk.audit(kw.pop("local_descriptors"), kw.pop("local_labels"), **kw))


def _assert_same(got: dict, ref: dict, name):
    for f in FIELDS:
        a, b = got[f], ref[f]
        assert a.dtype == b.dtype and a.shape == b.shape, (name, f, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), (name, f, a, b)  # bit for bit
    gp, rp = got["provenance"], ref["provenance"]
    assert list(gp) == list(rp), (name, list(gp), list(rp))
    for key, value in rp.items():
        if isinstance(value, np.ndarray):
            assert gp[key].dtype == value.dtype and np.array_equal(gp[key], value), (name, key, gp[key], value)
        else:
            assert type(gp[key]) is type(value) and gp[key] == value, (name, key, gp[key], value)


def _check(world, seed, results):
    cases = _cases(seed, world)
    assert all(len(r) == len(cases) for r in results)
    for case, per_rank in checked_cases(cases, results):
        name = case["name"]
        ref = _reference(case)
        for rank, res in enumerate(per_rank):
            assert res[0] == "audit" and res[1] == "Audit", (name, rank, res)
            _assert_same(res[2], ref, f"{name} (rank {rank})")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_audit_equals_one_process(world, rng):
    seed = int(rng.integers(2**31))
    _check(world, seed, run_ranks(_rank_main, world, (seed,), timeout=150))


def test_one_rank_group_is_pyfk_audit(rng):
    """A process group of one rank: pyfk.audit itself."""
    seed = int(rng.integers(2**31))
    _check(1, seed, run_ranks(_rank_main, 1, (seed,), timeout=150))


def test_cases_cover_what_they_claim(rng):
    """Flips are found, self really falls out of its list under ties, k exceeds every shard,
    and self-confidences tie across shards."""
    seed = int(rng.integers(2**31))
    cases = {c["name"]: c for c in _cases(seed, 3)}
    ref = _reference(cases["features, no probs, unequal shards"])
    assert ref["flagged"].any() and not ref["flagged"].all()
    c = cases["exact ties, self pushed out"]
    ref = _reference(c)
    kw = _call_args(c)
    desc = kw["local_descriptors"]
    _, index = pyfk.topk(desc, desc, ref["provenance"]["k"] + 1, "features", "pcc")
    assert not (index == np.arange(desc.n)[:, None]).any(1).all()  # a row absent from its own list
    c = cases["sum, k larger than every shard, query_block < shard"]
    assert c["kwargs"]["k"] > max(c["sizes"]) and c["kwargs"]["query_block"] < max(c["sizes"])
    c = cases["alpha 0: tied self-confidences across shards"]
    ref = _reference(c)
    bounds = np.cumsum(c["sizes"])[:-1]
    shard = np.searchsorted(bounds, ref["indices"], side="right")
    tied = (np.diff(ref["scores"]) == 0) & (np.diff(shard) != 0)
    assert tied.any()


def test_single_process_fallback(rng):
    """Without a process group it is pyfk.audit (query_block is still checked)."""
    assert not torch.distributed.is_initialized()
    data = _problem(rng, 25)
    desc = _descriptors(data)
    for kw in ({"k": 4}, {"k": 30, "probs": data["probs"], "alpha": 0.7, "combine": "product", "query_block": 3}):
        got = sharded_audit(desc, data["labels"], **kw)
        kw.pop("query_block", None)
        _assert_same(_fields(got), _fields(pyfk.audit(desc, data["labels"], **kw)), str(kw))
    with pytest.raises(ValueError, match=r"^alpha: expected a weight in \[0, 1\], got 2$"):
        sharded_audit(desc, data["labels"], alpha=2)
    with pytest.raises(TypeError, match=r"^query_block: expected an integer, got float 2.0$"):
        sharded_audit(desc, data["labels"], query_block=2.0)
