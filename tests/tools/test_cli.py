"""`pyfk extract` / `pyfk bench-extract` end to end, plus pyfk.models and pyfk.imagedata."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import pyfk
from pyfk.al.imagedata import ImageFolderDataset, TensorFileDataset
from pyfk.al.models import LeNet, ResNet18, default_layers
from pyfk.cli import main
from pyfk.features.store import DescriptorStore

PIL = pytest.importorskip("PIL.Image")

LENET_WIDTHS = [20, 50, 500]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """2 classes x 3 RGB 8x8 PNGs (plus a non-image file that must be skipped)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(3):
            PIL.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 2-class RGB LeNet saved whole, and a 1-channel LeNet's state_dict."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    rgb = LeNet(classes=2, in_channels=3)
    torch.save(rgb, d / "whole.pt")
    gray = LeNet(classes=3, in_channels=1)
    torch.save(gray.state_dict(), d / "state.pt")
    return {"whole": str(d / "whole.pt"), "state": str(d / "state.pt"), "gray": gray}


@pytest.fixture(scope="module")
def tensor_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(10, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (10,), generator=gen)
    ids = torch.arange(100, 110)
    torch.save({"x": x, "y": y, "ids": ids}, d / "pool.pt")
    np.savez(d / "pool.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "unlabeled.npz", x=x.numpy())
    return {"pt": str(d / "pool.pt"), "npz": str(d / "pool.npz"), "unlabeled": str(d / "unlabeled.npz"),
            "x": x, "y": y, "ids": ids}


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def open_store(path):
    return DescriptorStore.open(str(path), "r")


# ----------------------------------------------------------------------------- pyfk extract

def test_extract_image_folder_whole_module_and_rerun(image_folder, checkpoints, tmp_path, capsys):
    out = tmp_path / "pool.pfk"
    argv = ["extract", "--model", checkpoints["whole"], "--trust-checkpoint", "--data", image_folder, "--out", out,
            "--batch-size", 4]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    assert "6 rows" in stdout and "conv1 (20)" in stdout and "images/s" in stdout
    store = open_store(out)
    assert store.complete and store.n == 6
    assert [store.array(f"z{j}").shape[1] for j in range(3)] == LENET_WIDTHS  # default LeNet layers
    assert [store.array(f"g{j}").shape[1] for j in range(3)] == LENET_WIDTHS
    assert store.array("z0").dtype == np.float16
    assert store.rows("labels").tolist() == [0, 0, 0, 1, 1, 1]
    assert store.rows("ids").tolist() == list(range(6))
    assert store.meta["extract"]["layers"] == default_layers("lenet")
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    store.close()

    rc, stdout, _ = run(argv, capsys)  # a complete store: nothing to do, nothing rewritten
    assert rc == 0 and "already complete" in stdout
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == stamps


def test_extract_tensor_file_state_dict_matches_api(tensor_file, checkpoints, tmp_path, capsys):
    out = tmp_path / "pool.pfk"
    rc, stdout, err = run(["extract", "--model", checkpoints["state"], "--arch", "lenet", "--data", tensor_file["pt"],
                           "--out", out, "--layers", "conv1,fc1", "--projection", 16, "--with-true", "--badge",
                           "--dtype", "float32", "--batch-size", 4, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "fc1 (16)" in stdout and "accuracy" in stdout
    store = open_store(out)
    assert store.complete and store.n == 10
    assert {"z0", "z1", "g0", "g1", "g_true0", "g_true1", "badge_h0", "badge_e0"} <= set(store.names)
    assert store.rows("ids").tolist() == tensor_file["ids"].tolist()
    assert store.rows("labels").tolist() == tensor_file["y"].tolist()

    loader = DataLoader(TensorFileDataset(tensor_file["pt"]), batch_size=4)
    want = pyfk.extract(checkpoints["gray"], loader, ["conv1", "fc1"], projection=16, with_true=True, badge=True)
    got = store.descriptors()
    for a, b in zip(got.z + got.g, want.descriptors.z + want.descriptors.g):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.rows("pred"), want.pred)


def test_extract_resumes_an_interrupted_store(tensor_file, checkpoints, tmp_path, capsys):
    out = tmp_path / "pool.pfk"
    argv = ["extract", "--model", checkpoints["state"], "--arch", "lenet", "--data", tensor_file["npz"],
            "--out", out, "--batch-size", 4, "--dtype", "float32"]
    assert run(argv, capsys)[0] == 0
    full = {k: np.array(open_store(out).rows(k)) for k in ("z0", "g2", "probs")}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(rows_done=4, complete=False)  # as if killed after the first batch
    (out / "manifest.json").write_text(json.dumps(manifest))
    with DescriptorStore.open(str(out), "r+") as store:  # scribble over the uncommitted rows
        store.array("z0")[4:] = 0

    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    assert "resumed at row 4" in stdout and "6 images" in stdout
    store = open_store(out)
    assert store.complete
    for k, v in full.items():
        np.testing.assert_array_equal(store.rows(k), v)
    assert store.rows("labels").tolist() == tensor_file["y"].tolist()
    assert store.rows("ids").tolist() == list(range(10))  # no 'ids' in the .npz: row numbers


@pytest.mark.parametrize("case", ["missing_checkpoint", "unknown_layer", "unknown_arch", "state_dict_without_arch",
                                  "missing_data", "labels_needed", "changed_settings"])
def test_extract_errors_exit_2_with_one_line(case, image_folder, tensor_file, checkpoints, tmp_path, capsys):
    out = tmp_path / "pool.pfk"
    base = ["--data", tensor_file["npz"], "--out", out]
    argv, expect = {
        "missing_checkpoint": (["--model", tmp_path / "nope.pt"] + base, "no such file"),
        "unknown_layer": (["--model", checkpoints["state"], "--arch", "lenet", "--layers", "conv1,conv9"] + base,
                          "no module named 'conv9'"),
        "unknown_arch": (["--model", checkpoints["state"], "--arch", "vgg99"] + base, "unknown architecture"),
        "state_dict_without_arch": (["--model", checkpoints["state"]] + base, "--arch"),
        "missing_data": (["--model", checkpoints["whole"], "--data", tmp_path / "none", "--out", out], "none"),
        "labels_needed": (["--model", checkpoints["state"], "--arch", "lenet", "--data", tensor_file["unlabeled"],
                           "--out", out, "--pseudo-label", "true"], "has no labels"),
        "changed_settings": (["--model", checkpoints["whole"], "--trust-checkpoint", "--data", image_folder,
                              "--out", out], "--overwrite"),
    }[case]
    if case == "changed_settings":
        assert run(["extract", *argv, "--layers", "conv1"], capsys)[0] == 0
    rc, stdout, err = run(["extract", *argv], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyfk extract: error:") and expect in lines[0], err
    assert "Traceback" not in err
    if case != "changed_settings":
        assert not out.exists()  # nothing written


def test_extract_help_subprocess():
    res = subprocess.run([sys.executable, "-m", "pyfk", "extract", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--model", "--arch", "--data", "--out", "--layers", "--pseudo-label", "--overwrite"):
        assert flag in res.stdout


def test_every_subcommand_has_help(capsys):
    for cmd in ("bench", "backends", "extract", "bench-extract", "select", "plan"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: pyfk " + cmd in capsys.readouterr().out


# ----------------------------------------------------------------------------- pyfk bench-extract

def test_bench_extract_runs(tmp_path, capsys):
    path = tmp_path / "b.json"
    rc, stdout, err = run(["bench-extract", "--model", "lenet", "--n", 64, "--batch-size", 32, "--repeats", 1,
                           "--json", path], capsys)
    assert rc == 0, err
    assert "extract / plain fwd+bwd" in stdout and "images/s" in stdout
    result = json.loads(path.read_text())
    assert result["args"]["n"] == 64 and result["ratio_extract_plain"] > 0
    assert [r["method"] for r in result["rows"]] == ["extract", "plain", "forward"]


# ----------------------------------------------------------------------------- models and data

def test_models_shapes_and_layers():
    lenet = LeNet(classes=7, in_channels=1).eval()
    assert lenet(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert LeNet(in_channels=3)(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    net = ResNet18(classes=5, width=4).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    names = dict(net.named_modules())
    assert all(n in names for n in default_layers("resnet18") + ["conv1", "bn1", "fc", "layer2.0.downsample"])
    assert all(n in dict(lenet.named_modules()) for n in default_layers("lenet") + ["fc2"])
    with pytest.raises(ValueError, match="vgg"):
        default_layers("vgg")


def test_image_folder_dataset(image_folder, tmp_path):
    ds = ImageFolderDataset(image_folder, size=(6, 5), grayscale=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    x, label, index = ds[4]
    assert x.shape == (1, 6, 5) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert (label, index) == (1, 4)
    assert ImageFolderDataset(image_folder)[0][0].shape == (3, 8, 8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "empty" / "a")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")


def test_tensor_file_dataset_errors(tmp_path):
    ds = TensorFileDataset(_save(tmp_path / "u8.pt", x=torch.full((3, 1, 2, 2), 255, dtype=torch.uint8)))
    x, y, i = ds[2]
    assert x.dtype == torch.float32 and float(x.max()) == 1.0 and (y, i) == (-1, 2) and not ds.has_labels
    with pytest.raises(ValueError, match=r"missing key 'x'.*images"):
        TensorFileDataset(_save(tmp_path / "a.pt", images=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="'x' has 3 examples but 'y'"):
        TensorFileDataset(_save(tmp_path / "b.pt", x=torch.zeros(3, 2), y=torch.zeros(2, dtype=torch.long)))
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 2)), ids=np.arange(4))
    with pytest.raises(ValueError, match="c.npz.*'ids'"):
        TensorFileDataset(tmp_path / "c.npz")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        TensorFileDataset(tmp_path / "nothing.pt")


def _save(path, **tensors):
    torch.save(tensors, path)
    return path


def test_extract_layers_auto(tensor_file, checkpoints, tmp_path, capsys):
    """--layers auto: pyfk.extract's rule picks the layers; the summary line names them and the
    store records them (the same as pyfk.extract(layers="auto") through the API)."""
    out = tmp_path / "auto.pfk"
    rc, stdout, err = run(["extract", "--model", checkpoints["state"], "--arch", "lenet", "--data", tensor_file["pt"],
                           "--out", out, "--layers", "auto", "--dtype", "float32", "--device", "cpu"], capsys)
    assert rc == 0, err
    chosen = open_store(out).meta["extract"]["layers"]
    loader = DataLoader(TensorFileDataset(tensor_file["pt"]), batch_size=128)
    assert chosen == pyfk.extract(checkpoints["gray"], loader, "auto").meta["layers"]
    assert chosen and all(f"{name} (" in stdout for name in chosen)
