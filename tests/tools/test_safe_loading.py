"""pyfk never executes code from a data file (issue 9, item 1; DESIGN.md section 7).

Every crafted file below carries a pickle whose __reduce__ would create a marker file
when unpickled; each test asserts the load is refused with a clear error and that the
marker never appears. Genuine files of the same kinds still load.
"""

import builtins
import os
import pickle
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyfk.al import data
from pyfk.al.imagedata import TensorFileDataset, load_dataset
from pyfk.al.models import LeNet
from pyfk.cli import main
from pyfk.features.store import DescriptorStore

PAYLOADS = ("system", "exec")


class _Plant:
    """Unpickling this runs code: os.system("touch MARKER") or exec("open(MARKER, 'w')")."""

    def __init__(self, marker, how="system"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def _refused_global(how):
    return r"(posix|nt)\.system" if how == "system" else r"(__builtin__|builtins)\.exec"


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "code from a crafted file ran"


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Records the weights_only argument of every torch.load call."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def _crafted_pt(path, marker, how, layout):
    bad = {"x": torch.zeros(4, 1, 8, 8), "y": _Plant(marker, how)}
    if layout == "zip":
        torch.save(bad, path)
    elif layout == "legacy":
        torch.save(bad, path, _use_new_zipfile_serialization=False)
    else:  # raw pickle bytes named .pt
        path.write_bytes(pickle.dumps(bad, protocol=2))
    return path


def _extract(argv, capsys):
    rc = main(["extract", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyfk extract: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def state_dict_ckpt(tmp_path):
    torch.manual_seed(0)
    model = LeNet(classes=3, in_channels=1)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def pool_pt(tmp_path, rng):
    path = tmp_path / "pool.pt"
    torch.save({"x": torch.from_numpy(rng.random((6, 1, 8, 8), dtype=np.float32)),
                "y": torch.from_numpy(rng.integers(0, 3, 6))}, path)
    return path


# ----------------------------------------------------------------------------- tensor files (.pt / .npz)

@pytest.mark.parametrize("layout", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("how", PAYLOADS)
def test_tensor_file_dataset_refuses_crafted_pt(tmp_path, marker, how, layout):
    path = _crafted_pt(tmp_path / "crafted.pt", marker, how, layout)
    with pytest.raises(ValueError) as exc:
        TensorFileDataset(path)
    message = str(exc.value)
    assert str(path) in message and "weights_only=True" in message
    assert re.search(_refused_global(how), message), message
    with pytest.raises(ValueError, match="crafted.pt"):
        load_dataset(path)


def test_tensor_file_with_numpy_arrays_loads_weights_only(tmp_path, rng, torch_load_calls):
    x = rng.integers(0, 256, (5, 1, 4, 4)).astype(np.uint8)
    y = rng.integers(0, 10, 5)
    torch.save({"x": x, "y": y, "ids": np.arange(10, 15)}, tmp_path / "np.pt")
    ds = TensorFileDataset(tmp_path / "np.pt")
    np.testing.assert_allclose(ds.x.numpy(), x / np.float32(255), rtol=1e-6)
    assert ds.y.tolist() == y.tolist() and ds.ids.tolist() == list(range(10, 15))
    assert torch_load_calls and all(w is True for w in torch_load_calls), torch_load_calls


def test_npz_object_array_is_refused(tmp_path, marker):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, _Plant(marker)], dtype=object), y=np.arange(2))
    with pytest.raises(ValueError, match=r"obj\.npz: 'x' holds an object array.*allow_pickle=False"):
        TensorFileDataset(tmp_path / "obj.npz")
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"x": _Plant(marker)}))  # a pickle named .npz
    with pytest.raises(ValueError, match=r"pickle\.npz: holds pickled data.*allow_pickle=False"):
        TensorFileDataset(tmp_path / "pickle.npz")


# ----------------------------------------------------------------------------- pyfk extract --data

