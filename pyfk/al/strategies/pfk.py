"""The PFK family: pcc, pfk, pfk_sum -- pyfk.engine.search.select as a strategy.

Each needs pool.descriptors and a ValInputs (validation descriptors with gradients
w.r.t. the true labels, labels, predictions) and runs the PFK acquisition
(DESIGN.md section 1) with

  pcc      combine="features"  R = sum_j  z_j.z_j'
  pfk      combine="product"   R = sum_j (z_j.z_j') * (g_j.g_j')
  pfk_sum  combine="sum"       R = sum_j  z_j.z_j' + g_j.g_j'

on per-example, per-scale normalised rows (params: k=None (32, or the unlabeled pool if smaller), normalize="pcc",
use_all=False; the labeled rows are excluded from the search). Score = R between
the pick and the validation centre that pulled it in (float32 from the kernel).
Provenance per pick, in pick order: "centre" (validation row), "rank" (0-based),
"score", "scale_terms" (budget, S) -- the per-scale terms of R(centre, pick)
(Layout.scale_terms, recomputed in float64; their row sum is the score up to
float32 rounding) -- and "scale_share" (each row divided by its sum; None where the
sum is 0); plus "centres" (every centre) and "k_final" (k after any doubling).
"""

from __future__ import annotations

import numpy as np

from pyfk.al.strategies.base import register
from pyfk.engine.descriptors import NORMALIZES, Descriptors, as_descriptors, normalized_block
from pyfk.engine.layout import Layout
from pyfk.engine.search import select as pfk_select
from pyfk.errors import check_choice

PFK_PARAMS = {"k": None, "normalize": "pcc", "use_all": False}  # k=None: 32, or the pool if smaller


def _pfk_family(pool, req, combine, k, normalize, use_all):
    check_choice(normalize, "normalize", NORMALIZES)
    val = req.val
    details = pfk_select(pool.descriptors, val.descriptors, req.budget, val.labels, val.pred, k=k,
                         combine=combine, normalize=normalize, seed=req.seed,
                         exclude=req.excluded if len(req.excluded) else None, backend=req.backend,
                         use_all=use_all, return_details=True, progress=req.progress)
    idx = np.asarray(details["indices"], dtype=np.int64)
    centre = np.asarray(details["centre"], dtype=np.int64)
    terms = _scale_terms(as_descriptors(pool.descriptors, "pool.descriptors"),
                         as_descriptors(val.descriptors, "val.descriptors"),
                         idx, centre, combine, normalize)
    return pfk_result(details, combine, terms)


def pfk_result(details: dict, combine: str, terms: np.ndarray) -> tuple:
    """(indices, scores, extras) of a PFK-family strategy from `select(..., return_details=True)`
    and the (budget, S) per-scale terms of R(centre, pick) (`_scale_terms`)."""
    idx = np.asarray(details["indices"], dtype=np.int64)
    centre = np.asarray(details["centre"], dtype=np.int64)
    score = np.asarray(details["score"], dtype=np.float64)
    total = terms.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = terms / total[:, None]
    share_list = [None if t == 0 else row for t, row in zip(total.tolist(), share.tolist())]
    extras = {"combine": combine, "k_final": int(details["k"]), "centres": details["centres"],
              "centre": centre, "rank": details["rank"], "score": score,
              "scale_terms": terms, "scale_share": share_list}
    return idx, score, extras


def _scale_terms(pool: Descriptors, val: Descriptors, idx, centre, combine, normalize) -> np.ndarray:
    """(budget, S) float64 per-scale terms of R(centre, pick) (Layout.scale_terms) from normalised rows."""
    def rows_of(desc, which):
        uniq, inv = np.unique(which, return_inverse=True)
        parts, layout = Layout.of(desc, combine)
        return normalized_block(parts, uniq, normalize).double().cpu().numpy()[inv], layout

    p, layout = rows_of(pool, idx)
    v, _ = rows_of(val, centre)
    return layout.scale_terms(p, v)


@register("pcc", needs="descriptors", val=True, params=PFK_PARAMS)
def _pcc(pool, req, **params):
    return _pfk_family(pool, req, "features", **params)


@register("pfk", needs="descriptors", val=True, params=PFK_PARAMS)
def _pfk(pool, req, **params):
    return _pfk_family(pool, req, "product", **params)


@register("pfk_sum", needs="descriptors", val=True, params=PFK_PARAMS)
def _pfk_sum(pool, req, **params):
    return _pfk_family(pool, req, "sum", **params)
