"""backend="auto" on CUDA by measurement (pyfk.engine.measured, issue #12 item 5), tested on a
CPU-only machine: the pure chooser on synthetic tables, table loading and its errors, the
registry's CUDA path with the backends' availability and the GPU lookup replaced, the problem
each search entry point passes, and benchmarks/derive_auto.py on a synthetic suite JSON.
No timing here is real: every table is made up for the test."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyfk
from pyfk.engine import measured, registry
from pyfk.engine import search as search_mod
from pyfk.engine.backend import REGISTRY
from pyfk.engine.layout import Layout
from pyfk.engine.measured import Measurement, Problem
from tests.conftest import make_arrays

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("derive_auto", ROOT / "benchmarks" / "derive_auto.py")
derive_auto = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("derive_auto", derive_auto)
_spec.loader.exec_module(derive_auto)

H100 = "NVIDIA H100 80GB HBM3"
FIXED = ["triton", "cuda", "torch"]  # the fixed CUDA order when all three run
IMAGENET = {"M": 50_000, "N": 1_281_167, "widths": [64, 128, 256, 512], "k": 32}
SMALL = {"M": 2_000, "N": 50_000, "widths": [64, 128, 256, 512], "k": 32}


def entry(seconds, gpu=H100, capability="9.0", dtype="bfloat16", combine="product", shape=None, **extra):
    obj = {"gpu": gpu, "capability": capability, "dtype": dtype, "combine": combine, **(shape or IMAGENET),
           "seconds": seconds, **extra}
    return Measurement.from_json(obj, "test")


def problem(shape=None, dtype="bfloat16", combine="product", **change):
    fields = {**(shape or IMAGENET), **change}
    return Problem(fields["M"], fields["N"], tuple(fields["widths"]), fields["k"], dtype, combine)


def table_file(path: Path, entries, version=1) -> Path:
    path.write_text(json.dumps({"version": version, "entries": [e.to_json() if isinstance(e, Measurement) else e
                                                                 for e in entries]}))
    return path


@pytest.fixture(autouse=True)
def clean_tables(monkeypatch):
    monkeypatch.delenv(measured.TABLE_ENV, raising=False)
    measured.clear_cache()
    yield
    measured.clear_cache()


# ----------------------------------------------------------------------------- the pure chooser

def test_fastest_measured_backend_wins_over_the_fixed_order():
    table = [entry({"triton": 0.9, "cuda": 0.41, "torch": 9.1}, estimated=["torch"])]
    name, reason = measured.choose_backend(table, H100, "9.0", problem(), FIXED)
    assert name == "cuda"
    assert reason.startswith(f"measured on {H100}: cuda 0.41 s < triton 0.9 s < torch 9.1 s (est.)")


def test_unavailable_fastest_gives_the_next_fastest():
    table = [entry({"triton": 0.9, "cuda": 0.41, "torch": 9.1})]
    name, reason = measured.choose_backend(table, H100, "9.0", problem(), ["triton", "torch"])
    assert name == "triton"
    assert "not available here: cuda 0.41 s" in reason


def test_entry_without_an_available_backend_is_passed_over():
    near = entry({"cuda": 0.1}, shape=SMALL)  # only cuda measured there, and cuda is not available
    far = entry({"triton": 0.9, "torch": 0.5})
    name, _ = measured.choose_backend([near, far], H100, "9.0", problem(SMALL), ["triton", "torch"])
    assert name == "torch"


def test_equal_seconds_go_by_the_fixed_order():
    table = [entry({"torch": 0.5, "cuda": 0.5, "triton": 0.7})]
    assert measured.choose_backend(table, H100, "9.0", problem(), FIXED)[0] == "cuda"


def test_nearest_shape_by_work():
    small = entry({"triton": 0.3, "torch": 0.1}, shape=SMALL)
    large = entry({"triton": 0.4, "torch": 9.0})
    table = [small, large]
    assert measured.choose_backend(table, H100, "9.0", problem(SMALL, M=3_000), FIXED)[0] == "torch"
    assert measured.choose_backend(table, H100, "9.0", problem(M=30_000), FIXED)[0] == "triton"
    # work (M * N * sum(widths)) decides, not M alone: SMALL's M, but 256x its pool (2.5x below large's work)
    assert measured.choose_backend(table, H100, "9.0", problem(SMALL, N=12_800_000), FIXED)[0] == "triton"


def test_k_breaks_ties_in_work():
    k32 = entry({"triton": 0.4, "cuda": 0.6})
    k1024 = entry({"triton": 2.0, "cuda": 0.9}, shape={**IMAGENET, "k": 1024})
    table = [k32, k1024]
    assert measured.choose_backend(table, H100, "9.0", problem(k=1000), FIXED)[0] == "cuda"
    assert measured.choose_backend(table, H100, "9.0", problem(k=40), FIXED)[0] == "triton"


def test_dense_similarity_problem_ignores_k():
    table = [entry({"triton": 2.0, "cuda": 0.9}, shape={**IMAGENET, "k": 1024})]
    name, reason = measured.choose_backend(table, H100, "9.0", problem(k=None), FIXED)
    assert name == "cuda" and "k=None" in reason


def test_same_dtype_is_preferred_over_a_nearer_shape():
    bf16 = entry({"triton": 0.4, "cuda": 0.9})
    f32_near = entry({"triton": 0.9, "cuda": 0.3}, dtype="float32", shape=SMALL)
    name, reason = measured.choose_backend([f32_near, bf16], H100, "9.0", problem(SMALL), FIXED)
    assert name == "triton" and "bfloat16" in reason
    name, reason = measured.choose_backend([f32_near, bf16], H100, "9.0", problem(SMALL, dtype="float32"), FIXED)
    assert name == "cuda"
    # no float16 measurement: the nearest of the others, said in the reason
    name, reason = measured.choose_backend([f32_near, bf16], H100, "9.0", problem(SMALL, dtype="float16"), FIXED)
    assert name == "cuda" and "no float16 measurement" in reason


def test_capability_fallback_is_said_and_name_wins_over_capability():
    pcie = entry({"triton": 0.9, "cuda": 0.4}, gpu="NVIDIA H100 PCIe")
    name, reason = measured.choose_backend([pcie], H100, "9.0", problem(), FIXED)
    assert name == "cuda"
    assert f"no measurement for {H100}: using one of compute capability 9.0" in reason
    assert "measured on NVIDIA H100 PCIe" in reason
    own = entry({"triton": 0.3, "cuda": 0.4}, shape=SMALL)  # farther in shape, but this GPU's
    assert measured.choose_backend([pcie, own], H100, "9.0", problem(), FIXED)[0] == "triton"
    # another capability is no evidence
    name, reason = measured.choose_backend([pcie], "NVIDIA A100-SXM4-80GB", "8.0", problem(), FIXED)
    assert (name, reason) == ("triton", "no measurement for NVIDIA A100-SXM4-80GB: fixed order")


def test_empty_table_keeps_the_fixed_order():
    assert measured.choose_backend([], H100, "9.0", problem(), FIXED) == (
        "triton", f"no measurement for {H100}: fixed order")
    assert measured.choose_backend([], H100, "9.0", problem(), ["cuda", "torch"])[0] == "cuda"
    assert measured.choose_backend([], None, None, problem(), FIXED) == (
        "triton", "no measurement for this GPU (name unknown): fixed order")


def test_other_combine_is_no_evidence():
    table = [entry({"triton": 0.9, "cuda": 0.4}, combine="sum")]
    name, reason = measured.choose_backend(table, H100, "9.0", problem(), FIXED)
    assert name == "triton"
    assert reason.startswith(f"no measurement for {H100} with combine='product'") and reason.endswith("fixed order")
    assert measured.choose_backend(table, H100, "9.0", problem(combine="sum"), FIXED)[0] == "cuda"


def test_far_entry_is_used_and_said():
    table = [entry({"triton": 0.4, "cuda": 0.9, "torch": 0.3})]
    tiny = problem(M=50, N=1_281, k=32)  # 10^6 times less work
    name, reason = measured.choose_backend(table, H100, "9.0", tiny, FIXED)
    assert name == "torch"
    assert "far: that shape does 1e+06x more work than this problem; used anyway" in reason
    _, near_reason = measured.choose_backend(table, H100, "9.0", problem(M=5_000), FIXED)  # 10x: not far
    assert "far:" not in near_reason
    huge = problem(M=50_000 * 200)
    assert "x less work" in measured.choose_backend(table, H100, "9.0", huge, FIXED)[1]


def test_tie_in_distance_goes_to_the_earlier_entry():
    first = entry({"triton": 0.4, "cuda": 0.9}, shape=SMALL)
    second = entry({"triton": 0.9, "cuda": 0.4}, shape={**SMALL, "M": 8_000})
    middle = problem(SMALL, M=4_000)  # 2x from both
    assert measured.choose_backend([first, second], H100, "9.0", middle, FIXED)[0] == "triton"
    assert measured.choose_backend([second, first], H100, "9.0", middle, FIXED)[0] == "cuda"


def test_chooser_needs_an_available_backend():
    with pytest.raises(ValueError, match="available: expected at least one available backend name, got none"):
        measured.choose_backend([], H100, "9.0", problem(), [])


# ----------------------------------------------------------------------------- Problem

def test_problem_widths_are_per_scale():
    product = Layout((3, 3, 5, 5), "product")
    p = Problem.for_layout(7, 100, product, 4, torch.bfloat16)
    assert p == Problem(7, 100, (3, 5), 4, "bfloat16", "product")
    assert p.work == 7 * 100 * 8
    features = Problem.for_layout(7, 100, Layout((3, 5, 9), "features"), None, np.float16)
    assert features.widths == (3, 5, 9) and features.dtype == "float16" and features.k is None


@pytest.mark.parametrize("change, message", [
    ({"M": 0}, "problem.M: expected a positive integer, got 0"),
    ({"N": 2.5}, "problem.N: expected a positive integer, got 2.5"),
    ({"widths": ()}, "problem.widths: expected a non-empty sequence of positive integers"),
    ({"k": 0}, "problem.k: expected a positive integer or None, got 0"),
    ({"dtype": "bf16"}, "problem.dtype: expected one of .*, got 'bf16'"),
    ({"combine": "max"}, "problem.combine: expected one of .*, got 'max'"),
])
def test_problem_rejects_bad_fields(change, message):
    fields = {"M": 1, "N": 2, "widths": (3,), "k": 1, "dtype": "float32", "combine": "product", **change}
    with pytest.raises(ValueError, match=message):
        Problem(**fields)


def test_as_problem_takes_a_dict_and_rejects_others():
    p = measured.as_problem({"M": 1, "N": 2, "widths": [3], "k": None, "dtype": "float32"})
    assert p == Problem(1, 2, (3,), None, "float32", "product")
    with pytest.raises(ValueError, match=r"problem: expected the keys .*missing \['k'\]"):
        measured.as_problem({"M": 1, "N": 2, "widths": [3], "dtype": "float32"})
    with pytest.raises(TypeError, match="problem: expected a pyfk.engine.measured.Problem .*, got tuple"):
        measured.as_problem((1, 2))


# ----------------------------------------------------------------------------- tables

def test_packaged_table_parses_and_is_empty():
    assert measured.PACKAGED_TABLE.name == "measured_cuda.json"
    doc = json.loads(measured.PACKAGED_TABLE.read_text())
    assert doc["version"] == 1 and doc["entries"] == []
    assert measured.load_table(measured.PACKAGED_TABLE) == []
    assert measured.table_entries() == []


def test_packaged_table_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.setuptools.package-data]"):]
    assert '"pyfk.engine" = ["measured_cuda.json"]' in section.split("\n[", 1)[0]


def test_user_table_takes_precedence(tmp_path, monkeypatch):
    packaged = table_file(tmp_path / "packaged.json", [entry({"triton": 0.4, "cuda": 0.9}),
                                                       entry({"torch": 0.1, "triton": 0.5}, shape=SMALL)])
    monkeypatch.setattr(measured, "PACKAGED_TABLE", packaged)
    assert measured.choose_backend(measured.table_entries(), H100, "9.0", problem(), FIXED)[0] == "triton"
    user = table_file(tmp_path / "user.json", [entry({"triton": 0.9, "cuda": 0.4}, source="mine.json")])
    monkeypatch.setenv(measured.TABLE_ENV, str(user))
    entries = measured.table_entries()
    assert [e.source for e in entries] == ["mine.json", None]  # the user's replaces the same problem
    assert entries[1].seconds == {"torch": 0.1, "triton": 0.5}  # the packaged one it does not replace stays
    name, reason = measured.choose_backend(entries, H100, "9.0", problem(), FIXED)
    assert name == "cuda" and "(mine.json)" in reason


def test_tables_are_cached_and_reread_on_change(tmp_path, monkeypatch):
    a = table_file(tmp_path / "a.json", [entry({"triton": 0.4})])
    b = table_file(tmp_path / "b.json", [entry({"cuda": 0.4}), entry({"cuda": 0.5}, shape=SMALL)])
    reads = []
    real = measured.load_table
    monkeypatch.setattr(measured, "load_table", lambda path, what="table": reads.append(Path(path).name)
                        or real(path, what))
    monkeypatch.setenv(measured.TABLE_ENV, str(a))
    assert len(measured.table_entries()) == 1
    assert len(measured.table_entries()) == 1
    assert reads == ["measured_cuda.json", "a.json"]  # once each
    monkeypatch.setenv(measured.TABLE_ENV, str(b))
    assert len(measured.table_entries()) == 2 and reads[-1] == "b.json"
    table_file(b, [entry({"cuda": 0.4})])  # rewritten: a different size
    assert len(measured.table_entries()) == 1 and reads.count("b.json") == 2
    monkeypatch.setenv(measured.TABLE_ENV, "")  # empty: no user table
    assert measured.table_entries() == []


GOOD = {"gpu": H100, "capability": "9.0", "dtype": "bfloat16", "combine": "product", **IMAGENET,
        "seconds": {"triton": 0.4}}


@pytest.mark.parametrize("doc, message", [
    ("{not json", "expected a JSON table, got invalid JSON"),
    (json.dumps([GOOD]), "expected a JSON object with 'version' and 'entries', got list"),
    (json.dumps({"version": 2, "entries": []}), "expected version 1, got 2"),
    (json.dumps({"entries": []}), "expected version 1, got 'no version'"),
    (json.dumps({"version": 1, "entries": {}}), "expected 'entries' to be a list, got dict"),
    (json.dumps({"version": 1, "entries": [], "extra": 1}), r"unknown top-level fields \['extra'\]"),
    (json.dumps({"version": 1, "entries": [{k: v for k, v in GOOD.items() if k != "seconds"}]}),
     r"entries\[0\]: missing fields \['seconds'\]"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "secs": 1}]}), r"entries\[0\]: unknown fields \['secs'\]"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "M": "50000"}]}), r"entries\[0\].M: expected a positive integer"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "capability": 9.0}]}), r"entries\[0\].capability: expected"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "dtype": "bf16"}]}), r"entries\[0\].dtype: expected one of"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "widths": []}]}), r"entries\[0\].widths: expected a non-empty"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "seconds": {"triton": -1}}]}),
     r"entries\[0\].seconds\['triton'\]: expected a positive finite number, got -1"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "seconds": {"triton[merge]": 1.0}}]}), "no variants"),
    (json.dumps({"version": 1, "entries": [{**GOOD, "estimated": ["torch"]}]}),
     r"entries\[0\].estimated: expected a list of backend names from seconds"),
    (json.dumps({"version": 1, "entries": [GOOD, {**GOOD, "seconds": {"cuda": 1.0}}]}),
     r"entries\[1\] repeats the problem of entries\[0\]"),
])
def test_malformed_table_names_the_file(tmp_path, monkeypatch, doc, message):
    path = tmp_path / "bad_table.json"
    path.write_text(doc)
    with pytest.raises(ValueError, match=message) as info:
        measured.load_table(path)
    assert str(info.value).startswith(str(path))
    monkeypatch.setenv(measured.TABLE_ENV, str(path))  # the same through the environment variable
    with pytest.raises(ValueError, match=message):
        measured.table_entries()


def test_missing_user_table_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(measured.TABLE_ENV, str(tmp_path / "nowhere.json"))
    with pytest.raises(ValueError, match="PYFK_AUTO_TABLE: expected a readable JSON table file, got .*nowhere.json"):
        measured.table_entries()


def test_write_table_round_trips_atomically(tmp_path):
    entries = [entry({"triton": 0.4, "torch": 9.1}, estimated=["torch"], source="s.json", commit="abc"),
               entry({"cuda": 0.2}, shape=SMALL)]
    path = measured.write_table(tmp_path / "t.json", entries, note="made up")
    assert measured.load_table(path) == entries
    assert json.loads(path.read_text())["note"] == "made up"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temp file left
    measured.write_table(path, [])
    assert json.loads(path.read_text()) == {"version": 1, "entries": []}


def test_updated_entries_replace_in_place_and_append():
    a, b = entry({"triton": 0.4}), entry({"cuda": 0.2}, shape=SMALL)
    a2, c = entry({"triton": 0.3}), entry({"torch": 1.0}, dtype="float32")
    assert measured.updated_entries([a, b], [c, a2]) == [a2, b, c]


# ----------------------------------------------------------------------------- the registry

@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """The CUDA path on this machine: triton, cuda, torch and faiss 'available', the GPU an H100,
    and PYFK_AUTO_TABLE a table the test writes (returned: its path)."""
    for name in ("triton", "cuda", "torch", "faiss"):
        monkeypatch.setattr(REGISTRY[name], "unavailable_reason", lambda: None)
    monkeypatch.setattr(measured, "current_gpu", lambda device: (H100, "9.0"))
    path = table_file(tmp_path / "auto.json", [])
    monkeypatch.setenv(measured.TABLE_ENV, str(path))
    return path


def test_cpu_auto_is_unchanged(monkeypatch):
    assert registry.auto_choice("cpu") == "cpu"
    assert registry.auto_decision("cpu") == ("cpu", "fixed order")
    # a problem is checked but never consults a table on the CPU
    monkeypatch.setattr(measured, "table_entries", lambda: pytest.fail("the CPU consulted the measured table"))
    assert registry.auto_decision(torch.device("cpu"), problem()) == ("cpu", "fixed order")
    assert registry.auto_reason("cpu", problem()) == "fixed order"
    with pytest.raises(TypeError, match="problem: expected"):
        registry.auto_choice("cpu", "big")


def test_cuda_auto_chooses_by_measurement(fake_cuda, caplog):
    table_file(fake_cuda, [entry({"triton": 0.9, "cuda": 0.41, "torch": 9.1, "faiss": 0.01})])
    assert registry.auto_choice("cuda") == "triton"  # no problem: the fixed order
    assert registry.auto_reason("cuda") == "no problem shape given: fixed order"
    # faiss (no CUDA auto_priority: its exact mode refuses wide problems) is never chosen by measurement
    assert registry.auto_choice("cuda", problem()) == "cuda"
    assert registry.auto_choice("cuda:0", dict(IMAGENET, dtype="bfloat16")) == "cuda"
    caplog.set_level(logging.INFO, logger="pyfk")
    assert registry.resolve("auto", "cuda", problem()) is REGISTRY["cuda"]
    assert f"chose 'cuda' for cuda tensors (measured on {H100}: cuda 0.41 s < triton 0.9 s" in caplog.text


def test_cuda_auto_skips_an_unavailable_backend(fake_cuda, monkeypatch):
    table_file(fake_cuda, [entry({"triton": 0.9, "cuda": 0.41, "torch": 9.1})])
    monkeypatch.setattr(REGISTRY["cuda"], "unavailable_reason", lambda: "pyfk._C_cuda is not built")
    assert registry.auto_decision("cuda", problem())[0] == "triton"
    monkeypatch.setattr(REGISTRY["triton"], "unavailable_reason", lambda: "no triton")
    assert registry.auto_choice("cuda", problem()) == "torch"


def test_cuda_auto_with_an_empty_table_keeps_the_fixed_order(fake_cuda, monkeypatch):
    assert registry.auto_decision("cuda", problem()) == ("triton", f"no measurement for {H100}: fixed order")
    monkeypatch.delenv(measured.TABLE_ENV)  # the packaged table alone (shipped empty)
    assert registry.auto_decision("cuda", problem()) == ("triton", f"no measurement for {H100}: fixed order")


def test_cuda_auto_without_auto_backends_takes_the_fixed_order(fake_cuda, monkeypatch):
    table_file(fake_cuda, [entry({"faiss": 0.01})])
    for name in ("triton", "cuda", "torch"):
        monkeypatch.setattr(REGISTRY[name], "unavailable_reason", lambda: "missing")
    assert registry.auto_decision("cuda", problem()) == (
        "faiss", "none of the backends meant for auto is available: fixed order")


# ----------------------------------------------------------------------------- what the searches pass

@pytest.fixture
def seen(monkeypatch):
    """Every (backend, device type, problem) pyfk.engine.search resolves; the real resolve answers."""
    calls = []

    def recording(name, device, problem=None):
        calls.append((name, torch.device(device).type, problem))
        return registry.resolve(name, device, problem)

    monkeypatch.setattr(search_mod, "resolve", recording)
    return calls


def test_topk_passes_the_problem(rng, seen):
    qz, qg = make_arrays(rng, 5, [3, 8])
    pz, pg = make_arrays(rng, 700, [3, 8], dtype=np.float16)
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    pyfk.topk(q, p, k=9, exclude=[1, 2, 3])
    assert seen == [("auto", "cpu", Problem(5, 697, (3, 8), 9, "float16", "product"))]
    pyfk.topk(q, p, k=4, combine="features", backend="torch")  # a named backend: no problem
    assert seen[-1] == ("torch", "cpu", None)


def test_topk_auto_reaches_the_measured_choice(rng, seen, fake_cuda, monkeypatch):
    """The problem topk builds is the one the CUDA path chooses by (the search itself runs on the CPU)."""
    table_file(fake_cuda, [entry({"triton": 0.9, "cuda": 0.41}, dtype="float32", shape={**SMALL, "widths": [4]})])
    decisions = []
    monkeypatch.setattr(search_mod, "resolve", lambda name, device, problem=None: decisions.append(
        registry.auto_decision("cuda", problem)) or registry.resolve(name, device))
    qz, qg = make_arrays(rng, 3, [4])
    pz, pg = make_arrays(rng, 50, [4])
    pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), k=2)
    assert decisions[0][0] == "cuda"
    assert "this problem: M=3 N=50 widths=[4] k=2 float32 product" in decisions[0][1]


def test_named_backend_is_checked_before_k(rng):
    qz, qg = make_arrays(rng, 2, [3])
    pz, pg = make_arrays(rng, 10, [3])
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), k=1000, backend="nope")
    with pytest.raises(ValueError, match="k: expected an integer in"):
        pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), k=1000)


def test_similarity_select_search_and_distances_pass_the_problem(rng, seen):
    vz, vg = make_arrays(rng, 6, [3, 5])
    pz, pg = make_arrays(rng, 40, [3, 5])
    val, pool = pyfk.Descriptors(vz, vg), pyfk.Descriptors(pz, pg)
    pyfk.similarity(val, pool, combine="sum")
    assert seen[-1] == ("auto", "cpu", Problem(6, 40, (3, 5), None, "float32", "sum"))
    pyfk.select(pool, val, budget=4, k=3, exclude=[0, 1])  # 6 queries -> 4 centres, 38 rows searched
    assert seen[-1] == ("auto", "cpu", Problem(4, 38, (3, 5), 3, "float32", "product"))
    pyfk.select(pool, val, budget=10, k=3)  # budget above the queries: every query is a centre
    assert seen[-1] == ("auto", "cpu", Problem(6, 40, (3, 5), 3, "float32", "product"))
    prepared = registry.get("torch").prepare(*Layout.of(pool, "features"), "pcc")
    search_mod.search(val, prepared, 2, "features", "pcc", rows=np.arange(5, 30, dtype=np.int64))
    assert seen[-1] == ("auto", "cpu", Problem(6, 25, (3, 5), 2, "float32", "features"))
    search_mod.KernelDistances(val, "product", "pcc")
    assert seen[-1] == ("auto", "cpu", Problem(1, 6, (3, 5), None, "float32", "product"))


# ----------------------------------------------------------------------------- derive_auto

def suite_json(path: Path, rows, gpu=None, commit="c0ffee", date="2025-01-01T00:00:00+00:00") -> Path:
    result = {"date": date, "commit": commit,
              "versions": {"gpu": gpu or {"name": H100, "capability": "9.0", "sms": 132, "memory_gib": 79.1}},
              "timing": rows}
    path.write_text(json.dumps(result))
    return path


def row(backend, seconds, case="N200k_M5k", M=5_000, N=200_000, **extra):
    return {"case": case, "dtype": "bfloat16", "M": M, "N": N, "widths": [64, 128, 256, 512], "k": 32,
            "backend": backend, "seconds": seconds, "scaled": False, "measured_m": None, **extra}


SUITE_ROWS = [
    row("torch", 3.0, scaled=True, measured_m=500),
    row("triton", 0.1),
    row("cuda", 0.2),
    row("faiss", None, error="ValueError: too wide"),
    row("triton[merge]", 0.05, options={"kernel": "merge"}),
    row("torch", None, case="imagenet", M=50_000, N=1_281_167, skipped="time guard"),
    row("triton", None, case="imagenet", M=50_000, N=1_281_167, skipped="time guard"),
]


def test_derive_entries_from_a_suite(tmp_path):
    path = suite_json(tmp_path / "gpu_suite_20250101T000000Z.json", SUITE_ROWS)
    entries = derive_auto.suite_entries(path)
    assert len(entries) == 1  # the skipped case gives none
    e = entries[0]
    assert e.seconds == {"torch": 3.0, "triton": 0.1, "cuda": 0.2}  # no error row, no variant
    assert e.estimated == ("torch",)
    assert (e.gpu, e.capability, e.dtype, e.combine, e.M, e.N, e.widths, e.k) == (
        H100, "9.0", "bfloat16", "product", 5_000, 200_000, (64, 128, 256, 512), 32)
    assert (e.source, e.commit, e.date) == (path.name, "c0ffee", "2025-01-01T00:00:00+00:00")


def test_derive_prints_without_writing(tmp_path, capsys):
    table = tmp_path / "table.json"
    suite = suite_json(tmp_path / "s.json", SUITE_ROWS)
    assert derive_auto.main([str(suite), "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "triton 0.1 s, cuda 0.2 s, torch 3 s est." in out and "pass --write" in out
    assert not table.exists()


def test_derive_write_merges_and_replaces(tmp_path, capsys, monkeypatch):
    table = tmp_path / "table.json"
    monkeypatch.setattr(measured, "PACKAGED_TABLE", table)  # the default --table, never the real one
    measured.write_table(table, [entry({"triton": 0.4}, gpu="Other GPU", capability="8.0")], note="kept")
    first = suite_json(tmp_path / "first.json", SUITE_ROWS)
    assert derive_auto.main([str(first), "--write"]) == 0
    assert "1 replaced" not in capsys.readouterr().out
    second = suite_json(tmp_path / "second.json", [row("triton", 0.3), row("cuda", 0.25),
                                                   row("cuda", 0.9, case="big", M=50_000)], commit="beef")
    assert derive_auto.main([str(second), "--write"]) == 0
    assert "wrote 3 entries" in capsys.readouterr().out
    entries = measured.load_table(table)
    assert [e.gpu for e in entries] == ["Other GPU", H100, H100]
    assert entries[1].seconds == {"triton": 0.3, "cuda": 0.25} and entries[1].source == "second.json"
    assert entries[2].M == 50_000 and entries[2].seconds == {"cuda": 0.9}
    assert json.loads(table.read_text())["note"] == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.json", "second.json", "table.json"]


def test_derive_later_file_wins(tmp_path, capsys):
    table = tmp_path / "t.json"
    a = suite_json(tmp_path / "a.json", [row("triton", 0.5)])
    b = suite_json(tmp_path / "b.json", [row("triton", 0.2)])
    assert derive_auto.main([str(a), str(b), "--table", str(table), "--write"]) == 0
    assert [e.seconds for e in measured.load_table(table)] == [{"triton": 0.2}]


@pytest.mark.parametrize("result, message", [
    ({"timing": []}, "expected versions.gpu with name and capability"),
    ({"versions": {"gpu": {"name": H100, "capability": "9.0"}}}, "expected a 'timing' list"),
    ({"versions": {"gpu": {"name": H100, "capability": "9.0"}}, "timing": [row("torch", None, error="OOM")]},
     "got none usable"),
    ({"versions": {"gpu": {"name": H100, "capability": "9.0"}}, "timing": [{"backend": "torch", "seconds": 1}]},
     r"timing\[0\]: expected case, dtype, M, N, widths, k"),
])
def test_derive_rejects_what_is_not_a_gpu_suite_result(tmp_path, capsys, result, message):
    path = tmp_path / "bad_suite.json"
    path.write_text(json.dumps(result))
    assert derive_auto.main([str(path), "--table", str(tmp_path / "t.json"), "--write"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err
    assert re.search(message, err)
    assert not (tmp_path / "t.json").exists()
