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
import hashlib
import itertools
import logging
import math
import numbers
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm.auto import tqdm

from pyfk.engine.descriptors import Descriptors
from pyfk.engine.search import topk
from pyfk.errors import check_choice, check_index_set, check_int
from pyfk.features.extraction import Extraction
from pyfk.features.sharded import check_shardable, extract_sharded, rank_and_world, shard_loader
from pyfk.features.writer import StoreWriter

PSEUDO_LABELS = ("argmax", "true", "map", "mc")
DTYPES = ("float32", "float16", "float64")
_MAX_SEED = 2**63 - 1
_MASK62 = (1 << 62) - 1
AUTO_MAX_STAGES = 4  # layers="auto": at most this many stage outputs (the deepest), plus the penultimate
_AUTO_ROWS = 4  # layers="auto" looks at the first rows of the first batch
log = logging.getLogger("pyfk")


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
        if not isinstance(name, str):
            raise TypeError(f"{what}: expected module names (str) as in model.named_modules(), got "
                            f"{type(name).__name__} {name!r}")
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
    mask = _MASK62
    # the constant part reduced mod 2**62 in Python: the same values as adding it to the int64 tensor
    # (which wraps mod 2**64), without overflowing int64 for large seeds
    offset = (seed * 0x85EBCA77 + stream * 0xC2B2AE3D + 0x27D4EB2F) & mask
    x = (ids.to(torch.int64) * 0x9E3779B1 + offset) & mask
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
    y = None if y is None else _integers(y, index, "labels", "labels", "integer class labels").reshape(-1).long()
    if y is not None and y.shape[0] != n:
        raise ValueError(f"loader: batch {index} has {n} inputs but {y.shape[0]} labels")
    ids = (torch.arange(start, start + n) if ids is None
           else _integers(ids, index, "loader", "ids", "integer example ids").reshape(-1).long())
    if ids.shape[0] != n:
        raise ValueError(f"loader: batch {index} has {n} inputs but {ids.shape[0]} ids")
    return x, y, ids


def _integers(v, index: int, name: str, what: str, expected: str) -> torch.Tensor:
    """A batch's labels or ids as an integer tensor; floats (1.7 would silently become 1), bools,
    complex numbers and anything that is not numeric raise TypeError naming `name`."""
    try:
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: expected {expected}, got {type(v).__name__} as the {what} of batch {index} "
                        f"({exc})") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        hint = " (cast whole-number labels with .long())" if what == "labels" and t.is_floating_point() else ""
        raise TypeError(f"{name}: expected {expected}, got dtype {t.dtype} as the {what} of batch {index}"
                        f"{hint}; nothing of this batch was stored")
    return t


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
            target = projection.get(name) if isinstance(projection, dict) else projection  # checked by extract
            if target is None or target >= L:
                self.mats.append(None)
                continue
            gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + j) % (1 << 64))
            self.mats.append(torch.randn(L, target, generator=gen) / math.sqrt(target))
            self.spec[name] = [L, target]

    def width(self, j, L):
        return L if self.mats[j] is None else self.mats[j].shape[1]

    def __call__(self, j, v: torch.Tensor) -> torch.Tensor:
        m = self.mats[j]
        return v if m is None else v @ m.to(v.device)


# ----------------------------------------------------------------------------- layers="auto"

