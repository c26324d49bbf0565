"""pyfk.extract(layers="auto") and pyfk.extract(indices=...) (issue 13 item 2): the auto-layer rule on
the reference models and torchvision-like structures, and extraction of a subset of the dataset's
rows, in memory and into a resumable store."""

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pyfk
from pyfk.al.models import LeNet, ResNet18, default_layers
from pyfk.features.extract import AUTO_MAX_STAGES, auto_layers
from tests.models import mlp


def seq_cnn(classes=5):
    """A Sequential CNN: conv/BN/ReLU/pool stages at 16x16 and 8x8, flatten, a 2-layer MLP head."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes))


class VGGish(nn.Module):
    """torchvision's VGG layout: `features` (a Sequential of conv/ReLU/max-pool over 5 resolutions),
    `avgpool`, then `classifier`, a Sequential ending in nn.Linear; flatten is a function call."""

    def __init__(self, classes=5):
        super().__init__()
        layers, c = [], 3
        for v in (8, "M", 8, "M", 16, 16, "M", 16, "M", 16, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 24), nn.ReLU(True), nn.Dropout(), nn.Linear(24, 24),
                                        nn.ReLU(True), nn.Dropout(), nn.Linear(24, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class NoRule(nn.Module):
    """Flat inputs straight into the classifier: no spatial stage, no module holds the Linear's input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x)


