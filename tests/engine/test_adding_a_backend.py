"""README's "Adding a backend" example, run as written: it registers, resolves, searches
exactly (through TopK.merge) and rejects unknown options."""

import re
from pathlib import Path

import numpy as np
import pytest

import pyfk
from pyfk.engine import backend
from tests.conftest import make_arrays
from tests.oracle import similarity64, tolerance

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_backend_example(rng):
    text = README.read_text()
    section = text[text.index("## Adding a backend"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(compile(code, "README.md (Adding a backend)", "exec"), {})
        assert "mine" in [b["name"] for b in pyfk.backends()]
        qz, qg = make_arrays(rng, 5, [3, 8])
        pz, pg = make_arrays(rng, 700, [3, 8])
        q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
        scores, index = pyfk.topk(q, p, k=9, backend="mine", exclude=[1, 2, 3])
        S = similarity64(qz, qg, pz, pg)
        S[:, [1, 2, 3]] = -np.inf
        pyfk.testing.assert_topk_valid(scores, index, S, 9, tolerance(qz, qg, pz, pg, "product", "pcc"))
        pyfk.topk(q, p, k=2, backend="mine", options={"tile": 128})
        with pytest.raises(ValueError, match="options: backend 'mine' accepts \\['tile'\\]"):
            pyfk.topk(q, p, k=2, backend="mine", options={"tiles": 1})
    finally:
        backend.REGISTRY.pop("mine", None)
