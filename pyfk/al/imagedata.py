"""Datasets for `pyfk extract` without torchvision.

    ds = ImageFolderDataset("pool/", size=32)          # root/<class>/<image>, like torchvision ImageFolder
    ds = TensorFileDataset("pool.pt")                   # torch.save({"x": x, "y": y, "ids": ids})
    ds = TensorFileDataset("pool.npz")                  # np.savez(..., x=x, y=y, ids=ids)
    x, label, index = ds[i]

Every item is (x, label, id): a float tensor, an int label (-1 when the data has
none, the store's "no label" value) and an int id, which is what `pyfk.extract`
reads as (x, y, ids) batches.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "TensorFileDataset", "Normalized", "load_dataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
NO_LABEL = -1


def _size_pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size: expected positive sizes, got {size!r}")
    return h, w


class ImageFolderDataset(Dataset):
    """Images in class-per-subfolder trees, ``root/<class>/**/<file>``, read with Pillow.

    Like torchvision's ImageFolder: classes are the sorted subfolder names (label =
    position), files are found recursively, sorted, and kept when their extension
    is one of IMAGE_EXTENSIONS (case-insensitive). Items are (x, label, index) with
    x a float32 tensor (C, H, W) in [0, 1]: C = 3 (RGB) or 1 (`grayscale=True`).
    `size` (int or (H, W)) resizes every image (bilinear); without it the images
    must already share one size to be batched.

    Attributes: root, classes, class_to_idx, samples [(path, label)], targets.
    """

    def __init__(self, root, size=None, grayscale: bool = False):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root}: no such directory")
        self.size = _size_pair(size)
        self.grayscale = bool(grayscale)
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{self.root}: no class subfolders (expected {self.root}/<class>/<image files>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for cls in self.classes:
            for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(self.root, cls), followlinks=True)):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), self.class_to_idx[cls]))
        if not self.samples:
            raise ValueError(f"{self.root}: no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in its "
                             f"class subfolders {self.classes[:5]}{' ...' if len(self.classes) > 5 else ''}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The image at `index` as a float32 (C, H, W) tensor in [0, 1]."""
        from PIL import Image

        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.grayscale else "RGB")
                if self.size is not None and img.size != (self.size[1], self.size[0]):
                    img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
                a = np.asarray(img, dtype=np.uint8)
        except OSError as exc:
            raise OSError(f"{path}: cannot read the image ({exc})") from exc
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int):
        return self.load(index), self.samples[index][1], index

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={self.root!r}, {len(self.samples)} images, {len(self.classes)} classes, "
                f"size={self.size}, grayscale={self.grayscale})")


