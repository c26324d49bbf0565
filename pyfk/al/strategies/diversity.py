"""Diversity strategies: coreset and BADGE, on the engine's one kernel distance.

Both walk kernel distances d(a, b)^2 = R(a,a) + R(b,b) - 2 R(a,b) between pool rows
through pyfk.engine.search.KernelDistances (the backend's fused similarity kernel;
the normalised pool is kept on its device when it fits, else streamed chunk by
chunk, e.g. from a DescriptorStore). d^2 is computed in float64 and clamped at 0.

  coreset  needs pool.features. Greedy k-centre (pyfk.engine.search.greedy_k_centre)
           under R on the features (combine="features", normalize="l2" by default),
           the labeled rows as the initial centres; score = the pick's min d^2 to the
           centres at pick time (the seeded random first pick when nothing is labeled:
           +inf, the min over no centres). Ties go to the smaller pool index.
  badge    needs pool.badge. k-means++ seeding on the BADGE gradient embeddings
           (p - onehot) x [h, 1] (combine="product", normalize="none": R is their exact
           inner product, never materialised). The first pick is the unlabeled row of
           largest embedding norm (ties to the smaller index) and scores its squared norm
           R(x, x); every later pick is drawn with probability proportional to its min d^2
           to the chosen centres (seeded) and scores that min d^2. When every remaining
           d^2 is 0, the smallest unpicked index is taken (counted in "zero_fallbacks").
           Labeled rows are not centres for badge: they are only never picked.
"""

from __future__ import annotations

import numpy as np

from pyfk.al.strategies.base import PoolInputs, register
from pyfk.engine.descriptors import NORMALIZES, Descriptors, as_descriptors
from pyfk.engine.search import KernelDistances, greedy_k_centre
from pyfk.errors import check_choice


def _descriptor_field(pool: PoolInputs, name: str, combine: str) -> Descriptors:
    """pool.`name` as finite Descriptors, with the gradients g that `combine` needs."""
    desc = as_descriptors(getattr(pool, name), f"pool.{name}")
    if combine != "features" and not desc.has_g:
        raise ValueError(f"pool.{name}: combine={combine!r} needs gradients g, but g is None")
    desc.check_finite(f"pool.{name}")
    return desc


@register("coreset", needs="features", params={"normalize": "l2"})
def _coreset(pool, req, normalize):
    check_choice(normalize, "normalize", NORMALIZES)
    desc = _descriptor_field(pool, "features", "features")
    dist = KernelDistances(desc, "features", normalize, req.backend)
    picked, scores = greedy_k_centre(dist, req.budget, seed=req.seed, initial=req.labeled,
                                     excluded=req.ignored if len(req.ignored) else None)
    return picked, scores, {
        "backend": dist.backend.name, "combine": "features", "initial_centres": int(len(req.labeled)),
        "random_start": int(picked[0]) if not len(req.labeled) else None}


@register("badge", needs="badge")
def _badge(pool, req):
    desc = _descriptor_field(pool, "badge", "product")
    dist = KernelDistances(desc, "product", "none", req.backend)
    rng = np.random.default_rng(req.seed)
    norms = dist.diag[req.rows]
    first = int(req.rows[int(np.argmax(norms))])  # largest embedding norm, ties to the smaller index
    picked, scores, fallbacks = [first], [float(dist.diag[first])], 0
    unavailable = np.zeros(req.n, dtype=bool)
    unavailable[req.excluded] = True
    unavailable[first] = True
    min_d2 = dist.min_d2(np.array([first])) if req.budget > 1 else np.zeros(req.n)
    while len(picked) < req.budget:
        w = np.where(unavailable, 0.0, min_d2)
        cum = np.cumsum(w)
        total = cum[-1]
        if total > 0:
            u = rng.random()
            c = int(np.searchsorted(cum, u * total, side="right"))
            if c >= req.n or w[c] <= 0:  # u * total rounded up to total
                c = int(np.flatnonzero(w > 0)[-1])
        else:  # every remaining d^2 is 0: smallest unpicked index
            c = int(np.flatnonzero(~unavailable)[0])
            fallbacks += 1
        picked.append(c)
        scores.append(float(min_d2[c]))
        unavailable[c] = True
        if len(picked) < req.budget:
            np.minimum(min_d2, dist.min_d2(np.array([c])), out=min_d2)
    extras = {"backend": dist.backend.name, "combine": "product", "normalize": "none", "zero_fallbacks": fallbacks}
    return np.array(picked, dtype=np.int64), np.array(scores), extras