def _has_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def auto_layers(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The module names `extract(..., layers="auto")` taps, from one forward pass of `x` (an input
    batch, e.g. the loader's first; only its first few rows are run, in eval mode, without gradients;
    the model is left as found). The rule, over the modules of `model.named_modules()` (the model
    itself excluded) that run exactly once in that pass and return one tensor:

    1. stages: of the modules with parameters (their own or their submodules') whose output is
       spatial, (batch, C, H, W), group by the spatial size (H, W) and keep, for each size, the
       module that finishes last in the forward pass (a container such as ResNet's `layer2`
       finishes after its blocks, so the outermost module ending that resolution wins); in forward
       order, keep the deepest AUTO_MAX_STAGES (4) of them.
    2. penultimate: the input of the last nn.Linear the forward pass calls, tapped as the output of
       the module that finishes last before that call and whose output holds exactly those values
       (a Dropout, Flatten, ReLU or pooling module in front of the classifier). Left out when no
       module holds them (the input is made by a function call such as torch.relu or x.mean, or
       is the model's input) and when it equals the global average of the last stage's output
       (a GAP head: it would repeat that stage's descriptor).
    The result (at most 5 names) is in forward order. Inputs of other ranks (3-D token tensors,
    5-D video) are not stages. Raises ValueError naming `layers` when neither rule finds a module;
    pass the names yourself then.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"layers: 'auto' needs a non-empty input batch to look at the model, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    x = x[:_AUTO_ROWS]
    rows = int(x.shape[0])
    named = [(n, m) for n, m in model.named_modules() if n]
    seen = {"seq": 0}
    calls: dict[str, int] = {}
    done: dict[str, tuple[int, torch.Tensor | None]] = {}  # name -> (finish order, output copy)
    linear_in: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (call order, input copy)

    def after(name):
        def hook(module, inputs, output):
            seen["seq"] += 1
            calls[name] = calls.get(name, 0) + 1
            # a copy: an in-place op further on (ReLU(inplace=True)) must not change what we compare
            done[name] = (seen["seq"], output.detach().clone() if isinstance(output, torch.Tensor) else None)
        return hook

    def before(name):
        def hook(module, inputs):
            seen["seq"] += 1
            h = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            linear_in[name] = (seen["seq"], None if h is None else h.detach().clone())
        return hook

    handles = [m.register_forward_hook(after(n)) for n, m in named]
    handles += [m.register_forward_pre_hook(before(n)) for n, m in named if isinstance(m, torch.nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    modules = dict(named)
    once = {n: (seq, out) for n, (seq, out) in done.items()
            if calls[n] == 1 and out is not None and out.ndim >= 1 and out.shape[0] == rows}
    last_at: dict[tuple, tuple[int, str]] = {}
    for n, (seq, out) in once.items():
        if out.ndim == 4 and _has_parameters(modules[n]):
            size = tuple(out.shape[2:])
            if size not in last_at or seq > last_at[size][0]:
                last_at[size] = (seq, n)
    stages = sorted(last_at.values())[-AUTO_MAX_STAGES:]

    chosen = list(stages)
    once_linear = [(seq, n, h) for n, (seq, h) in linear_in.items()
                   if calls.get(n) == 1 and h is not None and h.shape[0] == rows]
    if once_linear:
        call_seq, _, h = max(once_linear, key=lambda t: t[0])
        flat = h.reshape(rows, -1)
        holders = [(seq, n) for n, (seq, out) in once.items() if seq < call_seq and out.numel() == flat.numel()
                   and out.dtype == flat.dtype and torch.equal(out.reshape(rows, -1), flat)]
        if holders:
            seq, name = max(holders)
            last_stage = once[stages[-1][1]][1] if stages else None
            pen = _pool(once[name][1])
            gap_head = (last_stage is not None and _pool(last_stage).shape == pen.shape
                        and torch.allclose(_pool(last_stage), pen, rtol=1e-4, atol=1e-6))
            if not gap_head and name not in {n for _, n in stages}:
                chosen.append((seq, name))
    if not chosen:
        names = [n for n, _ in named]
        raise ValueError(f"layers: 'auto' found no module to tap in {type(model).__name__}: no module with "
                         "parameters returns a (batch, C, H, W) tensor and no module's output is the input of the "
                         "last nn.Linear; pass layers= a list of names from model.named_modules()"
                         + (f", e.g. {names[:10]}" if names else " (it has no submodules)"))
    return [n for _, n in sorted(chosen)]


def _first_input(loader):
    """(the loader's first batch's inputs, a loader that still yields every batch): a one-shot
    iterator gets its first batch back in front."""
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("loader: yielded no batches") from None
    if it is loader:  # a generator or iterator: what was taken must not be lost
        loader = itertools.chain([first], it)
    else:
        del it  # a DataLoader's iterator (and its workers) ends here
    return _split_batch(first, 0, 0)[0], loader


# ----------------------------------------------------------------------------- indices=

class _WithDataset:
    """`loader` seen with another dataset (for shard_loader, which batches a dataset like `loader`)."""

    def __init__(self, loader, dataset):
        self._loader, self.dataset = loader, dataset

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _check_indices(indices, loader) -> np.ndarray:
    """Dataset positions as int64 in the order given: 1-D integers, distinct, in [0, len(dataset))."""
    try:
        n = check_shardable(loader, 1)
    except ValueError as exc:
        raise ValueError(f"indices: a subset is taken from a DataLoader over a sized map-style dataset with "
                         f"batch_size set, in order (shuffle=False, no sampler), drop_last=False (the check it shares "
                         f"with sharded extraction says: {exc})") from None
    if isinstance(indices, (str, bytes)) or not hasattr(type(indices), "__len__"):
        raise TypeError(f"indices: expected a 1-D sequence of integer dataset positions, got "
                        f"{type(indices).__name__} {indices!r:.80}")
    check_index_set(indices, "indices", n)  # masked, dtype, shape, range, duplicates
    arr = (indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices))
    if arr.size == 0:
        raise ValueError("indices: expected at least one dataset position, got none; nothing to extract")
    return arr.astype(np.int64).reshape(-1)


def _subset_loader(loader, indices: np.ndarray):
    """The rows `indices` of `loader`'s dataset, in that order, batched like `loader`."""
    return shard_loader(_WithDataset(loader, Subset(loader.dataset, indices.tolist())), 0, len(indices))


def _indices_digest(indices: np.ndarray, n: int) -> dict:
    """What a store records of `indices` (a resume with other indices is refused)."""
    data = np.ascontiguousarray(indices, dtype="<i8").tobytes()
    return {"count": int(indices.size), "of": int(n), "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------- extract

def extract(model: torch.nn.Module, loader, layers="auto", pseudo_label: str = "argmax", *,
            with_true: bool = False, badge: bool = False, badge_layer: str | None = None,
            map_reference=None, mc_passes: int = 8, mc_degrees: float = 15.0, mc_brightness: float = 0.1,
            projection=None, seed: int = 0, device=None, amp: bool | None = None,
            channels_last: bool | None = None, dtype: str | None = None, store=None,
            overwrite: bool = False, progress: bool | None = None, sharded: bool | None = None,
            indices=None) -> Extraction:
    """Extract PFK descriptors for every example the loader yields (or the rows `indices`).

    Args:
        model: a classifier returning logits (B, C). Left as found afterwards
            (train/eval flags, requires_grad, BatchNorm buffers, .grad).
        loader: iterable of x, (x, y) or (x, y, ids) batches (e.g. a DataLoader).
        layers: module names as in `model.named_modules()`, e.g. ["layer1", ..., "layer4"], or
            "auto" (default): the main stages' outputs plus the penultimate features, chosen by
            `auto_layers` (its docstring has the exact rule: per spatial resolution the last module
            with parameters to finish, the deepest 4 of them, plus the input of the last nn.Linear)
            from one forward pass of the first rows of the loader's first batch (on the `indices`
            subset if given). The choice is logged (logger "pyfk", INFO) and kept in meta["layers"]
            and a store's settings; a model where the rule finds nothing raises ValueError naming
            `layers` and listing names to pick from.
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
            over a sized dataset in a fixed order). overwrite=True starts it over. A complete
            store is opened read-only and returned; one writer at a time (StoreLockedError
            names the other); see pyfk.features.store for space, symlink and lock rules.
            Inside an initialised torch.distributed process group of W > 1 ranks, every rank
            calls it (collective) and writes its shard STORE/shard-RRRRR-of-WWWWW/ of a sharded
            store: the loader (a DataLoader over the whole dataset, not shuffled) is split into W
            contiguous parts, each resumable; STORE/sharded.json is written once every shard is
            complete; an error on one rank raises on every rank. Returns this rank's shard
            (meta["shard"]: rank, world, offset, ...); `pyfk.ShardedStore.open(STORE)` reads
            them as one pool (see pyfk.features.sharded).
        sharded: None (default): the sharded layout inside a group of W > 1 ranks, a plain
            store otherwise; False: a plain store written by this process alone, even inside a
            group; True: the sharded layout (needs store=), also in a single process (one shard).
        indices: None (every row), or a 1-D sequence of distinct integer positions in
            [0, len(loader.dataset)): extract only those rows, in the order given (e.g. the
            unlabeled part of a pool). Needs a DataLoader over a sized map-style dataset in order
            (shuffle=False, no sampler, drop_last=False); the rows are read through a Subset batched
            like the loader (batch_size, collate_fn, workers, pinning). Example ids the loader does
            not give are the dataset positions. With store= the indices' digest is part of the
            store's settings: a rerun with the same indices resumes, other indices are refused
            (overwrite=True starts over). Bad indices (floats, 2-D, duplicates, out of range, empty)
            raise TypeError/ValueError naming `indices`.
    Every argument is checked before any batch is computed or any store file touched: a bad
    one raises ValueError/TypeError naming it (`name: expected X, got Y`): layers (a list of
    module names or "auto"; "auto" runs one forward pass first, see above), indices, loader
    (iterable), projection (None, a positive int or {layer: positive int}), seed (an int in
    [0, 2**63)), finite non-negative mc_degrees / mc_brightness, device (known and available),
    store (a directory, or a path where one can be made).
    Per batch, before the forward pass: labels (the loader's second element) and ids must be
    integers (TypeError naming `labels` / `loader`; floats would be truncated).
    Raises ValueError naming the example ids (nothing of that batch is kept) for NaN/Inf
    descriptors or probabilities and for labels outside [0, classes) where labels are used.
    Returns:
        Extraction (see its docstring).
    """
    if sharded is not None and not isinstance(sharded, bool):
        raise TypeError(f"sharded: expected None, True or False, got {type(sharded).__name__} {sharded!r:.80}")
    if sharded and store is None:
        raise ValueError("sharded: True writes a sharded store and needs store=DIR, got store=None")
    row_ids = subset = None
    if indices is not None:
        _check_loader(loader)
        row_ids = _check_indices(indices, loader)
        subset = _indices_digest(row_ids, len(loader.dataset))
        loader = _subset_loader(loader, row_ids)
    if isinstance(layers, str) and layers == "auto":
        # the cheap checks first: the forward pass below is the only work done before _extract's checks
        check_choice(pseudo_label, "pseudo_label", PSEUDO_LABELS)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        _check_loader(loader)
        x, loader = _first_input(loader)
        layers = auto_layers(model, _to_device(x, _check_device(device, model), False))
        log.info("pyfk.extract: layers='auto' chose %s for %s", layers, type(model).__name__)
    options = dict(with_true=with_true, badge=badge, badge_layer=badge_layer, map_reference=map_reference,
                   mc_passes=mc_passes, mc_degrees=mc_degrees, mc_brightness=mc_brightness, projection=projection,
                   seed=seed, device=device, amp=amp, channels_last=channels_last, dtype=dtype, progress=progress,
                   row_ids=row_ids, subset=subset)
    if store is not None and sharded is not False and (sharded or rank_and_world()[1] > 1):
        def run(shard_loader, shard_path, shard):
            return _extract(model, shard_loader, layers, pseudo_label, store=shard_path, overwrite=overwrite,
                            shard=shard, **options)
        return extract_sharded(run, loader, store, overwrite)
    return _extract(model, loader, layers, pseudo_label, store=store, overwrite=overwrite, **options)


def _extract(model: torch.nn.Module, loader, layers, pseudo_label: str = "argmax", *,
             with_true: bool = False, badge: bool = False, badge_layer: str | None = None,
             map_reference=None, mc_passes: int = 8, mc_degrees: float = 15.0, mc_brightness: float = 0.1,
             projection=None, seed: int = 0, device=None, amp: bool | None = None,
             channels_last: bool | None = None, dtype: str | None = None, store=None,
             overwrite: bool = False, progress: bool | None = None, shard: dict | None = None,
             row_ids: np.ndarray | None = None, subset: dict | None = None) -> Extraction:
    """`extract` in this process (see there); `shard` (a sharded extraction's {"rank", "world",
    "offset", "total"}) is kept in the store's settings, and example ids the loader does not give
    count from its offset (the global row). With `indices`, the loader is the subset's: `row_ids`
    maps its (global) rows to dataset positions (the default ids) and `subset` (the indices'
    digest) is kept in the store's settings."""
    # every argument is checked here, before any batch is computed or any store file touched
    check_choice(pseudo_label, "pseudo_label", PSEUDO_LABELS)
    if dtype is None:
        dtype = "float32" if store is None else "float16"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'float32', 'float16' or 'float64', got {dtype!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_loader(loader)
    if pseudo_label == "map":
        map_desc, map_labels = _check_map_reference(map_reference)
    mc_passes = check_int(mc_passes, "mc_passes", 1, 2**31 - 1)
    mc_degrees = _check_nonnegative(mc_degrees, "mc_degrees")
    mc_brightness = _check_nonnegative(mc_brightness, "mc_brightness")
    seed = check_int(seed, "seed", 0, _MAX_SEED)
    layers = _check_layers(layers)
    modules = _resolve_modules(model, layers)
    projection = _check_projection(projection, layers)
    badge_module = None
    if badge:
        badge_module = _badge_module(model, badge_layer)
    device = _check_device(device, model)
    cuda = device.type == "cuda"
    if amp is None:
        amp = cuda and torch.cuda.is_bf16_supported()
    if channels_last is None:
        channels_last = cuda

    if store is not None:
        config = dict(layers=list(layers), pseudo_label=pseudo_label, with_true=with_true, badge=badge,
                      badge_layer=badge_layer, projection=projection, seed=seed, dtype=dtype,
                      mc=[mc_passes, mc_degrees, mc_brightness] if pseudo_label == "mc" else None)
        if shard is not None:
            config["shard"] = shard
        if subset is not None:
            config["indices"] = subset
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
               desc="pyfk.extract" if shard is None else f"pyfk.extract [rank {shard['rank']}/{shard['world']}]",
               disable=not show)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        row = start
        id_base = 0 if shard is None else int(shard["offset"])  # default ids: the row in the whole dataset
        for b_index, batch in enumerate(batches):
            x, y, ids = _split_batch(batch, b_index, row + id_base)
            if row_ids is not None and not (isinstance(batch, (tuple, list)) and len(batch) > 2):
                ids = torch.from_numpy(row_ids[row + id_base:row + id_base + x.shape[0]])
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
            if pseudo_label == "true" or with_true:
                _check_labels(y, int(logits.shape[1]), ids, b_index, "labels")
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
                target = _map_labels(z_out, map_desc, map_labels)
                _check_labels(target, int(logits.shape[1]), ids, b_index, "map_reference")
                target = target.to(device)
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
            _check_finite(batch_out, layers, ids, b_index)  # before anything of the batch is kept
            if writer is not None:
                writer.write(row, batch_out)
            else:
                out.add(batch_out)
            row += x.shape[0]
            bar.update(x.shape[0])
    except BaseException:
        if writer is not None:
            writer.close()  # releases the store's write lock now, not when the traceback is dropped
        raise
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


def _check_loader(loader) -> None:
    """Something to iterate over batches of (a DataLoader, a list of batches, a generator)."""
    iterable = hasattr(type(loader), "__iter__") or hasattr(type(loader), "__getitem__")
    if isinstance(loader, (str, bytes)) or not iterable:
        raise TypeError(f"loader: expected a DataLoader or an iterable of x, (x, y) or (x, y, ids) batches, "
                        f"got {type(loader).__name__} {loader!r:.80}")


def _check_layers(layers) -> list:
    """A list of the layer names (module names); a string (other than "auto", resolved before
    this) or a non-iterable raises TypeError."""
    if isinstance(layers, (str, bytes)) or not (hasattr(type(layers), "__iter__")):
        raise TypeError(f"layers: expected a non-empty list of module names or 'auto', got {type(layers).__name__} "
                        f"{layers!r:.80}")
    return list(layers)


def _check_nonnegative(value, name: str) -> float:
    """A finite real number >= 0 (an MC perturbation parameter)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite number >= 0, got {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return value


def _check_projection(projection, layers: list):
    """None, a positive int width, or {layer: positive int width (or None)} over names in `layers`."""
    def width(v, where: str):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"projection: expected None, a positive integer width or a dict {{layer: positive "
                            f"integer}}, got {type(v).__name__} {v!r:.80}{where}")
        if v < 1:
            raise ValueError(f"projection: expected a positive integer width, got {int(v)}{where}")
        return int(v)

    if projection is None:
        return None
    if isinstance(projection, dict):
        unknown = [k for k in projection if k not in layers]
        if unknown:
            raise ValueError(f"projection: keys {unknown!r:.200} are not among the tapped layers {layers}")
        return {k: None if v is None else width(v, f" for layer {k!r}") for k, v in projection.items()}
    return width(projection, "")


def _check_device(device, model: torch.nn.Module) -> torch.device:
    """The torch.device to run on (default: the model's); an unknown or unavailable device raises
    ValueError naming `device` before any work."""
    if device is None:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device: expected a torch.device, a device string such as 'cpu' or 'cuda:0', or a CUDA "
                        f"device index, got {type(device).__name__} {device!r:.80}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        if isinstance(device, int) and device >= 0:  # an accelerator index where none is available
            raise ValueError(f"device: expected an available device, got {device!r}: no CUDA (accelerator) device "
                             "is available; use device='cpu'") from None
        raise ValueError(f"device: expected a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r:.80}") \
            from None
    if dev.type == "meta":
        raise ValueError(f"device: expected a device that holds data, got {device!r} (the meta device)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: expected an available device, got {device!r}: no CUDA device is available "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device: expected an available device, got {device!r}: there "
                             f"{'is' if count == 1 else 'are'} {count} CUDA device(s) (indices 0..{count - 1})")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, ValueError, TypeError, NotImplementedError) as exc:
            raise ValueError(f"device: expected an available device, got {device!r} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return dev


def _check_labels(y: torch.Tensor, classes: int, ids: torch.Tensor, b_index: int, name: str) -> None:
    """Class indices must be in [0, classes) before they reach cross_entropy (IndexError there)."""
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        bad = bad.cpu()
        values = sorted(set(y.cpu()[bad].tolist()))
        bad_ids = ids[bad].tolist()
        more = f" and {len(bad_ids) - 20} more" if len(bad_ids) > 20 else ""
        raise ValueError(f"{name}: expected class indices in [0, {classes}) (the model returns {classes} classes), "
                         f"got {values[:20]} for example ids {bad_ids[:20]}{more} (batch {b_index}); nothing of this "
                         "batch was stored")


def _check_finite(b: dict, layers, ids: torch.Tensor, b_index: int) -> None:
    """NaN/Inf in a batch's descriptors or probabilities (a NaN input, a diverged model): raise
    naming the arrays and the example ids. One device sync when all is well."""
    named = []
    for j, layer in enumerate(layers):
        named.append((f"z{j} (layer {layer!r})", b["z"][j]))
        named.append((f"g{j} (layer {layer!r})", b["g"][j]))
        if b["g_true"] is not None:
            named.append((f"g_true{j} (layer {layer!r})", b["g_true"][j]))
    named.append(("probs", b["probs"]))
    if "badge" in b:
        named += [("badge_h0", b["badge"][0]), ("badge_e0", b["badge"][1])]
    rows_ok = torch.stack([torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1) for _, t in named])
    if bool(rows_ok.all()):
        return
    rows_ok = rows_ok.cpu()
    which = [what for (what, _), ok in zip(named, rows_ok) if not bool(ok.all())]
    bad_ids = ids[~rows_ok.all(dim=0)].tolist()
    more = f" and {len(bad_ids) - 20} more" if len(bad_ids) > 20 else ""
    raise ValueError(f"extract: non-finite values (NaN or Inf) in {', '.join(which)} for example ids "
                     f"{bad_ids[:20]}{more} (batch {b_index}); check those inputs and the model (a NaN input, "
                     "a diverged model); nothing of this batch was stored")


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
