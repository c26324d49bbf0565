"""Descriptor extraction from any PyTorch classifier (DESIGN.md sections 1, 3, 5).

For every example x and tapped layer j:
    z_j(x) = GAP(a_j(x))                       pooled activation (vector layers kept as is)
    g_j(x) = GAP(dCE(f(x), s(x)) / da_j(x))    pooled loss gradient w.r.t. that activation
where s(x) is a label estimate (`pseudo_label`). Mechanics: eval mode, parameters
frozen (no weight gradient is ever computed), a forward hook per tapped module
pools a_j and returns a_j + p_j with a zero "probe" p_j; one
`autograd.grad(sum of CE, probes)` per batch gives every example its own dCE/da_j
(examples do not interact in eval mode) and stops at the earliest tap. A probe
is a separate leaf, so in-place ops after a tap (ReLU(inplace=True)) are safe.
"""

from __future__ import annotations

import difflib
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pyfk.engine.descriptors import Descriptors
from pyfk.engine.search import topk
from pyfk.features.extraction import Extraction
from pyfk.features.writer import StoreWriter

PSEUDO_LABELS = ("argmax", "true", "map", "mc")


# ----------------------------------------------------------------------------- helpers

def _pool(a: torch.Tensor) -> torch.Tensor:
    """Global average over every dim after (batch, channel); at least float32."""
    a = a if a.dtype == torch.float64 else a.float()
    return a.mean(dim=tuple(range(2, a.ndim))) if a.ndim > 2 else a.reshape(a.shape[0], -1)


def _resolve_modules(model: torch.nn.Module, layers, what: str = "layers") -> list[torch.nn.Module]:
    if isinstance(layers, str) or not layers:
        raise TypeError(f"{what}: expected a non-empty list of module names, got {layers!r}")
    named = dict(model.named_modules())
    out = []
    for name in layers:
        if name not in named:
            close = difflib.get_close_matches(str(name), [n for n in named if n], n=5, cutoff=0.4)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(f"{what}: {type(model).__name__} has no module named {name!r}{hint}")
        out.append(named[name])
    if len(set(layers)) != len(layers):
        raise ValueError(f"{what}: expected distinct module names, got {list(layers)}")
    return out


