"""Argument validators shared by every layer.

Every message has one form -- `name: expected X, got Y` -- and every check runs
before any work or write, so a rejected call changes nothing.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_int(value, name: str, lo: int, hi: int, what: str = "") -> int:
    """An integer (not a bool, not a float) in [lo, hi]; `what` explains the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}]{what}, got {value}")
    return value


def check_not_masked(a, name: str) -> None:
    """Masked arrays would pass value checks on their hidden entries: refuse them."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a NumPy masked array (np.ma.MaskedArray); "
                        "fill or drop the masked entries first")


def check_index_set(idx, name: str, n: int) -> np.ndarray:
    """Sorted unique int64 indices in [0, n); duplicates or out-of-range raise."""
    check_not_masked(idx, name)
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected a 1-D array of integer indices, got dtype {arr.dtype}, "
                        f"shape {arr.shape}")
    # compare before casting: uint64 values beyond int64 must be reported as given, not wrapped
    bad = arr[(arr >= n) | ((arr < 0) if arr.dtype.kind == "i" else False)]
    if bad.size:
        raise ValueError(f"{name}: expected indices in [0, {n}), got {[int(b) for b in bad[:5]]}")
    arr = arr.astype(np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name}: expected distinct indices, got duplicates {uniq[counts > 1][:5].tolist()}")
    return uniq


def check_labels(y, name: str, n: int, against: str = "val") -> np.ndarray:
    """(n,) integer class labels as a NumPy array."""
    check_not_masked(y, name)
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match {against}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    return arr
