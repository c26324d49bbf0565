"""Subprocess entry for the fuzzer (a crash or a runaway allocation kills this process,
not pytest). Not a test module.

    python -m tests.fuzz.fuzz_worker cases TMPDIR NAME...   run registry cases, one JSON line each
    python -m tests.fuzz.fuzz_worker prop NAME              run one hypothesis property

Protocol (stdout): lines starting with MARK, then JSON ["start", name] before a case and
["result", {...}] after it, so the parent knows which case was running if the process dies.
The address space is capped (PYFK_FUZZ_MEM_GIB, default 8) so that an input that makes
pyfk allocate terabytes fails fast instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
import types

MARK = "@@FUZZ@@ "


def limit_memory() -> None:
    """Cap the address space, and write no core file into the repository on a crash."""
    gib = int(os.environ.get("PYFK_FUZZ_MEM_GIB", "8"))
    for limit, value in ((resource.RLIMIT_AS, gib << 30), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass


def emit(kind: str, payload) -> None:
    sys.__stdout__.write(MARK + json.dumps([kind, payload], default=str) + "\n")
    sys.__stdout__.flush()


def _selftest_cases(registry) -> None:
    """PYFK_FUZZ_SELFTEST=1: two cases that kill or hang the worker (the harness's own test)."""
    from tests.fuzz.fuzz_core import Call, Case

    def segfault(ctx):
        import ctypes
        return Call(lambda: ctypes.string_at(0))

    def hang(ctx):
        import time
        return Call(lambda: time.sleep(3600))
    registry["selftest/segfault"] = Case("selftest/segfault", "-", "raise", ("x",), segfault)
    registry["selftest/hang"] = Case("selftest/hang", "-", "raise", ("x",), hang)


def run_cases(tmpdir: str, names: list[str]) -> None:
    from tests.fuzz.fuzz_cases import REGISTRY
    from tests.fuzz.fuzz_core import evaluate

    if os.environ.get("PYFK_FUZZ_SELFTEST"):
        _selftest_cases(REGISTRY)

    for name in names:
        emit("start", name)
        d = os.path.join(tmpdir, f"c{sorted(REGISTRY).index(name)}")
        os.makedirs(d, exist_ok=True)
        res = evaluate(REGISTRY[name], types.SimpleNamespace(dir=d))
        emit("result", res)


def run_prop(name: str) -> int:
    from tests.fuzz import fuzz_props

    try:
        getattr(fuzz_props, name)()
    except BaseException:  # noqa: BLE001  (hypothesis' report, with its notes)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        return 1
    return 0


def main(argv: list[str]) -> int:
    limit_memory()
    if argv[0] == "cases":
        run_cases(argv[1], argv[2:])
        return 0
    if argv[0] == "prop":
        return run_prop(argv[1])
    raise SystemExit(f"usage: {__doc__}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
