"""pyfk.extract against per-example oracles (DESIGN.md sections 1 and 3)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pyfk
from tests.features.helpers import FailingLoader
from tests.models import LeNet, ResNet18, SharedReLU, mlp, randomize_bn

CASES = {
    "mlp": (lambda: mlp(), (12,), ["0", "2", "3"]),
    "lenet": (lambda: LeNet(), (1, 28, 28), ["conv1", "conv2", "fc1"]),
    "resnet18": (lambda: randomize_bn(ResNet18()), (3, 16, 16), ["layer1", "layer2", "layer3", "layer4"]),
}


def make_case(name, n=10, dtype=torch.float32, seed=None):
    build, shape, layers = CASES[name]
    torch.manual_seed(seed if seed is not None else np.random.SeedSequence().entropy % 2**31)
    model = build().to(dtype)
    x = torch.randn(n, *shape, dtype=dtype)
    y = torch.randint(0, 5, (n,))
    return model, x, y, layers


def loader_of(x, y, batch_size=4, ids=None):
    tensors = (x, y) if ids is None else (x, y, ids)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def func_oracle(model, x, targets, layers):
    """torch.func: per-example grad of CE w.r.t. zero probes added at the taps, vmapped."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = dict(model.named_modules())
    state = {"probes": None, "z": {}}
    shapes = {}

    def hook_for(j):
        def hook(m, inp, out):
            if state["probes"] is None:
                shapes[j] = out.shape[1:]
                return None
            return out + state["probes"][j]
        return hook

    handles = [mods[n].register_forward_hook(hook_for(j)) for j, n in enumerate(layers)]
    acts = {}
    act_handles = [mods[n].register_forward_hook(lambda m, i, o, j=j: acts.__setitem__(j, o.detach().clone()))
                   for j, n in enumerate(layers)]
    with torch.no_grad():
        model(x)
    for h in act_handles:
        h.remove()

    def loss(probes, xi, si):
        state["probes"] = probes
        return F.cross_entropy(model(xi[None]), si[None], reduction="sum")

    zeros = [torch.zeros(x.shape[0], *shapes[j], dtype=x.dtype) for j in range(len(layers))]
    grads = torch.func.vmap(torch.func.grad(loss))(zeros, x, targets)
    for h in handles:
        h.remove()

    def pool(a):
        return a.mean(dim=tuple(range(2, a.ndim))) if a.ndim > 2 else a
    return [pool(acts[j]).numpy() for j in range(len(layers))], [pool(g).numpy() for g in grads]


@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_func_oracle_and_per_example_loop(name):
    model, x, y, layers = make_case(name, dtype=torch.float64)
    batched = pyfk.extract(model, loader_of(x, y, 4), layers, pseudo_label="true", dtype="float64")
    single = pyfk.extract(model, loader_of(x, y, 1), layers, pseudo_label="true", dtype="float64")
    z_ref, g_ref = func_oracle(model, x, y, layers)
    for j in range(len(layers)):
        np.testing.assert_allclose(batched.descriptors.z[j], z_ref[j], rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched.descriptors.g[j], g_ref[j], rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched.descriptors.g[j], single.descriptors.g[j], rtol=0, atol=1e-10)
        assert np.abs(g_ref[j]).max() > 1e-6, "oracle gradients should not vanish"


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_func_oracle(name):
    model, x, y, layers = make_case(name)
    out = pyfk.extract(model, loader_of(x, y, 3), layers)  # argmax pseudo-labels
    z_ref, g_ref = func_oracle(model, x, torch.from_numpy(out.pred), layers)
    np.testing.assert_array_equal(out.pseudo, out.pred)
    for j in range(len(layers)):
        scale = np.abs(g_ref[j]).max()
        np.testing.assert_allclose(out.descriptors.z[j], z_ref[j], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.descriptors.g[j], g_ref[j], rtol=1e-4, atol=1e-5 * scale)