# What a tensor file may hold besides tensors: NumPy arrays of numeric dtypes. Their pickle
# rebuilds an ndarray from a dtype and raw bytes; nothing of the file runs. torch's
# weights_only loader also wants the dtype classes (BUILD on a Float32DType instance).
# NumPy 1.x pickles name numpy.core.multiarray, NumPy 2.x numpy._core.multiarray.
def _numpy_safe_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype]
    allowed += list(dict.fromkeys(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"))
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6):  # (obj, "name") entries
        allowed += [(_reconstruct, "numpy.core.multiarray._reconstruct"),
                    (_reconstruct, "numpy._core.multiarray._reconstruct")]
    return allowed


class UnsafePickleError(ValueError):
    """A file holds pickled objects that pyfk refuses to unpickle (unpickling them could
    run code from the file). `path`, `globals` (the classes/functions the pickle names
    that are not allowed, possibly empty) and `reason` (why torch refused it)."""

    def __init__(self, path: str, globals_: list[str], reason: str):
        self.path, self.globals, self.reason = path, list(globals_), reason
        super().__init__(f"{path}: not loaded: {self.held}; pyfk reads .pt/.pth files with "
                         "torch.load(weights_only=True) and never unpickles other objects (that could run code "
                         "from the file)")

    @property
    def whole_module(self) -> bool:
        return any(g.startswith("torch.nn.modules.") for g in self.globals)

    @property
    def held(self) -> str:
        """What the file holds, in words, for an error message."""
        if not self.globals:
            return f"torch.load(weights_only=True) refused it ({self.reason})"
        names = sorted(self.globals, key=lambda g: (g.startswith("torch."), g))
        shown = ", ".join(names[:4]) + (f", +{len(names) - 4} more" if len(names) > 4 else "")
        if self.whole_module:
            return f"a whole pickled nn.Module ({shown})"
        return f"pickled Python objects that are not tensors ({shown})"


def _refusal_reason(exc: BaseException) -> str:
    """The informative part of torch's weights_only error, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if m and m.group(1).strip():
        text = m.group(1)
    else:
        m = re.search(r"^.*unsupported GLOBAL.*$", text, re.M | re.I)
        if m:
            text = m.group(0)
    text = text.split(" Please use `torch.serialization")[0]
    text = " ".join(text.split())
    return text or type(exc).__name__


_STRING_OPS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
# Globals torch's weights_only loader allows that a raw (legacy-format) torch.save pickle names.
_ALWAYS_SAFE = re.compile(r"collections\.OrderedDict|_codecs\.encode|torch\._utils\.\w+|torch\.\w+Storage"
                          r"|torch\.Size|torch\.device|torch\.(float|half|double|bfloat|u?int|long|short|bool|complex)\d*")


def _scan_globals(path: str, limit: int = 4) -> list[str]:
    """The module.name globals that the first pickles of a raw (non-zip) file reference,
    read with pickletools, which only parses: nothing is imported or called. Best effort."""
    import pickletools

    found = []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for _ in range(limit):  # torch's legacy format: a few pickles, then raw storages
                if f.tell() >= size:
                    break
                memo, pushed = {}, []
                for op, arg, _pos in pickletools.genops(f):
                    name = op.name
                    if name in _STRING_OPS:
                        pushed.append(arg)
                    elif name == "MEMOIZE":
                        memo[len(memo)] = pushed[-1] if pushed else None
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = pushed[-1] if pushed else None
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    else:
                        if name == "GLOBAL":
                            found.append(arg.replace(" ", "."))
                        elif (name == "STACK_GLOBAL" and len(pushed) >= 2
                              and all(isinstance(v, str) for v in pushed[-2:])):
                            found.append(f"{pushed[-2]}.{pushed[-1]}")
                        pushed.append(None)
    except Exception:  # noqa: BLE001 - a description only: stop where the file stops parsing
        pass
    return [g for g in dict.fromkeys(found) if not _ALWAYS_SAFE.fullmatch(g)]


def _unsafe_globals(path: str) -> list[str]:
    """The globals in a .pt file that torch's weights_only loader does not allow, found
    without unpickling anything."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            return sorted(finder(path))
        except Exception:  # noqa: BLE001 - not a zip checkpoint: scan the raw pickles
            pass
    return _scan_globals(path)


def load_weights_only(path: str, allow_numpy: bool = True):
    """``torch.load(path, weights_only=True)`` on the CPU, never anything less safe.

    Tensors, containers of them and plain Python values load; with `allow_numpy`, NumPy
    arrays too. A file that holds any other pickled object raises UnsafePickleError (a
    ValueError) naming the file and what it holds; an unreadable file a ValueError.
    No code from the file runs.
    """
    import contextlib

    path = os.fspath(path)
    allow = contextlib.nullcontext()
    if allow_numpy and hasattr(torch.serialization, "safe_globals"):
        allow = torch.serialization.safe_globals(_numpy_safe_globals())
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(path, _unsafe_globals(path), _refusal_reason(exc)) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises KeyError/EOFError/RuntimeError on non-torch files
        reason = _refusal_reason(exc)
        reason = reason if reason == type(exc).__name__ else f"{type(exc).__name__}: {reason}"
        raise ValueError(f"{path}: not a readable torch.save file ({reason})") from None


def _object_array_keys(path: str) -> list[str]:
    """Members of an .npz that hold object arrays (pickled Python objects), read from the headers only."""
    import zipfile

    keys = []
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    if reader(f)[2].hasobject:
                        keys.append(member[:-4] if member.endswith(".npy") else member)
    except Exception:  # noqa: BLE001 - a description only
        pass
    return keys


def _load_tensor_file(path: str) -> dict:
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            objects = _object_array_keys(path)
            if objects:
                held = (f"{objects[0]!r} holds an object array" if len(objects) == 1
                        else f"{', '.join(map(repr, objects))} hold object arrays")
                raise ValueError(f"{path}: {held} (pickled Python objects); pyfk loads .npz files with "
                                 "allow_pickle=False and never unpickles them: store numeric arrays") from None
            if "allow_pickle" in str(exc):
                raise ValueError(f"{path}: holds pickled data, not an .npz archive of arrays; pyfk loads "
                                 ".npz files with allow_pickle=False and never unpickles them") from None
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    data = load_weights_only(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict {{'x': tensor, 'y': labels, 'ids': ids}}, "
                         f"got {type(data).__name__}")
    return data


def _as_tensor(value, path: str, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        a = np.asarray(value)
    except Exception:  # anything np.asarray refuses
        a = None
    if a is None or a.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {key!r} must be a numeric tensor or array, got {type(value).__name__}")
    return torch.from_numpy(np.ascontiguousarray(a))


class TensorFileDataset(Dataset):
    """In-memory examples from a ``torch.save``d dict or an ``.npz`` file with keys
    "x" (n, ...) and optional "y" (n,) integer labels and "ids" (n,) integer ids.

    Items are (x[i], y[i] or -1, ids[i] or i). Integer x (e.g. uint8 images) becomes
    float32 / 255; floating x is kept as stored (cast with `dtype=` if given).
    Attributes: path, x, y (None without labels), ids, has_labels.

    Nothing in the file is executed: .pt/.pth files load with ``torch.load(weights_only=True)``
    (tensors, NumPy arrays and plain values), .npz files with ``allow_pickle=False``; a file
    holding any other pickled object is a ValueError naming the file and what it holds.
    """

    def __init__(self, path, dtype: torch.dtype | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        data = _load_tensor_file(self.path)
        if "x" not in data:
            raise ValueError(f"{self.path}: missing key 'x' (found keys {sorted(map(str, data))}); expected "
                             "{'x': inputs (n, ...), 'y': labels (n,), 'ids': ids (n,)}")
        unknown = sorted(str(k) for k in data if k not in ("x", "y", "ids"))
        if unknown:
            raise ValueError(f"{self.path}: unexpected key(s) {unknown}; expected 'x' and optional 'y', 'ids'")
        x = _as_tensor(data["x"], self.path, "x")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{self.path}: 'x' holds no examples (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if dtype is not None:
            x = x.to(dtype)
        n = x.shape[0]
        self.x = x
        self.y = self._ints(data.get("y"), "y", n)
        self.ids = self._ints(data.get("ids"), "ids", n)
        if self.ids is None:
            self.ids = torch.arange(n)
        elif torch.unique(self.ids).numel() != n:
            raise ValueError(f"{self.path}: 'ids' has duplicate values")

    def _ints(self, value, key: str, n: int):
        if value is None:
            return None
        t = _as_tensor(value, self.path, key)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{self.path}: {key!r} must hold integers, got {t.dtype}")
        t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t
        if t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"{self.path}: 'x' has {n} examples but {key!r} has shape {tuple(t.shape)}")
        t = t.long()
        if key == "y" and t.numel() and int(t.min()) < 0:
            raise ValueError(f"{self.path}: 'y' has negative labels (min {int(t.min())})")
        return t

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int):
        y = NO_LABEL if self.y is None else int(self.y[index])
        return self.x[index], y, int(self.ids[index])

    def __repr__(self) -> str:
        return (f"TensorFileDataset(path={self.path!r}, x={tuple(self.x.shape)} {self.x.dtype}, "
                f"labels={'yes' if self.has_labels else 'no'})")


class Normalized(Dataset):
    """Wraps a dataset of (x, label, id) items: x -> (x - mean) / std per channel (dim 0)."""

    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]):
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean/std: expected the same number of values, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std: expected positive values, got {std}")
        self.dataset = dataset
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y, i = self.dataset[index]
        if x.ndim != 3 or self.mean.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mean/std: {self.mean.shape[0]} values for inputs of shape {tuple(x.shape)} "
                             "(expected one per channel, or one)")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype), y, i

    def __getattr__(self, name):  # has_labels, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def load_dataset(path, size=None, grayscale: bool = False) -> Dataset:
    """A folder -> ImageFolderDataset; .pt/.pth/.npz -> TensorFileDataset."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return ImageFolderDataset(path, size=size, grayscale=grayscale)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.endswith((".pt", ".pth", ".npz")):
        raise ValueError(f"{path}: expected an image folder, a .pt/.pth file (torch.save of "
                         "{'x', 'y', 'ids'}) or an .npz file")
    if size is not None or grayscale:
        raise ValueError(f"{path}: --image-size/--grayscale apply to image folders; store tensor files "
                         "already at the model's input size")
    return TensorFileDataset(path)
