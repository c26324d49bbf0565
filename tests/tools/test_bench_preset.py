"""`pyfk bench --preset`: the store is built once, resumably, to the same bytes, then reused."""

import numpy as np
import pytest

from pyfk import bench
from pyfk.features.store import DescriptorStore


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.PRESETS, "tiny", {"M": 7, "N": 1000, "widths": [5, 3], "k": 4, "dtype": "float16"})
    monkeypatch.setattr(bench, "_PRESET_CHUNK", 256)
    return "tiny"


def test_interrupted_build_resumes_to_the_same_store(tiny, tmp_path, monkeypatch):
    whole = bench.preset_store(tiny, tmp_path / "a", progress=False)
    calls = {"n": 0}
    real_commit = DescriptorStore.commit

    def dying_commit(self, rows_done, meta=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C after two committed chunks
        return real_commit(self, rows_done, meta)

    monkeypatch.setattr(DescriptorStore, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        bench.preset_store(tiny, tmp_path / "b", progress=False)
    monkeypatch.setattr(DescriptorStore, "commit", real_commit)
    (path,) = (tmp_path / "b").iterdir()
    assert DescriptorStore.open(path, "r").rows_done == 512
    resumed = bench.preset_store(tiny, tmp_path / "b", progress=False)
    assert resumed.complete and resumed.mode == "r"
    for name in whole.names:
        np.testing.assert_array_equal(whole.rows(name), resumed.rows(name))
    again = bench.preset_store(tiny, tmp_path / "b", progress=False)  # complete: reused, not rebuilt
    assert again.path == resumed.path and again.complete


def test_run_bench_on_the_preset_pool(tiny, tmp_path):
    spec = bench.PRESETS[tiny]
    pool = bench.preset_store(tiny, tmp_path, progress=False).to_descriptors()
    res = bench.run_bench(spec["M"], spec["N"], spec["widths"], k=spec["k"], dtype=spec["dtype"],
                          backends=["cpu"], repeats=1, baseline=False, pool=pool, preset=tiny)
    (row,) = res["rows"]
    assert row["backend"] == "cpu" and row["seconds"] > 0 and row["max_abs_diff"] is not None
    assert res["args"]["preset"] == tiny and res["args"]["N"] == 1000
    with pytest.raises(ValueError, match="pool: expected 999 rows"):
        bench.run_bench(spec["M"], 999, spec["widths"], k=4, dtype="float16", backends=["cpu"], pool=pool)
