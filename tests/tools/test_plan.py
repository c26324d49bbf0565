"""`pyfk plan` (pyfk/plan.py): the planning arithmetic against hand-computed values, the
calibration cache (round trip, key mismatch, corrupt or foreign files), input errors, and
the predicted-vs-measured check. The probe is replaced by a deterministic timing function:
no benchmark runs here beyond one tiny smoke call."""

import json
import math
import time
from pathlib import Path

import pytest

from pyfk import plan as P

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
R_TRUE, C_TRUE = {"float32": 150.0, "float16": 140.0}, {"float32": 0.25, "float16": 0.5}  # GFLOP/s, ns/value


def fixed_rates(gflops=100.0, pack_ns=0.0, threads=2):
    return P.Rates(backend="cpu", threads=threads, gflops={"float32": gflops, "float16": gflops},
                   pack_ns={"float32": pack_ns, "float16": pack_ns}, key={"cpu": "test", "isa": "avx2"},
                   source="given")


@pytest.fixture
def fake_probe(monkeypatch):
    """_run_probe replaced by t = F / R + n * D * c (exact), counting its calls."""
    calls = []

    def probe(backend, dtype, ms, n, widths, k, threads, repeats):
        out = {}
        for m in ms:
            calls.append((dtype, m, n))
            flops = P.topk_flops(m, n, widths, "product")
            out[m] = flops / (R_TRUE[dtype] * 1e9) + n * 2 * sum(widths) * C_TRUE[dtype] * 1e-9
        return out

    monkeypatch.setattr(P, "_run_probe", probe)
    monkeypatch.setattr(P, "_loadavg", lambda: 0.0)  # a quiet machine, whatever runs beside the tests
    return calls


# ----------------------------------------------------------------------------- arithmetic

def test_cpu_plan_arithmetic_by_hand():
    rates = fixed_rates(gflops=100.0, pack_ns=0.5, threads=2)
    p = P.plan(1000, 10, (4, 8), k=3, dtype="float16", rates=rates, ram_bytes=1 << 30)
    s, mem, disk = p.selection, p.memory, p.disk
    assert s["flops"] == s["flops_per_rank"] == 4 * (4 + 8) * 10 * 1000 == 480_000
    assert s["compute_s"] == pytest.approx(480_000 / 100e9)
    assert s["pack_s"] == pytest.approx(1000 * 24 * 0.5e-9)
    assert s["merge_s"] == 0.0
    assert p.seconds == pytest.approx(480_000 / 100e9 + 1000 * 24 * 0.5e-9)
    assert s["read_s_if_cold"] == pytest.approx(1000 * 24 * 2 / 2e9)
    assert mem["pool_shard_mapped_bytes"] == 1000 * 24 * 2
    anon = mem["anonymous"]
    assert anon["queries_normalised"] == 10 * 24 * 4
    assert anon["queries_packed"] == 16 * 24 * 4  # 10 queries in panels of 8
    assert anon["topk_state"] == 48 * 10 * 3
    assert anon["thread_tiles"] == 2 * 384 * 1024
    assert anon["thread_heaps"] == 2 * 28 * 10 * 3
    assert mem["anonymous_bytes"] == sum(anon.values())
    assert mem["mn_matrix_bytes_not_built"] == 10 * 1000 * 4
    assert mem["shard_fits_page_cache"] and p.sharding["min_world_to_fit"] == 1
    assert disk["store_bytes"] == 1000 * 2 * 12 * 2 + 4 * 128 + 4096
    assert disk["extraction_store_bytes"] == disk["store_bytes"]
    assert p.backend == "cpu" and "float16 store" in p.precision


def test_sharded_plan_and_extraction_store_by_hand():
    rates = fixed_rates(gflops=50.0)
    p = P.plan(1001, 10, (4, 8), k=3, dtype="float32", world=4, rates=rates, classes=7, extract_rate=5.0,
               ram_bytes=1 << 30)
    s = p.selection
    assert p.sharding["rows_per_rank"] == 251  # ceil(1001 / 4)
    assert s["flops"] == 4 * 12 * 10 * 1001 and s["flops_per_rank"] == 4 * 12 * 10 * 251
    keys = 4 * 10 * 3
    assert s["merge_s"] == pytest.approx(keys * 8 / 1e9 + keys / 5e7)
    assert p.seconds == pytest.approx(4 * 12 * 10 * 251 / 50e9 + s["merge_s"])
    assert p.memory["anonymous"]["rank_merge"] == 2 * keys * 8
    ext = P.store_bytes(1001, (4, 8), "float32", classes=7)
    assert ext["total"] == 1001 * 24 * 4 + 1001 * 7 * 4 + 4 * 1001 * 8 + 9 * 128 + 4096
    assert p.disk["extraction_store_bytes"] == ext["total"]
    assert p.disk["per_rank_bytes"] == math.ceil(ext["total"] / 4)
    assert p.extraction["seconds"] == pytest.approx(251 / 5.0)
    assert "recommended: float16" in p.precision


