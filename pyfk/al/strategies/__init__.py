"""Acquisition strategies: one registry, one signature (DESIGN.md section 4).

    sel = select("entropy", PoolInputs(probs=P), budget=100, labeled=L, seed=0)
    sel.indices, sel.scores, sel.provenance
    STRATEGIES["bald"].needs   # Needs(pool=('mc_probs',), passes='mc_dropout', val=False)

Every strategy reads a `PoolInputs` (softmax probabilities, MC/ensemble
probabilities, PFK descriptors, BADGE factors or a coreset embedding; the
descriptor fields may be memory-mapped `DescriptorStore`s) and returns `budget`
distinct pool indices that are not in `labeled`, in pick order, with one float64
acquisition value per pick and a JSON-serialisable provenance.

    base         PoolInputs / ValInputs / Selection / Request, Needs, register, select
    uncertainty  random, entropy, margin, least_confidence; MC-dropout var_ratio, bald, std;
                 ensemble_entropy, ensemble_var_ratio, ensemble_bald
    diversity    coreset (greedy k-centre), badge (k-means++ on the BADGE factors)
    pfk          pcc, pfk, pfk_sum (pyfk.engine.search.select)

Each family module gives its score formulas. What a strategy reads is declared when it
registers (`Needs`: the PoolInputs fields, how mc_probs are made, whether it reads a
ValInputs); `select` checks it and the AL runner computes exactly that.
"""

from pyfk.al.strategies.base import (
    PASSES,
    POOL_FIELDS,
    STRATEGIES,
    Needs,
    PoolInputs,
    Request,
    Selection,
    Strategy,
    ValInputs,
    register,
    select,
    top_budget,
)

# The family modules register their strategies when imported; STRATEGIES keeps this order.
from pyfk.al.strategies import uncertainty, diversity, pfk  # noqa: F401  isort: skip

__all__ = ["STRATEGIES", "PASSES", "POOL_FIELDS", "Needs", "PoolInputs", "Request", "Selection", "Strategy",
           "ValInputs", "register", "select", "top_budget"]
