"""README's "Use pyfk from small-text and scikit-activeml" examples, run as written."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples():
    text = README.read_text()
    section = text[text.index("## Use pyfk from small-text and scikit-activeml"):text.index("## Backends")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_two_examples_in_the_section():
    blocks = _examples()
    assert len(blocks) == 2
    assert all(len([ln for ln in b.splitlines() if ln.strip()]) <= 10 for b in blocks)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_small_text_example_runs():
    pytest.importorskip("small_text")
    env: dict = {}
    exec(compile(_examples()[0], "README.md (small-text)", "exec"), env)
    labeled = env["learner"].indices_labeled
    assert len(labeled) == 20 + 5 * 10 and len(set(labeled.tolist())) == len(labeled)


def test_skactiveml_example_runs():
    pytest.importorskip("skactiveml")
    env: dict = {}
    exec(compile(_examples()[1], "README.md (scikit-activeml)", "exec"), env)
    assert int((~np.isnan(env["y"])).sum()) == 20 + 3 * 10