def test_store_larger_than_ram_is_read_every_call():
    rates = fixed_rates(gflops=100.0)
    p = P.plan(1_000_000, 100, (64, 64), dtype="float16", rates=rates, ram_bytes=100 << 20, disk_gbps=1.0)
    shard = 1_000_000 * 256 * 2
    assert not p.sharding["fits"] and p.sharding["min_world_to_fit"] == math.ceil(shard / (0.8 * (100 << 20)))
    assert p.seconds == pytest.approx(p.selection["compute_s"] + shard / 1e9)
    assert any("every call reads it from disk" in n for n in p.notes)


def test_imagenet_shape_flops_match_the_bench_json():
    doc = json.loads((RESULTS / "zen3" / "preset_imagenet_fp16.json").read_text())
    p = P.plan(1_281_167, 1000, (64, 128, 256, 512), k=32, rates=fixed_rates(98.0), ram_bytes=1 << 36)
    assert p.selection["flops"] == doc["flops"] == 4 * 960 * 1000 * 1_281_167
    assert p.memory["mn_matrix_bytes_not_built"] / (1 << 20) == pytest.approx(doc["mn_matrix_mib"])
    assert p.disk["store_bytes"] == 1_281_167 * 1920 * 2 + 8 * 128 + 4096  # the preset store: ~4.6 GiB
    # memory beyond the mapped store: the run measured 19.7 MiB of anonymous RSS growth
    assert p.memory["anonymous_bytes"] / (1 << 20) == pytest.approx(doc["rows"][0]["peak_mib"], rel=0.3)


def test_gpu_plan_on_paper_is_labelled_an_assumption():
    p = P.plan(10_000_000, 50_000, (64, 128, 256, 512), device="cuda", gpus=8)
    assert p.inputs["world"] == 8 and p.sharding["rows_per_rank"] == 1_250_000
    assert p.backend == "triton" and not p.rates["measured"]
    assert "ASSUMPTION" in p.rates["description"] and any("ASSUMPTION" in n for n in p.notes)
    s = p.selection
    assert s["flops_per_rank"] == 4 * 960 * 50_000 * 1_250_000
    assert s["compute_s"] == pytest.approx(s["flops_per_rank"] / (0.40 * 989e12))
    assert s["rerank_s"] > 0 and p.seconds == pytest.approx(s["compute_s"] + s["rerank_s"] + s["merge_s"])
    assert p.memory["fits_gpu"] and p.memory["gpu"]["pool_shard_resident"] == 1_250_000 * 1920 * 2
    assert "ASSUMED" in p.format()
    assert P.plan(10_000_000, 1000, (64,), k=200, device="auto", gpus=8).backend == "cuda"
    assert P.plan(10_000_000, 1000, (64,), k=2000, device="cuda", gpus=8).backend == "torch"
    big = P.plan(1_000_000_000, 1000, (64, 128, 256, 512), device="cuda", gpus=1)
    assert not big.memory["fits_gpu"] and big.sharding["min_world_to_fit"] > 40


