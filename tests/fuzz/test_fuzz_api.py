"""Property-based fuzzer over the public API (issue 9, "Tests", first bullet; DESIGN.md
section 7): pyfk.Descriptors, topk, similarity, select, acquire, extract and
DescriptorStore.open on bad and borderline inputs.

Every case either returns a result that matches the float64 NumPy oracle
(tests/oracle.py, pyfk.testing.assert_topk_valid) or raises ValueError/TypeError whose
message names the offending argument; never another exception type, never a crash, and
its inputs are left unchanged.

* tests/fuzz/fuzz_cases.py: a registry of named inputs (at least 150 bad ones; counted
  below), one test per case. They all run in one worker subprocess
  (tests/fuzz/fuzz_worker.py, address space capped), restarted after a crash or a hang,
  so a segfault in the C++ kernel or a runaway allocation fails that case, not pytest.
* tests/fuzz/fuzz_props.py: hypothesis properties (random valid inputs against the
  oracle; random bad arrays, index sets, scalars and store corruptions), each run in its
  own subprocess with deterministic settings (derandomize=True, no example database).

Reproduce one registry case in-process:
    python -c "from tests.fuzz.fuzz_cases import REGISTRY as R; from tests.fuzz.fuzz_core import evaluate, \\
               format_failure; import types, tempfile; \\
               print(format_failure(evaluate(R['topk/k=0'], types.SimpleNamespace(dir=tempfile.mkdtemp()))))"
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fuzz.fuzz_cases import REGISTRY, bad_cases
from tests.fuzz.fuzz_core import format_failure
from tests.fuzz.fuzz_worker import MARK

ROOT = Path(__file__).resolve().parents[2]
CASE_TIMEOUT_S = 60
PROP_TIMEOUT_S = 300
MIN_BAD_INPUTS = 150
PROPERTIES = ["prop_topk_and_similarity_match_oracle", "prop_extreme_values_correct_or_refused",
              "prop_bad_arrays_are_named", "prop_index_sets", "prop_scalar_arguments",
              "prop_select_exact_rank_major", "prop_uncertainty_strategies", "prop_store_corruption"]


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a crash prints the Python stack to stderr
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_registry(names: list[str], tmp: Path, timeout_s: float = CASE_TIMEOUT_S, **env) -> dict[str, dict]:
    """Run the named cases in worker subprocesses; one result dict per case. A worker that
    dies (signal, abort) or stops answering is replaced and the remaining cases go on."""
    results: dict[str, dict] = {}
    todo = list(names)
    attempt = 0
    while todo:
        attempt += 1
        err_path = tmp / f"worker{attempt}.stderr"
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.fuzz_worker", "cases", str(tmp), *todo],
                                    cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=err, text=True)
            lines: queue.Queue = queue.Queue()

            def pump(stream=proc.stdout, q=lines):
                for line in stream:
                    q.put(line)
                q.put(None)
            threading.Thread(target=pump, daemon=True).start()
            current, started = None, False
            while True:
                try:
                    line = lines.get(timeout=timeout_s)
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    victim = current if current is not None else todo[0]
                    results[victim] = {"name": victim, "ok": False, "problems": [
                        f"no answer within {timeout_s} s (hang or runaway work); worker killed"],
                        "what": "hung", "expected": "a prompt result or error", "detail": _tail(err_path)}
                    break
                if line is None:
                    rc = proc.wait()
                    if current is not None:
                        results[current] = {"name": current, "ok": False, "problems": [
                            f"the interpreter died (exit status {rc}: a crash, not an exception)"],
                            "what": f"process exited with {rc}", "expected": "ValueError/TypeError or a result",
                            "detail": _tail(err_path)}
                    elif not started:  # the worker could not even start: report it on every case
                        for name in todo:
                            results[name] = {"name": name, "ok": False, "problems": ["fuzz worker failed to start"],
                                             "what": f"exit status {rc}", "expected": "-", "detail": _tail(err_path)}
                    break
                if not line.startswith(MARK):
                    continue
                kind, payload = json.loads(line[len(MARK):])
                started = True
                if kind == "start":
                    current = payload
                else:
                    results[payload["name"]] = payload
                    current = None
        todo = [n for n in todo if n not in results]
    return results


@pytest.fixture(scope="module")
def registry_results(tmp_path_factory):
    t0 = time.perf_counter()
    res = run_registry(sorted(REGISTRY), tmp_path_factory.mktemp("fuzz"))
    res["__seconds__"] = time.perf_counter() - t0
    return res


def test_registry_counts_at_least_150_distinct_bad_inputs():
    bad = bad_cases()
    assert len(bad) == len(set(bad))
    assert len(bad) >= MIN_BAD_INPUTS, f"only {len(bad)} distinct bad inputs in tests/fuzz/fuzz_cases.py"
    apis = {REGISTRY[n].api for n in bad}
    assert apis >= {"Descriptors", "topk", "similarity", "select", "acquire", "extract", "DescriptorStore.open"}


def test_harness_survives_a_segfault_and_a_hang(tmp_path):
    """The worker dies on a segfault and hangs on a sleep: both cases fail, the cases
    after them still run in a fresh worker, and pytest lives on."""
    names = ["topk/k=0", "selftest/segfault", "topk/k-ok=1", "selftest/hang"]
    res = run_registry(names, tmp_path, timeout_s=10, PYFK_FUZZ_SELFTEST="1")
    assert not res["selftest/segfault"]["ok"] and "died" in res["selftest/segfault"]["problems"][0]
    assert not res["selftest/hang"]["ok"] and "no answer" in res["selftest/hang"]["problems"][0]
    assert res["topk/k=0"]["ok"] and res["topk/k-ok=1"]["ok"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_case(name, registry_results):
    res = registry_results[name]
    if not res["ok"]:
        pytest.fail(format_failure(res), pytrace=False)


@pytest.mark.parametrize("prop", PROPERTIES)
def test_property(prop):
    try:
        out = subprocess.run([sys.executable, "-m", "tests.fuzz.fuzz_worker", "prop", prop], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=PROP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{prop}: no answer within {PROP_TIMEOUT_S} s\n{(exc.stdout or '')[-3000:]}", pytrace=False)
    if out.returncode != 0:
        what = "crashed the interpreter" if out.returncode < 0 else "found a counterexample"
        pytest.fail(f"{prop} {what} (exit status {out.returncode}):\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}",
                    pytrace=False)