def test_sequential_split_oracle():
    """For nn.Sequential the activation gradient can be taken on a cut model directly."""
    model, x, y, layers = make_case("mlp", dtype=torch.float64)
    model.eval()
    out = pyfk.extract(model, loader_of(x, y, 5), layers, pseudo_label="true", dtype="float64")
    for j, name in enumerate(layers):
        cut = int(name) + 1
        a = model[:cut](x).detach().requires_grad_(True)
        F.cross_entropy(model[cut:](a.clone()), y, reduction="sum").backward()  # clone: in-place ReLU next
        np.testing.assert_allclose(out.descriptors.g[j], a.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(out.descriptors.z[j], a.detach().numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_batch_invariance(name):
    """Shuffling and re-batching leave every example's descriptors unchanged."""
    model, x, y, layers = make_case(name, n=13)
    ids = torch.arange(13)
    a = pyfk.extract(model, loader_of(x, y, 5, ids), layers, badge=True)
    perm = torch.randperm(13)
    b = pyfk.extract(model, loader_of(x[perm], y[perm], 3, ids[perm]), layers, badge=True)
    order = np.argsort(b.ids)
    np.testing.assert_array_equal(b.ids[order], a.ids)
    for j in range(len(layers)):
        np.testing.assert_allclose(b.descriptors.z[j][order], a.descriptors.z[j], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.descriptors.g[j][order], a.descriptors.g[j], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(b.probs[order], a.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.badge.z[0][order], a.badge.z[0], rtol=1e-5, atol=1e-6)


def test_model_left_untouched():
    model, x, y, layers = make_case("resnet18")
    model.train()
    model.layer2.requires_grad_(False)  # a mixed requires_grad pattern to restore
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    pyfk.extract(model, loader_of(x, y), layers)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_badge_factors_match_per_example_weight_gradients():
    model, x, y, layers = make_case("lenet", n=7, dtype=torch.float64)
    out = pyfk.extract(model, loader_of(x, y, 3), layers, badge=True, dtype="float64")
    grads = []
    for i in range(7):
        m = copy.deepcopy(model).eval()
        logits = m(x[i:i + 1])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        grads.append(torch.cat([m.fc2.weight.grad.flatten(), m.fc2.bias.grad]).numpy())
    grads = np.stack(grads)
    h, e = out.badge.z[0], out.badge.g[0]
    assert h.shape == (7, 33) and e.shape == (7, 10)
    np.testing.assert_allclose(np.einsum("nc,nh->nch", e, h[:, :32]).reshape(7, -1), grads[:, :320], atol=1e-12)
    gram = grads @ grads.T
    R = pyfk.similarity(out.badge, out.badge, combine="product", normalize="none", backend="torch")
    np.testing.assert_allclose(R, gram, rtol=1e-5, atol=1e-8)


def test_pseudo_labels():
    model, x, y, layers = make_case("lenet", n=12)
    true = pyfk.extract(model, loader_of(x, y), layers, pseudo_label="true")
    np.testing.assert_array_equal(true.pseudo, y.numpy())
    both = pyfk.extract(model, loader_of(x, y), layers, with_true=True)
    for j in range(3):
        np.testing.assert_allclose(both.grad_true.g[j], true.descriptors.g[j], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(both.pseudo, both.pred)
    # map: label of the most similar validation example under R_z (float64 brute force)
    val = pyfk.extract(model, loader_of(x[:6], y[:6]), layers, pseudo_label="true")
    mapped = pyfk.extract(model, loader_of(x, y), layers, pseudo_label="map",
                          map_reference=(val.descriptors, val.labels))
    from tests.oracle import similarity64
    Rz = similarity64(mapped.descriptors.z, None, val.descriptors.z, None, "features", "pcc")
    np.testing.assert_array_equal(mapped.pseudo, val.labels[Rz.argmax(1)])
    # mc: deterministic; without perturbation it is the argmax
    mc = pyfk.extract(model, loader_of(x, y, 5), layers, pseudo_label="mc", mc_passes=4)
    mc2 = pyfk.extract(model, loader_of(x, y, 3), layers, pseudo_label="mc", mc_passes=4)
    np.testing.assert_array_equal(mc.pseudo, mc2.pseudo)
    flat = pyfk.extract(model, loader_of(x, y), layers, pseudo_label="mc", mc_passes=2, mc_degrees=0,
                        mc_brightness=0)
    np.testing.assert_array_equal(flat.pseudo, flat.pred)


def test_projection_is_seeded_and_linear():
    model, x, y, layers = make_case("resnet18")
    full = pyfk.extract(model, loader_of(x, y), layers)
    a = pyfk.extract(model, loader_of(x, y), layers, projection=16, seed=3)
    b = pyfk.extract(model, loader_of(x, y), layers, projection={"layer4": 16}, seed=3)
    assert a.descriptors.widths == [8, 16, 16, 16] and b.descriptors.widths == [8, 16, 32, 16]
    assert a.meta["projection"]["layer4"] == [64, 16]
    np.testing.assert_allclose(a.descriptors.z[3], b.descriptors.z[3], rtol=1e-6)
    # a linear map of the full descriptors: least squares recovers it exactly
    R, *_ = np.linalg.lstsq(full.descriptors.z[3].astype(np.float64), a.descriptors.z[3], rcond=None)
    np.testing.assert_allclose(full.descriptors.z[3] @ R, a.descriptors.z[3], atol=1e-4)
    c = pyfk.extract(model, loader_of(x, y), layers, projection=16, seed=4)
    assert not np.allclose(c.descriptors.z[3], a.descriptors.z[3])


def test_descriptors_feed_select():
    model, x, y, layers = make_case("lenet", n=40)
    pool = pyfk.extract(model, loader_of(x, y), layers)
    val = pyfk.extract(model, loader_of(x[:10], y[:10]), layers, with_true=True)
    chosen = pyfk.select(pool.descriptors, val.grad_true, budget=5, val_labels=val.labels, val_pred=val.pred, k=4)
    assert len(set(chosen.tolist())) == 5


def test_errors():
    model, x, y, layers = make_case("lenet")
    msg = r"layers: LeNet has no module named 'conv3'; close matches: \['conv2', 'conv1'\]"
    with pytest.raises(ValueError, match=msg):
        pyfk.extract(model, loader_of(x, y), ["conv3"])
    with pytest.raises(ValueError, match="pseudo_label: expected one of"):
        pyfk.extract(model, loader_of(x, y), layers, pseudo_label="soft")
    with pytest.raises(ValueError, match="the loader gives no labels"):
        pyfk.extract(model, DataLoader(TensorDataset(x), batch_size=4), layers, pseudo_label="true")
    with pytest.raises(ValueError, match="map_reference"):
        pyfk.extract(model, loader_of(x, y), layers, pseudo_label="map")
    with pytest.raises(TypeError, match="layers: expected a non-empty list"):
        pyfk.extract(model, loader_of(x, y), "conv1")
    shared = SharedReLU()
    with pytest.raises(ValueError, match="layers: module 'act' runs more than once per forward pass"):
        pyfk.extract(shared, loader_of(torch.randn(6, 12), torch.zeros(6, dtype=torch.long)), ["act"])
    assert all(p.requires_grad for p in shared.parameters())  # restored after the error
    assert not shared._forward_hooks and not shared.act._forward_hooks


@pytest.mark.parametrize("badge", [False, True])
def test_store_resume_equals_uninterrupted(tmp_path, badge):
    model, x, y, layers = make_case("lenet", n=23)
    kw = dict(with_true=True, badge=badge, projection={"fc1": 8})
    whole = pyfk.extract(model, loader_of(x, y, 4), layers, store=tmp_path / "whole", **kw)
    with pytest.raises(RuntimeError, match="loader died"):
        pyfk.extract(model, FailingLoader(loader_of(x, y, 4), 3), layers, store=tmp_path / "cut", **kw)
    from pyfk.features.store import DescriptorStore
    partial = DescriptorStore.open(tmp_path / "cut")
    assert partial.rows_done == 12 and not partial.complete
    resumed = pyfk.extract(model, loader_of(x, y, 4), layers, store=tmp_path / "cut", **kw)
    for name in ("descriptors", "grad_true") + (("badge",) if badge else ()):
        a, b = getattr(whole, name), getattr(resumed, name)
        for j in range(a.num_scales):
            np.testing.assert_array_equal(a.z[j], b.z[j])
            np.testing.assert_array_equal(a.g[j], b.g[j])
    for key in ("probs", "pred", "pseudo", "labels", "ids"):
        np.testing.assert_array_equal(getattr(whole, key), getattr(resumed, key))
    assert whole.descriptors.z[0].dtype == np.float16  # store default
    mem = pyfk.extract(model, loader_of(x, y, 4), layers, **kw)
    np.testing.assert_allclose(whole.descriptors.g[1], mem.descriptors.g[1].astype(np.float16), rtol=1e-3)
    # a complete store is returned as is; other settings are refused
    again = pyfk.extract(model, FailingLoader(loader_of(x, y, 4), 0), layers, store=tmp_path / "whole", **kw)
    np.testing.assert_array_equal(again.descriptors.g[0], whole.descriptors.g[0])
    with pytest.raises(ValueError, match=r"store: .* was written with different settings \(\['pseudo_label'\]"):
        pyfk.extract(model, loader_of(x, y, 4), layers, store=tmp_path / "whole", pseudo_label="true", **kw)


def test_store_needs_fixed_order(tmp_path):
    model, x, y, layers = make_case("lenet", n=8)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="store: the loader must yield examples in a fixed order"):
        pyfk.extract(model, shuffled, layers, store=tmp_path / "s")


def test_store_corrupted_manifest_detected(tmp_path):
    model, x, y, layers = make_case("lenet", n=8)
    pyfk.extract(model, loader_of(x, y, 4), layers, store=tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"format": "pyfk-store", "vers')
    with pytest.raises(ValueError, match="manifest.json"):
        pyfk.extract(model, loader_of(x, y, 4), layers, store=tmp_path / "s")


def test_amp_bf16_and_channels_last_run_and_stay_close():
    """The throughput options change precision only: bf16 descriptors correlate with fp32 ones."""
    model, x, y, layers = make_case("resnet18", n=12)
    a = pyfk.extract(model, loader_of(x, y, 6), layers, amp=True, channels_last=True)
    b = pyfk.extract(model, loader_of(x, y, 6), layers)
    np.testing.assert_array_equal(a.ids, b.ids)
    for j in range(len(layers)):
        assert np.corrcoef(a.descriptors.z[j].ravel(), b.descriptors.z[j].ravel())[0, 1] > 0.99
        # bf16 backward: usually > 0.98, but 0.84 was seen on an unlucky random model
        assert np.corrcoef(a.descriptors.g[j].ravel(), b.descriptors.g[j].ravel())[0, 1] > 0.5
