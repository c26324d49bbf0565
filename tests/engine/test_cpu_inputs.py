"""The cpu backend accepts float32 arrays whose dtype is not numpy's float32 singleton (unpickled,
e.g. descriptors sent between processes), with the same answer as the originals."""

import pickle

import numpy as np
import pytest

import pyfk
from pyfk.engine.registry import backends


@pytest.mark.skipif(not any(b["name"] == "cpu" and b["available"] for b in backends()), reason="no cpu extension")
def test_unpickled_float32_and_float16_pools(rng):
    for dtype in (np.float32, np.float16):
        z = [rng.standard_normal((40, w)).astype(dtype) for w in (5, 9)]
        g = [rng.standard_normal((40, w)).astype(dtype) for w in (5, 9)]
        copy_z, copy_g = pickle.loads(pickle.dumps((z, g)))
        assert copy_z[0].dtype is not z[0].dtype  # a fresh dtype object, equal but not identical
        want = pyfk.topk(pyfk.Descriptors(z, g), pyfk.Descriptors(z, g), k=4, backend="cpu")
        got = pyfk.topk(pyfk.Descriptors(copy_z, copy_g), pyfk.Descriptors(copy_z, copy_g), k=4, backend="cpu")
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