@pytest.mark.parametrize("how", PAYLOADS)
def test_extract_refuses_crafted_data_file(tmp_path, marker, how, state_dict_ckpt, capsys):
    data_path = _crafted_pt(tmp_path / "x.pt", marker, how, "zip")
    out = tmp_path / "out.pfk"
    rc, _, err = _extract(["--model", state_dict_ckpt[0], "--arch", "lenet", "--data", data_path, "--out", out],
                          capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert str(data_path) in line and "not loaded" in line and "weights_only=True" in line, line
    assert not out.exists()


def test_extract_refuses_crafted_data_file_subprocess(tmp_path, marker, state_dict_ckpt):
    data_path = _crafted_pt(tmp_path / "x.pt", marker, "system", "raw")
    res = subprocess.run([sys.executable, "-m", "pyfk", "extract", "--model", str(state_dict_ckpt[0]), "--arch",
                          "lenet", "--data", str(data_path), "--out", str(tmp_path / "out.pfk")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("pyfk extract: error:") and str(data_path) in line and "system" in line, res.stderr


# ----------------------------------------------------------------------------- pyfk extract --model

def test_extract_refuses_whole_module_checkpoint_without_opt_in(tmp_path, marker, pool_pt, capsys):
    model = LeNet(classes=2, in_channels=1)
    model.payload = _Plant(marker)  # a whole pickled module carrying a payload
    torch.save(model, tmp_path / "whole.pt")
    out = tmp_path / "out.pfk"
    rc, _, err = _extract(["--model", tmp_path / "whole.pt", "--data", pool_pt, "--out", out], capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert "whole.pt" in line and "nn.Module" in line and "execute arbitrary code" in line, line
    assert "--trust-checkpoint" in line and "state_dict" in line, line
    assert not out.exists()


def test_extract_refuses_checkpoint_dict_with_a_payload(tmp_path, marker, pool_pt, state_dict_ckpt, capsys):
    sd = torch.load(state_dict_ckpt[0], weights_only=True)
    torch.save({"state_dict": sd, "epoch": 3, "extra": _Plant(marker, "exec")}, tmp_path / "ckpt.pt")
    rc, _, err = _extract(["--model", tmp_path / "ckpt.pt", "--arch", "lenet", "--data", pool_pt,
                           "--out", tmp_path / "out.pfk"], capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert "ckpt.pt" in line and "builtins.exec" in line and "--trust-checkpoint" in line, line


def test_extract_whole_module_with_trust_checkpoint(tmp_path, pool_pt, capsys):
    torch.manual_seed(0)
    torch.save(LeNet(classes=2, in_channels=1), tmp_path / "whole.pt")
    out = tmp_path / "out.pfk"
    rc, stdout, err = _extract(["--model", tmp_path / "whole.pt", "--trust-checkpoint", "--data", pool_pt,
                                "--out", out, "--batch-size", 4], capsys)
    assert rc == 0, err
    assert "6 rows" in stdout and "conv1 (20)" in stdout
    with DescriptorStore.open(str(out), "r") as store:
        assert store.complete and store.n == 6


def test_extract_state_dict_loads_weights_only_without_flag(tmp_path, pool_pt, state_dict_ckpt, torch_load_calls,
                                                             capsys):
    out = tmp_path / "out.pfk"
    rc, stdout, err = _extract(["--model", state_dict_ckpt[0], "--arch", "lenet", "--data", pool_pt, "--out", out,
                                "--batch-size", 4], capsys)
    assert rc == 0, err
    assert "6 rows" in stdout
    assert torch_load_calls and all(w is True for w in torch_load_calls), torch_load_calls


def test_trust_checkpoint_help_says_it_runs_code(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--trust-checkpoint ")
    help_text = text[start:start + 300].lower()
    assert "unpickles" in help_text and "arbitrary code" in help_text, help_text


# ----------------------------------------------------------------------------- CIFAR-10 python batches

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_root(tmp_path, rng, bytes_keys=True, protocol=4, first=None):
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    xs, ys = [], []
    for name in BATCHES:
        x = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
        y = rng.integers(0, 10, 3).tolist()
        batch = {b"batch_label": b"training batch", b"data": x, b"labels": y, b"filenames": [b"a.png"] * 3}
        if not bytes_keys:
            batch = {k.decode(): (v.decode() if isinstance(v, bytes) else v) for k, v in batch.items()}
        if first is not None and name == BATCHES[0]:
            batch.update(first)
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        xs.append(x)
        ys += y
    return root.parent, np.concatenate(xs), np.asarray(ys)


def test_genuine_cifar_batches_load(tmp_path, rng):
    # bytes keys (a Python 3 pickle.dump), str keys in protocol 2 (as Python 2 wrote the
    # official batches; bytes go through _codecs.encode) and protocol 0
    for keys, protocol in (("bytes", 4), ("str", 2), ("bytes", 0)):
        root, x, y = _cifar_root(tmp_path / f"{keys}{protocol}", rng, bytes_keys=keys == "bytes", protocol=protocol)
        ds = data.load("cifar10", root=str(root))
        assert ds.x.shape == (18, 3, 32, 32) and ds.x.dtype == np.float32
        np.testing.assert_array_equal(np.rint(ds.x * 255).astype(np.uint8), x.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(ds.y, y)
        assert ds.y.dtype == np.int64 and ds.classes == 10


@pytest.mark.parametrize("how", PAYLOADS)
def test_crafted_cifar_batch_is_refused(tmp_path, rng, marker, how):
    root, _, _ = _cifar_root(tmp_path, rng, first={b"extra": _Plant(marker, how)})
    with pytest.raises(ValueError, match=r"data_batch_1: refused to unpickle the global " + _refused_global(how)):
        data.load("cifar10", root=str(root))


def test_cifar_batch_with_wrong_layout_names_the_file(tmp_path, rng):
    root, _, _ = _cifar_root(tmp_path, rng, first={b"data": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"data_batch_1: 'data' must be a uint8 array"):
        data.load("cifar10", root=str(root))