def _loader(model_input, n=10, batch_size=4, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model_input, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# ----------------------------------------------------------------------------- layers="auto"

def test_auto_rule_on_reference_and_torchvision_like_models():
    torch.manual_seed(0)
    # LeNet: the two convolutions (28x28, 14x14; the 4x4 adaptive pool has no parameters) and the
    # classifier's input, the output of `drop` (= relu(fc1) in eval); default_layers has fc1 (pre-ReLU)
    assert auto_layers(LeNet(), torch.randn(2, 1, 28, 28)) == ["conv1", "conv2", "drop"]
    # ResNet18: one stage per resolution; the GAP head (avgpool) would repeat layer4 and is left out
    assert auto_layers(ResNet18(width=4), torch.randn(2, 3, 32, 32)) == default_layers("resnet18")
    # per resolution the last module with parameters (conv at 16x16, BN at 8x8; the 4x4 max-pool has
    # none), then the ReLU in front of the last Linear
    assert auto_layers(seq_cnn(), torch.randn(2, 3, 16, 16)) == ["0", "4", "9"]
    # 6 resolutions (64 .. 2): the deepest 4 stages (the later of the two 16x16 convs), `features`
    # itself ending at 2x2, and the Dropout in front of the last Linear
    got = auto_layers(VGGish(), torch.randn(2, 3, 64, 64))
    assert got == ["features.8", "features.11", "features.14", "features", "classifier.5"]
    assert len(got) == AUTO_MAX_STAGES + 1
    assert auto_layers(mlp(), torch.randn(2, 12)) == ["3"]  # no stages: the penultimate alone


def test_auto_leaves_the_model_as_found():
    model = ResNet18(width=4).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    auto_layers(model, torch.randn(2, 3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("build, shape", [(LeNet, (1, 12, 12)), (lambda: ResNet18(width=4), (3, 8, 8)),
                                          (seq_cnn, (3, 16, 16)), (VGGish, (3, 32, 32))],
                         ids=["lenet", "resnet18", "seq_cnn", "vggish"])
def test_extract_auto_equals_the_named_layers_and_logs_them(build, shape, caplog):
    torch.manual_seed(1)
    model = build()
    loader = _loader(shape)
    names = auto_layers(model, next(iter(loader))[0])
    with caplog.at_level(logging.INFO, logger="pyfk"):
        auto = pyfk.extract(model, loader)  # layers defaults to "auto"
    assert auto.meta["layers"] == names
    assert any("layers='auto' chose" in r.getMessage() and str(names) in r.getMessage() for r in caplog.records)
    ref = pyfk.extract(model, loader, names)
    for a, b in zip(auto.descriptors.z + auto.descriptors.g, ref.descriptors.z + ref.descriptors.g):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(auto.ids, ref.ids)


def test_auto_keeps_the_first_batch_of_a_one_shot_loader():
    torch.manual_seed(2)
    model = mlp()
    batches = [(torch.randn(4, 12), torch.randint(0, 5, (4,))) for _ in range(3)]
    ext = pyfk.extract(model, (b for b in batches), "auto")
    assert len(ext) == 12 and ext.meta["layers"] == ["3"]
    np.testing.assert_array_equal(ext.ids, np.arange(12))


def test_auto_with_store_records_the_chosen_layers(tmp_path):
    torch.manual_seed(3)
    model = seq_cnn()
    loader = _loader((3, 16, 16))
    ext = pyfk.extract(model, loader, store=tmp_path / "s")
    assert ext.meta["layers"] == ["0", "4", "9"]
    again = pyfk.DescriptorStore.open(str(tmp_path / "s"))
    assert again.meta["config"]["layers"] == ["0", "4", "9"]


def test_auto_without_a_rule_raises_naming_layers():
    with pytest.raises(ValueError, match=r"^layers: 'auto' found no module.*named_modules\(\).*\['fc'\]"):
        pyfk.extract(NoRule(), _loader((12,), classes=3))
    with pytest.raises(TypeError, match="^layers:"):
        pyfk.extract(NoRule(), _loader((12,), classes=3), "Auto")  # only "auto" itself


def test_auto_checks_cheap_arguments_before_the_forward_pass():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the model must not run")

    with pytest.raises(ValueError, match="^pseudo_label:"):
        pyfk.extract(Boom(), _loader((12,)), pseudo_label="nope")
    with pytest.raises(TypeError, match="^loader:"):
        pyfk.extract(Boom(), 5)
    with pytest.raises(ValueError, match="^loader: yielded no batches"):
        pyfk.extract(Boom(), [])


# ----------------------------------------------------------------------------- indices=

def _assert_rows_equal(sub, full, rows):
    for a, b in zip(sub.descriptors.z + sub.descriptors.g, full.descriptors.z + full.descriptors.g):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32)[rows], rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(sub.probs, full.probs[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sub.pred, full.pred[rows])
    np.testing.assert_array_equal(sub.labels, full.labels[rows])
    np.testing.assert_array_equal(sub.ids, rows)


@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "range"])
def test_indices_give_the_full_extractions_rows_in_the_given_order(kind):
    torch.manual_seed(4)
    model = LeNet()
    loader = _loader((1, 12, 12), n=13, batch_size=4)
    full = pyfk.extract(model, loader, ["conv1", "conv2", "fc1"], badge=True)
    rows = np.array([11, 2, 7, 0, 12, 5, 3]) if kind != "range" else np.arange(3, 10)
    given = {"list": rows.tolist(), "numpy": rows, "torch": torch.from_numpy(rows), "range": range(3, 10)}[kind]
    sub = pyfk.extract(model, loader, ["conv1", "conv2", "fc1"], badge=True, indices=given)
    assert len(sub) == len(rows)
    _assert_rows_equal(sub, full, rows)
    np.testing.assert_allclose(np.asarray(sub.badge.z[0]), np.asarray(full.badge.z[0])[rows], rtol=1e-5, atol=1e-6)


def test_indices_with_auto_layers_use_the_subset():
    torch.manual_seed(5)
    model = seq_cnn()
    loader = _loader((3, 16, 16), n=9, batch_size=4)
    rows = np.array([8, 1, 4])
    sub = pyfk.extract(model, loader, indices=rows)
    full = pyfk.extract(model, loader, sub.meta["layers"])
    assert sub.meta["layers"] == ["0", "4", "9"]
    _assert_rows_equal(sub, full, rows)


def test_indices_keep_ids_the_dataset_gives():
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    loader = DataLoader(TensorDataset(x, y, torch.arange(100, 106)), batch_size=4)
    sub = pyfk.extract(mlp(), loader, ["3"], indices=[5, 0, 2])
    np.testing.assert_array_equal(sub.ids, [105, 100, 102])


class _Flaky(Dataset):
    """A dataset whose item `fail_at` raises while `fail` is set; counts the items read."""

    def __init__(self, x, y, fail_at):
        self.x, self.y, self.fail_at, self.fail, self.reads = x, y, fail_at, True, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.fail and i == self.fail_at:
            raise RuntimeError("disk went away")
        self.reads += 1
        return self.x[i], self.y[i]


def test_indices_with_store_resume_and_refuse_other_indices(tmp_path):
    torch.manual_seed(6)
    model = LeNet()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(14, 1, 12, 12, generator=g), torch.randint(0, 10, (14,), generator=g)
    rows = [13, 4, 9, 0, 6, 11, 2, 7, 1]
    data = _Flaky(x, y, fail_at=6)  # the 5th subset row: batch 1 (rows 4..7) fails, batch 0 is committed
    loader = DataLoader(data, batch_size=4)
    layers = ["conv1", "conv2", "fc1"]
    path = tmp_path / "store"
    with pytest.raises(RuntimeError, match="disk went away"):
        pyfk.extract(model, loader, layers, store=path, indices=rows, dtype="float32")
    data.fail, data.reads = False, 0
    ext = pyfk.extract(model, loader, layers, store=path, indices=rows, dtype="float32")
    assert data.reads == len(rows) - 4  # resumed after the committed first batch
    full = pyfk.extract(model, DataLoader(TensorDataset(x, y), batch_size=5), layers)
    _assert_rows_equal(ext, full, np.array(rows))
    config = pyfk.DescriptorStore.open(str(path)).meta["config"]
    assert config["indices"]["count"] == len(rows) and config["indices"]["of"] == 14
    # the same indices again: the complete store, opened; other indices (even a permutation): refused
    assert len(pyfk.extract(model, loader, layers, store=path, indices=rows, dtype="float32")) == len(rows)
    for other in (rows[::-1], rows[:-1] + [12]):
        with pytest.raises(ValueError, match=r"^store: .*different settings.*indices"):
            pyfk.extract(model, loader, layers, store=path, indices=other, dtype="float32")
    with pytest.raises(ValueError, match=r"^store: .*different settings.*indices"):
        pyfk.extract(model, loader, layers, store=path, dtype="float32")  # all rows: another extraction
    redo = pyfk.extract(model, loader, layers, store=path, indices=rows[::-1], dtype="float32", overwrite=True)
    np.testing.assert_array_equal(redo.ids, rows[::-1])


def test_indices_with_a_sharded_store_in_one_process(tmp_path):
    torch.manual_seed(7)
    model = mlp()
    loader = _loader((12,), n=11, batch_size=3)
    rows = np.array([10, 3, 5, 1, 8])
    ext = pyfk.extract(model, loader, ["0", "3"], store=tmp_path / "sh", sharded=True, indices=rows,
                       dtype="float32")
    full = pyfk.extract(model, loader, ["0", "3"])
    _assert_rows_equal(ext, full, rows)


@pytest.mark.parametrize("bad, exc, match", [
    ([1, 1, 2], ValueError, "distinct"),
    ([0, 10], ValueError, r"in \[0, 10\)"),
    ([-1, 2], ValueError, r"in \[0, 10\)"),
    ([0.0, 1.0], TypeError, "integer"),
    (np.array([[0, 1], [2, 3]]), TypeError, "1-D"),
    ([True, False], TypeError, "integer"),
    ([], ValueError, "at least one"),
    (3, TypeError, "1-D sequence"),
    ("0,1", TypeError, "1-D sequence"),
], ids=["duplicates", "too-large", "negative", "float", "2-D", "bool", "empty", "scalar", "string"])
def test_bad_indices_raise_naming_indices(bad, exc, match):
    with pytest.raises(exc, match=rf"^indices: .*{match}"):
        pyfk.extract(mlp(), _loader((12,)), ["3"], indices=bad)


def test_indices_refuse_loaders_they_cannot_subset():
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match=r"^indices: .*shuffle=False.*RandomSampler"):
        pyfk.extract(mlp(), DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True), ["3"], indices=[0, 1])
    with pytest.raises(ValueError, match=r"^indices: .*DataLoader"):
        pyfk.extract(mlp(), [(x, y)], ["3"], indices=[0, 1])