def _hash_uniform(ids: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Counter-based uniforms in [0, 1) from (seed, example id, stream): the same
    example gets the same draw whatever batch it is in (batch invariance)."""
    mask = (1 << 62) - 1
    x = (ids.to(torch.int64) * 0x9E3779B1 + seed * 0x85EBCA77 + stream * 0xC2B2AE3D + 0x27D4EB2F) & mask
    for mult in (0x5851F42D, 0x2545F491, 0x6C078965):  # xorshift-multiply rounds
        x = (x ^ (x >> 29)) & mask
        x = (x * mult) & mask
    return (x >> 30).double() / float(1 << 32)


def _perturb(x: torch.Tensor, ids: torch.Tensor, seed: int, k: int, max_degrees: float, brightness: float):
    """The paper-code MC perturbation: a small random rotation and brightness change."""
    u_angle = _hash_uniform(ids, seed, 2 * k).to(x.device)
    u_bright = _hash_uniform(ids, seed, 2 * k + 1).to(x.device)
    scale = (1.0 + brightness * (2 * u_bright - 1)).to(x.dtype)
    if x.ndim != 4:
        return x * scale.view(-1, *([1] * (x.ndim - 1)))
    theta = (2 * u_angle - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    affine = torch.zeros(x.shape[0], 2, 3, dtype=torch.float32, device=x.device)
    affine[:, 0, 0], affine[:, 0, 1], affine[:, 1, 0], affine[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(affine, list(x.shape), align_corners=False).to(x.dtype)
    rotated = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rotated * scale.view(-1, 1, 1, 1)


def _split_batch(batch, index: int, start: int):
    """(x, y or None, ids) from a loader batch: x, (x, y) or (x, y, ids)."""
    if isinstance(batch, torch.Tensor):
        x, y, ids = batch, None, None
    elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        ids = batch[2] if len(batch) > 2 else None
    else:
        raise TypeError(f"loader: batch {index} should be x, (x, y) or (x, y, ids), got {type(batch).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"loader: batch {index} inputs should be a tensor, got {type(x).__name__}")
    n = x.shape[0]
    y = None if y is None else torch.as_tensor(y).reshape(-1).long()
    if y is not None and y.shape[0] != n:
        raise ValueError(f"loader: batch {index} has {n} inputs but {y.shape[0]} labels")
    ids = torch.arange(start, start + n) if ids is None else torch.as_tensor(ids).reshape(-1).long()
    return x, y, ids


class _Taps:
    """Forward hooks that pool activations and insert zero probes."""

    def __init__(self, modules, names):
        self.names = list(names)
        self.active = False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]
        self.reset()

    def reset(self):
        self.z = [None] * len(self.names)
        self.probes = [None] * len(self.names)
        self.calls = [0] * len(self.names)

    def _hook(self, i):
        def hook(module, inputs, output):
            if not self.active:
                return None
            name = self.names[i]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layers: module {name!r} returns {type(output).__name__}; a tapped module "
                                "must return one tensor")
            self.calls[i] += 1
            if self.calls[i] > 1:
                raise ValueError(f"layers: module {name!r} runs more than once per forward pass (a shared "
                                 "module, e.g. one ReLU reused); tap a module that runs once")
            self.z[i] = _pool(output.detach())
            probe = torch.zeros_like(output, requires_grad=True)
            self.probes[i] = probe
            return output + probe
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _Projection:
    """Seeded Gaussian JL projection per scale, R_j (L_j, P_j) / sqrt(P_j), applied to z_j and g_j."""

    def __init__(self, widths, projection, names, seed):
        self.mats = []
        self.spec = {}
        for j, (L, name) in enumerate(zip(widths, names)):
            target = projection.get(name) if isinstance(projection, dict) else projection
            if target is None or target >= L:
                self.mats.append(None)
                continue
            if isinstance(target, bool) or not isinstance(target, int) or target < 1:
                raise ValueError(f"projection: expected a positive integer width for {name!r}, got {target!r}")
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + j)
            self.mats.append(torch.randn(L, target, generator=gen) / math.sqrt(target))
            self.spec[name] = [L, target]

    def width(self, j, L):
        return L if self.mats[j] is None else self.mats[j].shape[1]

    def __call__(self, j, v: torch.Tensor) -> torch.Tensor:
        m = self.mats[j]
        return v if m is None else v @ m.to(v.device)


# ----------------------------------------------------------------------------- extract

def extract(model: torch.nn.Module, loader, layers, pseudo_label: str = "argmax", *,
            with_true: bool = False, badge: bool = False, badge_layer: str | None = None,
            map_reference=None, mc_passes: int = 8, mc_degrees: float = 15.0, mc_brightness: float = 0.1,
            projection=None, seed: int = 0, device=None, amp: bool | None = None,
            channels_last: bool | None = None, dtype: str | None = None, store=None,
            overwrite: bool = False, progress: bool | None = None) -> Extraction:
    """Extract PFK descriptors for every example the loader yields.

    Args:
        model: a classifier returning logits (B, C). Left as found afterwards
            (train/eval flags, requires_grad, BatchNorm buffers, .grad).
        loader: iterable of x, (x, y) or (x, y, ids) batches (e.g. a DataLoader).
        layers: module names as in `model.named_modules()`, e.g. ["layer1", ..., "layer4"].
        pseudo_label: the label estimate s(x) for the gradients:
            "argmax" the prediction; "true" the loader's label; "map" the label of the
            most similar validation example under R_z (needs map_reference=(Descriptors
            of z, labels)); "mc" argmax of the softmax averaged over `mc_passes`
            perturbed passes (rotation up to mc_degrees, brightness +-mc_brightness).
        with_true: also gradients w.r.t. the true labels (validation sets) -> grad_true.
        badge: also the BADGE factors of the last Linear (or `badge_layer`).
        projection: None, an int width, or {layer: width}: seeded JL projection per scale.
        amp: bf16 autocast (default: on for CUDA devices that support bf16; early-layer
            gradients then carry ~10% relative error -- amp=False for float32 descriptors).
        channels_last: default on for CUDA with 4-D inputs.
        dtype: descriptor dtype: "float32" (default in memory), "float16" (default in a
            store; the kernels read it directly) or "float64" (for checking).
        store: a directory: write into an on-disk DescriptorStore (resumable: a rerun with
            the same settings continues after the last committed batch; needs a DataLoader
            over a sized dataset in a fixed order). overwrite=True starts it over.
    Returns:
        Extraction (see its docstring).
    """
    if pseudo_label not in PSEUDO_LABELS:
        raise ValueError(f"pseudo_label: expected one of {list(PSEUDO_LABELS)}, got {pseudo_label!r}")
    if dtype is None:
        dtype = "float32" if store is None else "float16"
    if dtype not in ("float32", "float16", "float64"):
        raise ValueError(f"dtype: expected 'float32', 'float16' or 'float64', got {dtype!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if pseudo_label == "map":
        map_desc, map_labels = _check_map_reference(map_reference)
    if isinstance(mc_passes, bool) or not isinstance(mc_passes, int) or mc_passes < 1:
        raise ValueError(f"mc_passes: expected a positive integer, got {mc_passes!r}")
    layers = list(layers) if not isinstance(layers, str) else layers
    modules = _resolve_modules(model, layers)
    badge_module = None
    if badge:
        badge_module = _badge_module(model, badge_layer)

    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if amp is None:
        amp = cuda and torch.cuda.is_bf16_supported()
    if channels_last is None:
        channels_last = cuda

    if store is not None:
        config = dict(layers=list(layers), pseudo_label=pseudo_label, with_true=with_true, badge=badge,
                      badge_layer=badge_layer, projection=projection, seed=seed, dtype=dtype,
                      mc=[mc_passes, mc_degrees, mc_brightness] if pseudo_label == "mc" else None)
        writer = StoreWriter(store, loader, config, overwrite)
        if writer.complete:
            return writer.extraction()
        batches, start = writer.remaining_batches()
    else:
        writer = None
        batches, start = loader, 0

    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    taps = _Taps(modules, layers)
    badge_input = {}
    badge_handle = None
    if badge_module is not None:
        def grab(module, inputs):
            if taps.active:
                h = inputs[0].detach()
                badge_input["h"] = h if h.dtype == torch.float64 else h.float()
        badge_handle = badge_module.register_forward_pre_hook(grab)
    out = _Accumulator(dtype)
    proj = None
    total = _maybe_len(loader)
    show = (sys.stderr.isatty() if progress is None else bool(progress))
    bar = tqdm(total=total, initial=start if total else 0, unit="img", unit_scale=True,
               desc="pyfk.extract", disable=not show)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        row = start
        for b_index, batch in enumerate(batches):
            x, y, ids = _split_batch(batch, b_index, row)
            if (pseudo_label == "true" or with_true) and y is None:
                raise ValueError(f"pseudo_label/with_true: the loader gives no labels (batch {b_index})")
            x = _to_device(x, device, channels_last)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp))
            mc_probs = None
            if pseudo_label == "mc":
                with torch.no_grad(), autocast:
                    acc = None
                    for k in range(mc_passes):
                        pk = torch.softmax(model(_perturb(x, ids, seed, k, mc_degrees, mc_brightness)).float(), 1)
                        acc = pk if acc is None else acc + pk
                    mc_probs = acc / mc_passes
            taps.reset()
            taps.active = True
            try:
                with autocast:
                    logits = model(x)
            finally:
                taps.active = False
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"model: expected logits of shape (batch, classes), got "
                                 f"{getattr(logits, 'shape', type(logits).__name__)}")
            missing = [n for n, z in zip(layers, taps.z) if z is None]
            if missing:
                raise ValueError(f"layers: {missing} did not run in the forward pass")
            logits = logits if logits.dtype == torch.float64 else logits.float()
            probs = torch.softmax(logits.detach(), dim=1)
            pred = probs.argmax(dim=1)
            y_dev = None if y is None else y.to(device)
            if proj is None:
                proj = _Projection([int(z.shape[1]) for z in taps.z], projection, layers, seed)
            z_out = [proj(j, z) for j, z in enumerate(taps.z)]
            if pseudo_label == "argmax":
                target = pred
            elif pseudo_label == "true":
                target = y_dev
            elif pseudo_label == "mc":
                target = mc_probs.argmax(dim=1)
            else:
                target = _map_labels(z_out, map_desc, map_labels).to(device)
            grads = _probe_grads(logits, target, taps, retain=with_true)
            grads_true = _probe_grads(logits, y_dev, taps, retain=False) if with_true else None
            batch_out = {
                "z": z_out,
                "g": [proj(j, g) for j, g in enumerate(grads)],
                "g_true": None if grads_true is None else [proj(j, g) for j, g in enumerate(grads_true)],
                "probs": probs, "pred": pred, "pseudo": target,
                "labels": y, "ids": ids,
            }
            if badge_module is not None:
                batch_out["badge"] = _badge_factors(badge_input.get("h"), probs, pred, badge_module)
            if writer is not None:
                writer.write(row, batch_out)
            else:
                out.add(batch_out)
            row += x.shape[0]
            bar.update(x.shape[0])
    finally:
        bar.close()
        taps.remove()
        if badge_handle is not None:
            badge_handle.remove()
        model.train(was_training)
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    meta = {"layers": list(layers), "widths": [] if proj is None else
            [proj.width(j, int(z.shape[1])) for j, z in enumerate(taps.z)],
            "projection": {} if proj is None else proj.spec, "pseudo_label": pseudo_label, "seed": seed}
    if writer is not None:
        return writer.finish(meta)
    return out.result(meta)


def _probe_grads(logits, target, taps, retain):
    loss = F.cross_entropy(logits, target, reduction="sum")
    grads = torch.autograd.grad(loss, taps.probes, retain_graph=retain, allow_unused=True)
    unused = [n for n, g in zip(taps.names, grads) if g is None]
    if unused:
        raise ValueError(f"layers: {unused} do not influence the logits (nothing flows back to them)")
    return [_pool(g) for g in grads]


def _to_device(x, device, channels_last):
    if device.type == "cuda" and x.device.type == "cpu":
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    else:
        x = x.to(device)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _maybe_len(loader):
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _check_map_reference(ref):
    if not (isinstance(ref, (tuple, list)) and len(ref) == 2):
        raise ValueError("map_reference: pseudo_label='map' needs (validation Descriptors, validation labels)")
    desc, labels = ref
    if not isinstance(desc, Descriptors):
        raise TypeError(f"map_reference: expected pyfk.Descriptors first, got {type(desc).__name__}")
    labels = torch.as_tensor(np.asarray(labels)).long()
    if labels.shape != (desc.n,):
        raise ValueError(f"map_reference: expected {desc.n} labels, got shape {tuple(labels.shape)}")
    return desc, labels


def _map_labels(z_batch, ref_desc, ref_labels):
    """Label of the most similar validation example under R_z (features, PCC)."""
    zs = [z.cpu() for z in z_batch]
    ref_z = [torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a.cpu() for a in ref_desc.z]
    if [z.shape[1] for z in zs] != [a.shape[1] for a in ref_z]:
        raise ValueError(f"map_reference: expected validation feature widths {[z.shape[1] for z in zs]} "
                         f"(as extracted, after any projection), got {[a.shape[1] for a in ref_z]}")
    _, index = topk(Descriptors(zs), Descriptors(ref_z), k=1, combine="features")
    return ref_labels[index[:, 0]]


def _badge_module(model, name):
    if name is not None:
        module = _resolve_modules(model, [name], "badge_layer")[0]
    else:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("badge: the model has no nn.Linear; name the classifier layer with badge_layer=")
        module = linears[-1]
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"badge_layer: expected an nn.Linear, got {type(module).__name__}")
    return module


def _badge_factors(h, probs, pred, module):
    """BADGE gradient embedding factors: grad_W CE(x, pred) = (p - onehot(pred)) [h, 1]^T."""
    if h is None or h.ndim != 2 or h.shape[1] != module.in_features:
        raise ValueError("badge: could not capture the (batch, in_features) input of the classifier layer")
    if probs.shape[1] != module.out_features:
        raise ValueError(f"badge: the classifier layer has {module.out_features} outputs but the model "
                         f"returns {probs.shape[1]} logits; name the last layer with badge_layer=")
    e = probs - F.one_hot(pred, probs.shape[1]).float()
    ones = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
    h_aug = torch.cat([h, ones], 1) if module.bias is not None else h
    return h_aug, e


class _Accumulator:
    """Collects per-batch results on the CPU and stacks them once at the end."""

    def __init__(self, dtype):
        self.np_dtype = np.dtype(dtype).type
        self.parts: dict[str, list] = {}

    def _put(self, key, t):
        self.parts.setdefault(key, []).append(t.detach().cpu().numpy())

    def add(self, b):
        for j, z in enumerate(b["z"]):
            self._put(f"z{j}", z)
            self._put(f"g{j}", b["g"][j])
            if b["g_true"] is not None:
                self._put(f"g_true{j}", b["g_true"][j])
        for key in ("probs", "pred", "pseudo", "ids"):
            self._put(key, b[key])
        if b["labels"] is not None:
            self._put("labels", b["labels"])
        if "badge" in b:
            self._put("badge_h", b["badge"][0])
            self._put("badge_e", b["badge"][1])

    def result(self, meta):
        if not self.parts:
            raise ValueError("loader: yielded no batches")
        cat = {k: np.concatenate(v) for k, v in self.parts.items()}
        scales = len(meta["layers"])

        def floats(prefix):
            return [cat[f"{prefix}{j}"].astype(self.np_dtype, copy=False) for j in range(scales)]

        desc = Descriptors(floats("z"), floats("g"))
        grad_true = Descriptors(floats("z"), floats("g_true")) if "g_true0" in cat else None
        badge = None
        if "badge_h" in cat:
            badge = Descriptors([cat["badge_h"].astype(self.np_dtype)], [cat["badge_e"].astype(self.np_dtype)],
                                same_widths=False)
        return Extraction(desc, cat["probs"].astype(np.float32), cat["pred"].astype(np.int64),
                          cat["labels"].astype(np.int64) if "labels" in cat else None,
                          cat["ids"].astype(np.int64), cat["pseudo"].astype(np.int64), grad_true, badge, meta)
