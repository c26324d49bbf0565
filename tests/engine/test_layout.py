"""Layout: the one description of the segment structure, against the float64 oracle."""

import numpy as np
import pytest
import torch

import pyfk
from pyfk.engine.descriptors import normalized_block
from pyfk.engine.layout import Layout
from tests.conftest import make_arrays
from tests.oracle import normalize64, similarity64


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_of_orders_segments_and_computes_R(rng, combine):
    qz, qg = make_arrays(rng, 4, [3, 7, 1])
    pz, pg = make_arrays(rng, 9, [3, 7, 1])
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    parts, layout = Layout.of(q, combine)
    want = [3, 3, 7, 7, 1, 1] if combine != "features" else [3, 7, 1]
    assert list(layout.widths) == want and layout.width == sum(want) and layout.scales == 3
    assert layout.offsets == tuple(np.cumsum([0] + want[:-1]))
    assert layout.product == (combine == "product")
    qn = torch.from_numpy(np.concatenate([normalize64(a, "pcc") for a in parts], 1))
    pn = torch.from_numpy(np.concatenate([normalize64(a, "pcc") for a in Layout.of(p, combine)[0]], 1))
    assert torch.allclose(normalized_block(parts, slice(None), "pcc").double(), qn, atol=1e-5)
    np.testing.assert_allclose(layout.similarity(qn, pn).numpy(), similarity64(qz, qg, pz, pg, combine, "pcc"),
                               rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(layout.self_similarity(qn).numpy(),
                               np.diag(similarity64(qz, qg, qz, qg, combine, "pcc")), rtol=1e-12, atol=1e-10)
    terms = layout.scale_terms(qn.numpy(), qn.numpy()[::-1])
    assert terms.shape == (4, 3)
    np.testing.assert_allclose(terms.sum(1), np.diag(similarity64(qz, qg, [a[::-1] for a in qz],
                                                                  [a[::-1] for a in qg], combine, "pcc")),
                               rtol=1e-12, atol=1e-10)
    if combine == "product":  # the per-scale term of scale j is (z_j.z_j')(g_j.g_j')
        j = 1
        zz = (normalize64(qz[j], "pcc") * normalize64(qz[j], "pcc")[::-1]).sum(1)
        gg = (normalize64(qg[j], "pcc") * normalize64(qg[j], "pcc")[::-1]).sum(1)
        np.testing.assert_allclose(terms[:, j], zz * gg, rtol=1e-12)


def test_badge_widths_may_differ_per_pair():
    layout = Layout((5, 3), "product")
    assert layout.pairs() == [(slice(0, 5), slice(5, 8))]
    x = torch.arange(16, dtype=torch.float64).reshape(2, 8)
    np.testing.assert_allclose(layout.similarity(x, x).numpy(),
                               (x[:, :5] @ x[:, :5].T * (x[:, 5:] @ x[:, 5:].T)).numpy())


def test_invalid_layouts():
    with pytest.raises(ValueError, match="needs \\(z, g\\) pairs"):
        Layout((3, 4, 5), "product")
    with pytest.raises(ValueError, match="positive segment widths"):
        Layout((3, 0), "sum")
    with pytest.raises(ValueError, match="combine: expected one of"):
        Layout((3,), "hadamard")
