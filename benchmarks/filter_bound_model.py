#!/usr/bin/env python
"""How many candidates the triton v2 filter keeps, modelled on the CPU (no kernel, no GPU).

    python benchmarks/filter_bound_model.py [--n 100000] [--m 64] [--k 32] [--kind random|classes]

Exact float64 dots of seeded rows (the GPU suite's widths 64/128/256/512, pcc-normalised; "classes":
rows around 1,000 class centres), the buffer's rounding measured as `_triton_filter.FilterPool`
measures it, then the two ways of bounding |kernel score - float32 re-score|:
  norms only: one margin per query, every |z_j.z_j'| bounded by ||z_j|| max||z_j'|| (Cauchy-Schwarz)
              -- the first v2 kernel: keep rows with s >= (k-th sampled s) - 2 m;
  per element: `error_table`'s coefficients times the pair's own |z_j.z_j'|, |g_j.g_j'| -- the kernel
              now: keep rows whose upper bound reaches the k-th best sampled lower bound.
Prints, per buffer dtype, the bound's size and the candidates / re-scored rows per query (medians).
The float64 dots stand in for the kernel's; the bounds are the kernel's formulas.
"""

from __future__ import annotations

import argparse

import torch

from pyfk.engine.backend import PreparedPool
from pyfk.engine.descriptors import normalized_block
from pyfk.engine.kernels import _triton_filter as tf
from pyfk.engine.layout import Layout

WIDTHS = (64, 128, 256, 512)


def rows(n: int, seed: int, kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return [torch.randn(n, w, generator=gen) for w in WIDTHS for _ in (0, 1)]
    centres_gen = torch.Generator().manual_seed(1234)
    centres = [torch.randn(1000, w, generator=centres_gen) for w in WIDTHS for _ in (0, 1)]
    label = torch.randint(0, 1000, (n,), generator=gen)
    return [c[label] + torch.randn(n, c.shape[1], generator=gen) for c in centres]


def bound(table, cross, magnitudes, shape) -> torch.Tensor:
    """e per (query, row): `error_table`'s formula with |z_j.z_j'|, |g_j.g_j'| = magnitudes[2j], [2j+1]."""
    e = table[:, -1:].expand(shape).clone()
    for j in range(len(WIDTHS)):
        a, b = magnitudes[2 * j], magnitudes[2 * j + 1]
        e += a * table[:, 2 * j:2 * j + 1] + b * table[:, 2 * j + 1:2 * j + 2] + cross * a * b
    return e


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--kind", choices=("random", "classes"), default="random")
    args = ap.parse_args(argv)
    lay = Layout(tuple(w for w in WIDTHS for _ in (0, 1)), "product")
    pool = PreparedPool(rows(args.n, 1, args.kind), lay, "pcc")
    q32 = normalized_block(rows(args.m, 2, args.kind), slice(None), "pcc")
    p64, q64 = pool.block().double(), q32.double()
    cols = [0]
    for w in lay.widths:
        cols.append(cols[-1] + w)
    dots = [q64[:, cols[j]:cols[j + 1]] @ p64[:, cols[j]:cols[j + 1]].T for j in range(len(lay.widths))]
    scores = sum(dots[2 * j] * dots[2 * j + 1] for j in range(len(WIDTHS)))
    s = tf.sample_size(args.n, args.k)
    sample = torch.randperm(args.n, generator=torch.Generator().manual_seed(0))[:s]
    kth = scores.topk(args.k, 1).values[:, -1]
    print(f"{args.kind} rows, N={args.n}, M={args.m}, k={args.k}, sample {s}; score std {scores.std():.4g}, "
          f"k-th best (median) {kth.median():.4g}")
    for precision in ("fp16", "bf16"):
        fpool = tf.FilterPool(pool, precision)
        _, q_norm, q_resid = tf.pad_rows(q32, fpool.layout, fpool.dtype, 16)
        table, cross = tf.error_table(q_norm, q_resid, fpool.norm_max, fpool.resid_max, fpool.layout.widths, True,
                                      fpool.dtype)

        # norms only: the same formula with Cauchy-Schwarz magnitudes, one number per query
        norms = [(q_norm[:, j].double() * fpool.norm_max[j])[:, None] for j in range(len(lay.widths))]
        margin = bound(table, cross, norms, scores.shape)[:, 0]
        old_hits = (scores >= (scores[:, sample].topk(args.k, 1).values[:, -1] - 2 * margin)[:, None]).sum(1)
        old_rescored = (scores >= (kth - 2 * margin)[:, None]).sum(1)
        e = bound(table, cross, [d.abs() for d in dots], scores.shape)
        tau = (scores[:, sample] - e[:, sample]).topk(args.k, 1).values[:, -1]
        new_hits = (scores + e >= tau[:, None]).sum(1)
        new_rescored = (scores + e >= (scores - e).topk(args.k, 1).values[:, -1:]).sum(1)
        med = lambda t: int(t.double().median())  # noqa: E731
        print(f"  {precision}: norms-only margin (median) {margin.median():.4g}; per-element e median "
              f"{e.median():.4g}, max {e.max():.4g}; candidates per query {med(old_hits)} -> {med(new_hits)}; "
              f"re-scored {med(old_rescored)} -> {med(new_rescored)}")


if __name__ == "__main__":
    main()