def test_measured_gpu_rates_replace_the_assumption():
    bench = {"args": {"M": 5000, "N": 200000, "widths": [64, 128, 256, 512], "k": 32, "dtype": "float16",
                      "device": "cuda", "combine": "product"},
             "machine": {"gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "sms": 132}},
             "date": "2026-12-01", "rows": [{"backend": "triton", "resolved": "triton", "seconds": 0.02,
                                             "gflops": 300_000.0, "recall": None}]}
    g = P.gpu_rates_from_bench(bench)
    assert g["measured"] == ["triton/float16"] and g["tflops"]["triton"]["float16"] == 300.0
    p = P.plan(1_281_167, 50_000, (64, 128, 256, 512), device="cuda", gpus=1, gpu_rates=g)
    assert p.rates["measured"] and "rerank_s" not in p.selection
    assert p.seconds == pytest.approx(4 * 960 * 50_000 * 1_281_167 / 300e12)
    assert not any("ASSUMPTION" in n for n in p.notes)
    assert not P.plan(1000, 10, (8,), dtype="float32", device="cuda", gpus=1, gpu_rates=g).rates["measured"]


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"n": -5}, "n"), ({"n": 2.5}, "n"), ({"n": True}, "n"),
    ({"m": 0}, "m"),
    ({"widths": ()}, "widths"), ({"widths": (64, 0)}, "widths"), ({"widths": (64, -1)}, "widths"),
    ({"widths": "64"}, "widths"), ({"widths": (64.0,)}, "widths"),
    ({"dtype": "int8"}, "dtype"), ({"dtype": "fp16"}, "dtype"),
    ({"world": 0}, "world"), ({"world": 1.5}, "world"), ({"world": 101}, "world"),
    ({"k": 0}, "k"), ({"k": 101}, "k"),
    ({"device": "tpu"}, "device"), ({"gpus": -1}, "gpus"), ({"gpus": 2}, "gpus"),
    ({"device": "cuda", "gpus": 2, "world": 3}, "world"),
    ({"combine": "max"}, "combine"), ({"disk_gbps": 0}, "disk_gbps"), ({"extract_rate": -1.0}, "extract_rate"),
    ({"classes": 0}, "classes"),
])
def test_bad_inputs_raise_naming_the_argument(kwargs, name):
    args = {"n": 100, "m": 10, "widths": (8, 16), "rates": fixed_rates()} | kwargs
    with pytest.raises(ValueError, match=rf"^{name}: "):
        P.plan(**args)


# ----------------------------------------------------------------------------- calibration cache

def test_fit_recovers_rate_and_pack_cost(fake_probe, tmp_path):
    rates = P.calibrate(cache_dir=tmp_path)
    for dt in ("float32", "float16"):
        assert rates.gflops[dt] == pytest.approx(R_TRUE[dt], rel=1e-9)
        assert rates.pack_ns[dt] == pytest.approx(C_TRUE[dt], rel=1e-6)
    assert rates.source == "measured" and rates.key == P.cache_key()
    assert len(fake_probe) == 4


def test_cache_round_trip(fake_probe, tmp_path):
    first = P.calibrate(cache_dir=tmp_path)
    path = P.cache_path(P.cache_key(), tmp_path)
    assert path.is_file() and path.parent == tmp_path / "plan"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    doc = json.loads(path.read_text())
    assert doc["schema"] == P.SCHEMA and doc["key"] == P.cache_key()
    calls = len(fake_probe)
    again = P.calibrate(cache_dir=tmp_path)
    assert len(fake_probe) == calls  # nothing measured
    assert again.source.startswith("cached") and again.gflops == first.gflops and again.pack_ns == first.pack_ns
    P.calibrate(cache_dir=tmp_path, force=True)
    assert len(fake_probe) == 2 * calls


def test_key_mismatch_recalibrates(fake_probe, tmp_path, monkeypatch):
    P.calibrate(cache_dir=tmp_path, threads=1)
    n = len(fake_probe)
    P.calibrate(cache_dir=tmp_path, threads=2)  # another thread count: another key
    assert len(fake_probe) == 2 * n
    monkeypatch.setattr(P, "_build_id", lambda: "rebuilt-kernel")  # same version, another build
    P.calibrate(cache_dir=tmp_path, threads=1)
    assert len(fake_probe) == 3 * n
    # a file at the right path whose key says another machine: ignored, measured again, replaced
    key = P.cache_key(1)
    path = P.cache_path(key, tmp_path)
    doc = json.loads(path.read_text())
    doc["key"]["cpu"] = doc["rates"]["key"]["cpu"] = "some other CPU"
    path.write_text(json.dumps(doc))
    rates = P.calibrate(cache_dir=tmp_path, threads=1)
    assert len(fake_probe) == 4 * n and rates.source == "measured"
    assert json.loads(path.read_text())["key"] == key


