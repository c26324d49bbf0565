"""What the runner tests share: comparing runs without their wall-clock fields, and a run
interrupted at an exact commit (the in-process stand-in for a kill; the SIGKILL test is
tests/al/test_resume.py)."""

import pytest

from pyfk import al

TIMING = ("train_seconds", "selection_seconds", "seconds")


def untimed(obj):
    """obj without wall-clock fields (at any depth, also the summary's selection_seconds_min/max)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not k.startswith(TIMING)}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def interrupted_run(monkeypatch, cfg, path, commits: int, **run_kw) -> None:
    """al.run(cfg, path) stopped by a KeyboardInterrupt inside its (commits + 1)-th round commit,
    after `commits` rounds were committed; Run.commit is restored afterwards."""
    original = al.Run.commit
    done = {"n": 0}

    def dying_commit(self, key, record):
        if done["n"] == commits:
            raise KeyboardInterrupt
        done["n"] += 1
        original(self, key, record)

    monkeypatch.setattr(al.Run, "commit", dying_commit)
    try:
        with pytest.raises(KeyboardInterrupt):
            al.run(cfg, str(path), **run_kw)
    finally:
        monkeypatch.setattr(al.Run, "commit", original)
