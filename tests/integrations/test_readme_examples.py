"""README's "Use pyfk from small-text / scikit-activeml / modAL / baal" examples, run as written."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use pyfk from small-text / scikit-activeml / modAL / baal"


def _examples():
    text = README.read_text()
    section = text[text.index(SECTION):text.index("## Backends")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _run(index: int, name: str) -> dict:
    env: dict = {}
    exec(compile(_examples()[index], f"README.md ({name})", "exec"), env)
    return env


def test_four_examples_of_at_most_ten_lines():
    blocks = _examples()
    assert len(blocks) == 4
    assert all(len([ln for ln in b.splitlines() if ln.strip()]) <= 10 for b in blocks)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_small_text_example_runs():
    pytest.importorskip("small_text")
    env = _run(0, "small-text")
    labeled = env["learner"].indices_labeled
    assert len(labeled) == 20 + 5 * 10 and len(set(labeled.tolist())) == len(labeled)
    assert env["qs"].last.strategy == "pfk" and len(env["qs"].last.indices) == 10


def test_skactiveml_example_runs():
    pytest.importorskip("skactiveml")
    env = _run(1, "scikit-activeml")
    assert int((~np.isnan(env["y"])).sum()) == 20 + 3 * 10


def test_modal_example_runs():
    pytest.importorskip("modAL")
    env = _run(2, "modAL")
    assert len(env["X_pool"]) == len(env["X"]) - 250 - 3 * 20
    assert env["qs"].calls == 3 and env["qs"].last.strategy == "pfk"


def test_baal_example_runs():
    pytest.importorskip("baal")
    env = _run(3, "baal")
    assert env["heuristic"].last is not None and len(env["heuristic"].last.indices) == 10
    assert env["al"].n_labelled == 20 + 5 * 10