@pytest.mark.parametrize("content", [
    b"", b"{", b"\x80\x03}q\x00.", b"[1, 2, 3]", b"null", b'"text"',
    "pickle",  # a pickled object where JSON should be: never unpickled
    "nan_rate", "negative_rate", "missing_field", "extra_field", "wrong_schema", "bool_threads",
])
def test_corrupt_or_foreign_cache_recalibrates(fake_probe, tmp_path, content):
    P.calibrate(cache_dir=tmp_path)
    path = P.cache_path(P.cache_key(), tmp_path)
    good = json.loads(path.read_text())
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"schema": P.SCHEMA}))
    else:
        doc = json.loads(json.dumps(good))
        if content == "nan_rate":
            doc["rates"]["gflops"]["float32"] = float("nan")
        elif content == "negative_rate":
            doc["rates"]["gflops"]["float16"] = -3.0
        elif content == "missing_field":
            del doc["rates"]["pack_ns"]
        elif content == "extra_field":
            doc["rates"]["exec"] = "import os"
        elif content == "wrong_schema":
            doc["schema"] = "someone.else/9"
        elif content == "bool_threads":
            doc["rates"]["threads"] = True
        path.write_text(json.dumps(doc))  # NaN is written as the bare token NaN
    n = len(fake_probe)
    rates = P.calibrate(cache_dir=tmp_path)
    assert len(fake_probe) == 2 * n and rates.source == "measured"
    assert json.loads(path.read_text())["rates"]["gflops"] == good["rates"]["gflops"]  # rewritten, valid


