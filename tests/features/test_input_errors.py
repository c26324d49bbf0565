"""Bad inputs to the features layer (issue 9, DESIGN.md section 7): each raises ValueError or
TypeError whose message names the argument, before any work or write, and changes nothing.
Regressions for what tests/fuzz found in DescriptorStore.open and pyfk.extract."""

import io
import json
import math
import os
import tokenize

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from torch.utils.data import DataLoader, TensorDataset

import pyfk
import pyfk.features.extract as extract_mod
import pyfk.features.store as store_mod
from pyfk.features.store import DescriptorStore
from tests.models import mlp

LAYERS = ["0", "2"]
N = 6


# ----------------------------------------------------------------------------- helpers

def _snapshot(root):
    """Every file and directory under `root` (or `root` itself), with its bytes."""
    root = str(root)
    if not os.path.isdir(root):
        with open(root, "rb") as f:
            return {root: f.read()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = "dir"
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


def _make_store(path, n=N):
    arrays = {"z0": ((4,), "float16"), "g0": ((4,), "float16"), "z1": ((3,), "float16"), "g1": ((3,), "float16")}
    store = DescriptorStore.create(path, n, arrays)
    rng = np.random.default_rng(0)
    store.write(0, {k: rng.standard_normal((n, *tail)).astype(dt) for k, (tail, dt) in arrays.items()})
    store.commit(n)
    store.close()
    return arrays


def _npy(header: dict, data: bytes) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _open_raises(path, exc, *needles, mode="r"):
    """DescriptorStore.open(path) raises `exc` whose message holds every needle; nothing changes."""
    before = _snapshot(os.path.dirname(str(path)))
    with pytest.raises(exc) as info:
        DescriptorStore.open(path, mode)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert _snapshot(os.path.dirname(str(path))) == before
    return msg


class _Counting(torch.nn.Module):
    """mlp() that counts its forward passes (none may run before an argument error)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


COUNTING_LAYERS = ["net.0", "net.2"]


def _batches(n=10, labels=None, batch=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 5, (n,), generator=g) if labels is None else labels
    return [(x[s:s + batch], y[s:s + batch]) for s in range(0, n, batch)]


def _loader(n=10, labels=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 5, (n,), generator=g) if labels is None else labels
    return DataLoader(TensorDataset(x, y), batch_size=4)


_DEFAULT = object()


def _extract_raises(exc, name, *, model=_DEFAULT, loader=_DEFAULT, layers=_DEFAULT, **kw):
    """pyfk.extract raises `exc` labelled `name: ...` before any forward pass, changing nothing."""
    model = _Counting() if model is _DEFAULT else model
    loader = _batches() if loader is _DEFAULT else loader
    layers = list(COUNTING_LAYERS) if layers is _DEFAULT else layers
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc) as info:
        pyfk.extract(model, loader, layers, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{name}: "), msg
    assert getattr(model, "calls", 0) == 0, "a batch ran before the argument error"
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    return msg


# ----------------------------------------------------------------------------- 1. corrupt .npy headers

def test_open_unbalanced_bracket_in_header_names_the_array_and_file(tmp_path):
    path = tmp_path / "store"
    _make_store(path)
    with open(path / "z0.npy", "r+b") as f:  # inside the header dict: tokenize.TokenError in numpy today
        f.seek(11)
        f.write(b"[")
    msg = _open_raises(path, ValueError, "array 'z0'", str(path / "z0.npy"))
    assert "header" in msg
    _open_raises(path, ValueError, "array 'z0'", "z0.npy", mode="r+")
    assert not (path / ".pyfk.lock").exists()  # the r+ lock was released


def test_open_header_shape_overflow_names_the_array(tmp_path):
    path = tmp_path / "store"
    arrays = _make_store(path)
    with open(path / "manifest.json") as f:
        m = json.load(f)
    big = 2**62  # (2**62, 4) float16: 2**65 bytes, wraps to 0 in int64 arithmetic
    m.update(n=big, rows_done=big)
    for spec in m["arrays"].values():
        spec["shape"][0] = big
    with open(path / "manifest.json", "w") as f:
        json.dump(m, f)
    for name, (tail, _) in arrays.items():
        with open(path / f"{name}.npy", "wb") as f:
            f.write(_npy({"descr": "<f2", "fortran_order": False, "shape": (big, *tail)}, b"\0" * 64))
    msg = _open_raises(path, ValueError, "array '", ".npy")
    assert "bytes" in msg and str(big) in msg


@pytest.mark.parametrize("error", [ValueError("bad"), SyntaxError("bad"), tokenize.TokenError("EOF", (1, 0)),
                                   OverflowError("bad"), MemoryError(), RecursionError("deep"), EOFError("x"),
                                   TypeError("bad"), KeyError("descr")],
                         ids=lambda e: type(e).__name__)
def test_open_any_header_parse_failure_is_a_value_error_naming_the_file(tmp_path, monkeypatch, error):
    path = tmp_path / "store"
    _make_store(path)

    def broken(f):
        raise error
    monkeypatch.setattr(store_mod, "_read_header", broken)
    msg = _open_raises(path, ValueError, "array 'z0'", str(path / "z0.npy"))
    assert type(error).__name__ in msg


# ----------------------------------------------------------------------------- 2. unreadable manifests

@pytest.mark.parametrize("label", ["deeply-nested", "huge-int"])
def test_open_unreadable_manifest_names_the_manifest(tmp_path, label):
    path = tmp_path / "store"
    _make_store(path)
    text = (path / "manifest.json").read_text()
    if label == "deeply-nested":  # json's recursion limit: RecursionError today
        text = text.replace('"meta": {}', '"meta": ' + "[" * 100_000 + "]" * 100_000)
    else:  # Python's int digit limit: "Exceeds the limit (4300 digits)" today
        text = text.replace(f'"n": {N}', '"n": 1' + "0" * 5000)
    assert text != (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text)
    msg = _open_raises(path, ValueError, f"{path / 'manifest.json'}: ")
    assert "Traceback" not in msg and len(msg) < 1000


# ----------------------------------------------------------------------------- 3. the path argument

def test_open_path_that_is_a_file_names_path(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    msg = _open_raises(file, ValueError, "path: expected a store directory, got a file")
    assert str(file) in msg
    _open_raises(file / "below", ValueError, "path: ")  # a path through a file


@pytest.mark.parametrize("arg", [None, 5, ["store"], 2.5, {"path": "x"}], ids=repr)
def test_open_path_of_wrong_type_names_path(arg):
    with pytest.raises(TypeError, match=r"^path: expected a store directory path"):
        DescriptorStore.open(arg)


def test_open_missing_path_stays_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        DescriptorStore.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="^path: "):
        DescriptorStore.open("")


def test_create_path_checks(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(ValueError, match="^path: expected a store directory, got a file"):
        DescriptorStore.create(file, 3, {"z0": ((2,), "float32")})
    with pytest.raises(TypeError, match="^path: "):
        DescriptorStore.create(None, 3, {"z0": ((2,), "float32")})
    assert file.read_text() == "x"


# ----------------------------------------------------------------------------- 4. store= that is a file

@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_extract_store_path_is_a_file_before_any_batch(tmp_path, where):
    file = tmp_path / "a_file"
    file.write_text("x")
    store = file if where == "file" else file / "store"
    before = _snapshot(tmp_path)
    msg = _extract_raises(ValueError, "store", loader=_loader(), store=store)
    assert str(file) in msg
    assert _snapshot(tmp_path) == before


def test_extract_store_of_wrong_type_names_store():
    _extract_raises(TypeError, "store", loader=_loader(), store=5)


# ----------------------------------------------------------------------------- 5. device

@pytest.mark.parametrize("device", ["bogus", "cuda:x", -1], ids=repr)
def test_extract_unknown_device_names_device(device):
    _extract_raises(ValueError, "device", device=device)


def test_extract_device_of_wrong_type_names_device():
    _extract_raises(TypeError, "device", device=2.5)
    _extract_raises(TypeError, "device", device=True)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda", 1)], ids=repr)
def test_extract_unavailable_cuda_names_device(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _extract_raises(ValueError, "device", device=device)
    assert "CUDA" in msg


def test_extract_cuda_index_out_of_range_names_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _extract_raises(ValueError, "device", device="cuda:3")


# ----------------------------------------------------------------------------- 6. other arguments

@pytest.mark.parametrize("layers", [None, 5, "net.0", 2.5], ids=repr)
def test_extract_layers_not_a_list_names_layers(layers):
    _extract_raises(TypeError, "layers", layers=layers)


def test_extract_layer_names_must_be_strings():
    _extract_raises(TypeError, "layers", layers=[0])


@pytest.mark.parametrize("loader", [5, None, 2.5, "batches", b"xy"], ids=repr)
def test_extract_loader_not_iterable_names_loader(loader):
    msg = _extract_raises(TypeError, "loader", loader=loader)
    assert "iterable" in msg


@pytest.mark.parametrize("projection,exc", [("x", TypeError), (2.5, TypeError), (True, TypeError), ([4], TypeError),
                                            (0, ValueError), (-3, ValueError), ({"net.0": "4"}, TypeError),
                                            ({"net.0": 0}, ValueError), ({"nope": 4}, ValueError)], ids=repr)
def test_extract_bad_projection_names_projection(projection, exc):
    _extract_raises(exc, "projection", projection=projection)


@pytest.mark.parametrize("seed,exc", [("x", TypeError), (0.5, TypeError), (True, TypeError), (None, TypeError),
                                      (-1, ValueError), (2**63, ValueError)], ids=repr)
def test_extract_bad_seed_names_seed(seed, exc):
    _extract_raises(exc, "seed", projection=4, seed=seed)


@pytest.mark.parametrize("name,value,exc", [
    ("mc_degrees", float("nan"), ValueError), ("mc_degrees", float("inf"), ValueError),
    ("mc_degrees", -1.0, ValueError), ("mc_degrees", "15", TypeError),
    ("mc_brightness", float("nan"), ValueError), ("mc_brightness", float("-inf"), ValueError),
    ("mc_brightness", -0.1, ValueError), ("mc_brightness", None, TypeError),
    ("mc_passes", float("nan"), TypeError), ("mc_passes", 0, ValueError), ("mc_passes", -2, ValueError),
    ("mc_passes", 2.5, TypeError), ("mc_passes", True, TypeError)], ids=str)
def test_extract_bad_mc_parameters_name_the_parameter(name, value, exc):
    msg = _extract_raises(exc, name, pseudo_label="mc", **{name: value})
    if isinstance(value, float) and not math.isnan(value) or value == "15":
        assert repr(value) in msg or str(value) in msg


def test_extract_mc_parameters_are_checked_whatever_the_pseudo_label():
    _extract_raises(ValueError, "mc_degrees", mc_degrees=float("nan"))


def test_extract_large_seed_runs_and_small_seeds_keep_their_draws():
    ids = torch.arange(-3, 50)
    mask = (1 << 62) - 1
    for seed in (0, 1, 7, 2**31 - 1, 2**32 + 5):
        for stream in (0, 1, 15):  # the formula before the seed check (int64 tensor arithmetic)
            x = (ids * 0x9E3779B1 + seed * 0x85EBCA77 + stream * 0xC2B2AE3D + 0x27D4EB2F) & mask
            for mult in (0x5851F42D, 0x2545F491, 0x6C078965):
                x = (x ^ (x >> 29)) & mask
                x = (x * mult) & mask
            want = (x >> 30).double() / float(1 << 32)
            assert torch.equal(extract_mod._hash_uniform(ids, seed, stream), want)
    out = pyfk.extract(_Counting(), _batches(), COUNTING_LAYERS, pseudo_label="mc", mc_passes=2,
                       projection=4, seed=2**63 - 1, progress=False)
    assert np.isfinite(np.asarray(out.descriptors.z[1])).all() and out.meta["seed"] == 2**63 - 1


# ----------------------------------------------------------------------------- 7. label dtypes

@pytest.mark.parametrize("kw", [dict(pseudo_label="true"), dict(with_true=True), dict()], ids=str)
@pytest.mark.parametrize("labels", [torch.linspace(0, 3.5, 10), torch.arange(10).double() % 5,
                                    torch.ones(10, dtype=torch.bool), np.linspace(0, 3.5, 10),
                                    [0.5] * 10], ids=["float32", "float64-whole", "bool", "numpy-float", "list"])
def test_extract_non_integer_labels_name_labels(kw, labels):
    batches = [(x, labels[i * 4:i * 4 + len(x)]) for i, (x, _) in enumerate(_batches())]
    model = _Counting()
    with pytest.raises(TypeError, match=r"^labels: expected integer class labels, got dtype .* batch 0"):
        pyfk.extract(model, batches, COUNTING_LAYERS, **kw)
    assert model.calls == 0  # checked before the forward pass and the loss


def test_extract_float_labels_into_store_store_nothing(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(TypeError, match="^labels: .*float32"):
        pyfk.extract(_Counting(), _loader(labels=torch.linspace(0, 3.5, 10)), COUNTING_LAYERS,
                     pseudo_label="true", store=store)
    assert not os.path.exists(store / "manifest.json")


def test_extract_non_integer_ids_name_loader():
    batches = [(x, y, torch.arange(len(x)) + 0.5) for x, y in _batches()]
    with pytest.raises(TypeError, match="^loader: expected integer example ids"):
        pyfk.extract(_Counting(), batches, COUNTING_LAYERS)


def test_extract_integer_labels_in_any_integer_form_still_work():
    want = pyfk.extract(_Counting(), _batches(), COUNTING_LAYERS, pseudo_label="true")
    for convert in (lambda y: y.int(), lambda y: y.numpy(), lambda y: y.tolist(), lambda y: y[:, None]):
        batches = [(x, convert(y)) for x, y in _batches()]
        got = pyfk.extract(_Counting(), batches, COUNTING_LAYERS, pseudo_label="true")
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(np.asarray(got.descriptors.g[0]), np.asarray(want.descriptors.g[0]))
