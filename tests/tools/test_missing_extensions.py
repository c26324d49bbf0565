"""`import pyfk` survives missing compiled extensions, and pyfk.backends() says why, truthfully."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_without_compiled_extensions(tmp_path):
    # a copy of the Python sources only: no pyfk._C, no pyfk._C_cuda
    shutil.copytree(ROOT / "pyfk", tmp_path / "pyfk", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # drop an editable install's import hook, which would find the built modules beside the sources
    code = ("import sys, json; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "(getattr(f, '__module__', '') or '') + type(f).__name__ + repr(f)]; import pyfk; "
            "print(json.dumps({b['name']: b for b in pyfk.backends()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "", "PYTHONPATH": str(tmp_path)})
    listed = json.loads(out.stdout)
    for name, module in (("cpu", "pyfk._C"), ("cuda", "pyfk._C_cuda")):
        reason = listed[name]["reason"]
        assert not listed[name]["available"]
        assert f"No module named '{module}'" in reason, reason
        assert "circular" not in reason and "partially initialized" not in reason, reason
    assert listed["torch"]["available"]