def test_unwritable_cache_warns_and_still_returns_rates(fake_probe, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not cache"):
        rates = P.calibrate(cache_dir=blocker)
    assert rates.gflops["float32"] == pytest.approx(R_TRUE["float32"])


def test_rates_measured_on_a_busy_machine_are_not_cached(fake_probe, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_loadavg", lambda: 4.0 * (P.os.cpu_count() or 1))
    with pytest.warns(UserWarning, match="load average .* not cached"):
        rates = P.calibrate(cache_dir=tmp_path)
    assert not (tmp_path / "plan").exists()
    p = P.plan(10_000, 10, (8,), rates=rates)
    assert any("may be pessimistic" in n for n in p.notes)
    monkeypatch.setattr(P, "_loadavg", lambda: 0.0)
    assert P.busy(P.calibrate(cache_dir=tmp_path)) is None
    assert P.cache_path(P.cache_key(), tmp_path).is_file()


def test_calibrate_refuses_a_gpu():
    with pytest.raises(ValueError, match="^device: "):
        P.calibrate("cuda")


def test_default_cache_dir_follows_pyfk_cache_dir(fake_probe, tmp_path, monkeypatch):
    monkeypatch.setenv("PYFK_CACHE_DIR", str(tmp_path))
    P.calibrate()
    assert P.cache_path(P.cache_key()).parent == tmp_path / "plan"
    assert len(list((tmp_path / "plan").glob("rates-*.json"))) == 1


def test_real_probe_smoke(tmp_path, monkeypatch):
    """The real timing path on a tiny shape (well under 2 s)."""
    monkeypatch.setitem(P._PROBE, "m", (16, 48))
    monkeypatch.setitem(P._PROBE, "n", 2048)
    monkeypatch.setitem(P._PROBE, "n_per_thread", 1024)
    monkeypatch.setitem(P._PROBE, "n_max", 4096)
    monkeypatch.setitem(P._PROBE, "widths", (16, 32))
    monkeypatch.setitem(P._PROBE, "repeats", 1)
    monkeypatch.setattr(P, "_loadavg", lambda: 0.0)
    t0 = time.perf_counter()
    rates = P.calibrate(cache_dir=tmp_path, threads=1)
    assert time.perf_counter() - t0 < 2.0
    assert set(rates.gflops) == {"float32", "float16"}
    assert all(v > 0 and math.isfinite(v) for v in rates.gflops.values())
    assert all(v >= 0 for v in rates.pack_ns.values())
    p = P.plan(100_000, 100, (16, 32), rates=rates)
    assert p.seconds > 0 and json.loads(json.dumps(p.to_dict()))["backend"] == rates.backend
    narrow = P.plan(100_000, 100, (8, 8), rates=rates)
    assert any("narrower scales" in n for n in narrow.notes)


# ----------------------------------------------------------------------------- check against a run

def synthetic_bench(seconds, dtype="float16", threads=2):
    return {"args": {"M": 1000, "N": 1_281_167, "widths": [64, 128, 256, 512], "k": 32, "combine": "product",
                     "dtype": dtype, "device": "cpu"},
            "date": "2026-12-01T00:00:00+00:00", "machine": {"cpu": "test", "isa": "avx2", "torch_threads": threads},
            "rows": [{"backend": "cpu", "resolved": "cpu", "seconds": seconds, "isa": "avx2", "threads": threads,
                      "gflops": 4 * 960 * 1000 * 1_281_167 / seconds / 1e9, "scaled": False}]}


def test_check_against_synthetic_run():
    rates = fixed_rates(gflops=100.0)
    predicted = 4 * 960 * 1000 * 1_281_167 / 100e9
    for measured, within in ((predicted, True), (predicted / 1.29, True), (predicted * 1.29, True),
                             (predicted / 1.35, False), (predicted * 1.5, False)):
        res = P.check_against(synthetic_bench(measured), rates)
        assert res["predicted_s"] == pytest.approx(predicted)
        assert res["ratio"] == pytest.approx(predicted / measured)
        assert res["within"] is within
    text = P.format_check(res)
    assert "OUTSIDE" in text and "ratio 0.67" in text
    mismatch = P.check_against(synthetic_bench(predicted, threads=4), rates)
    assert any("4 threads" in n for n in mismatch["notes"])


def test_check_against_rejects_what_is_not_a_bench_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="^bench: "):
        P.check_against(bad, fixed_rates())
    with pytest.raises(ValueError, match="^bench: cannot read"):
        P.check_against(tmp_path / "missing.json", fixed_rates())
    doc = synthetic_bench(10.0)
    doc["rows"][0]["backend"] = doc["rows"][0]["resolved"] = "torch"
    with pytest.raises(ValueError, match="no timed row of backend 'cpu'"):
        P.check_against(doc, fixed_rates())


def test_small_run_rate_predicts_the_measured_imagenet_run():
    """The rate of an in-memory M=1000 x N=50,000 fp32 run on the AVX2 Zen 3 (refactor_zen3) predicts
    the ImageNet-shaped fp16 store run on the same machine (50.1 s) within +-30%."""
    rates = P.Rates.from_bench(RESULTS / "refactor_zen3" / "post_default_2.json")
    assert rates.threads == 2 and rates.key["isa"] == "avx2"
    res = P.check_against(RESULTS / "zen3" / "preset_imagenet_fp16.json", rates)
    assert res["measured_s"] == pytest.approx(50.1, abs=0.05)
    assert res["within"], P.format_check(res)
    assert any("float16 pools were not calibrated" in n for n in res["notes"])


# ----------------------------------------------------------------------------- command line

def test_command_line_plan_and_check(fake_probe, tmp_path, capsys):
    assert P.main(["--N", "1281167", "--M", "1000", "--cache-dir", str(tmp_path), "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "cpu" and doc["inputs"]["n"] == 1_281_167
    assert doc["selection"]["rate_gflops"] == pytest.approx(R_TRUE["float16"])
    assert P.main(["--preset", "imagenet", "--cache-dir", str(tmp_path), "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "selection time" in out and "NOT built" in out
    assert json.loads((tmp_path / "p.json").read_text())["inputs"]["m"] == 1000
    assert P.main(["--gpus", "8", "--N", "10000000", "--M", "50000"]) == 0
    assert "ASSUMED" in capsys.readouterr().out
    assert P.main(["--preset", "imagenet", "--M", "50000", "--gpus", "1", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["m"] == 50_000 and doc["inputs"]["n"] == 1_281_167 and doc["backend"] == "triton"
    rates_json = tmp_path / "rates.json"
    rates_json.write_text(json.dumps(synthetic_bench(50.0, dtype="float16")))
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(synthetic_bench(55.0)))
    assert P.main(["--check-json", str(run_json), "--rates-json", str(rates_json)]) == 0
    assert "within" in capsys.readouterr().out
    run_json.write_text(json.dumps(synthetic_bench(100.0)))
    assert P.main(["--check-json", str(run_json), "--rates-json", str(rates_json)]) == 1
    assert P.main(["--M", "10"]) == 2
    assert "--N: the pool size is required" in capsys.readouterr().err
    assert P.main(["--N", "10", "--k", "32", "--cache-dir", str(tmp_path)]) == 2
    assert "k: expected" in capsys.readouterr().err
