"""Resumable extraction into an on-disk DescriptorStore (used by pyfk.extract(store=...)).

Every batch is written to the memory-mapped arrays and then committed with an
atomic manifest update, so an interrupted run (exception, Ctrl-C, kill) leaves
the rows of the last committed batch and a rerun with the same arguments
continues right after them. Arrays: z{j}, g{j} (g_true{j}) (n, L_j) float16 by
default; probs (n, C) float32; pred, pseudo, labels (-1 = none), ids (n,) int64;
badge_h0, badge_e0 when asked.

The last batch is committed together with the extraction meta (one manifest
update), so a complete store always carries it. While writing, the store's
write lock is held (a second writer gets StoreLockedError); it is released on
finish and on any exception. A complete store is opened read-only (no lock, no
write access needed) and returned as is.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler, Subset

from pyfk.features.extraction import Extraction
from pyfk.features.store import DescriptorStore, check_store_target


def _np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class StoreWriter:
    def __init__(self, path, loader, config: dict, overwrite: bool):
        self.path = check_store_target(path, "store")  # a file in the way: an error now, before any batch
        self.loader = loader
        self.config = json.loads(json.dumps(config))  # JSON-normalised, as stored
        try:
            self.n = len(loader.dataset)
        except (AttributeError, TypeError) as exc:
            raise ValueError("store: extraction into a store needs a DataLoader over a sized dataset "
                             f"(len(loader.dataset)), got {type(loader).__name__}") from exc
        sampler = getattr(loader, "sampler", None)
        if sampler is not None and not isinstance(sampler, SequentialSampler):
            raise ValueError("store: the loader must yield examples in a fixed order (shuffle=False, no "
                             "random sampler) so that an interrupted extraction can resume")
        self.store = None
        self.overwrite = bool(overwrite)
        manifest = os.path.join(self.path, "manifest.json")
        if os.path.lexists(manifest) and not overwrite:
            # read-only first: a complete store needs no write access (nor the write lock)
            store = self._checked(DescriptorStore.open(self.path, "r"))
            if not store.complete:
                store.close()
                store = self._checked(DescriptorStore.open(self.path, "r+"))  # takes the write lock
            self.store = store
        self.written = 0 if self.store is None else self.store.rows_done  # rows written (committed or not)

    def _checked(self, store: DescriptorStore) -> DescriptorStore:
        """`store` if it was written with these settings and loader (else closed, ValueError)."""
        try:
            stored = store.meta.get("config")
            if stored != self.config:
                diff = sorted(k for k in set(self.config) | set(stored or {})
                              if (stored or {}).get(k) != self.config.get(k))
                raise ValueError(f"store: {self.path} was written with different settings ({diff}: "
                                 f"{ {k: (stored or {}).get(k) for k in diff} }); pass overwrite=True to start over")
            if store.n != self.n:
                raise ValueError(f"store: {self.path} holds {store.n} rows but the loader has {self.n}")
            want, have = set(self._names()), set(store.names)
            if want != have:
                missing, extra = sorted(want - have), sorted(have - want)
                what = (f"has no entry for {missing}, which these settings write" if missing
                        else f"lists {extra}, which these settings do not write")
                raise ValueError(f"store: {os.path.join(self.path, 'manifest.json')} {what} (it lists "
                                 f"{sorted(have)}); the manifest was edited or belongs to another extraction: "
                                 "pass overwrite=True to start over")
        except BaseException:
            store.close()
            raise
        return store

    def _names(self) -> list:
        """The arrays a store of these settings holds (see the module docstring)."""
        names = []
        for j in range(len(self.config["layers"])):
            names += [f"z{j}", f"g{j}"] + ([f"g_true{j}"] if self.config["with_true"] else [])
        names += ["probs", "pred", "pseudo", "labels", "ids"]
        if self.config["badge"]:
            names += ["badge_h0", "badge_e0"]
        return names

    @property
    def complete(self) -> bool:
        return self.store is not None and self.store.complete

    def remaining_batches(self):
        """(batches to run, first row): everything after the committed rows."""
        start = 0 if self.store is None else self.store.rows_done
        if start == 0:
            return self.loader, 0
        loader = self.loader
        if isinstance(loader, DataLoader) and loader.batch_size is not None:
            rest = DataLoader(Subset(loader.dataset, range(start, self.n)), batch_size=loader.batch_size,
                              num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                              pin_memory=loader.pin_memory, drop_last=False)
            return rest, start
        return _skip_rows(loader, start), start

    def _create(self, b: dict):
        dtype = self.config["dtype"]
        arrays = {}
        for j, z in enumerate(b["z"]):
            arrays[f"z{j}"] = ((int(z.shape[1]),), dtype)
            arrays[f"g{j}"] = ((int(b["g"][j].shape[1]),), dtype)
            if b["g_true"] is not None:
                arrays[f"g_true{j}"] = ((int(b["g_true"][j].shape[1]),), dtype)
        arrays["probs"] = ((int(b["probs"].shape[1]),), "float32")
        for key in ("pred", "pseudo", "labels", "ids"):
            arrays[key] = ((), "int64")
        if "badge" in b:
            arrays["badge_h0"] = ((int(b["badge"][0].shape[1]),), "float32")
            arrays["badge_e0"] = ((int(b["badge"][1].shape[1]),), "float32")
        self.store = DescriptorStore.create(self.path, self.n, arrays, meta={"config": self.config},
                                            overwrite=self.overwrite)

    def write(self, row: int, b: dict) -> None:
        if self.store is None:
            self._create(b)
        count = int(b["pred"].shape[0])
        if row + count > self.n:
            raise ValueError(f"loader: yielded more than len(loader.dataset) = {self.n} examples")
        out = {}
        for j in range(len(b["z"])):
            out[f"z{j}"] = _np(b["z"][j])
            out[f"g{j}"] = _np(b["g"][j])
            if b["g_true"] is not None:
                out[f"g_true{j}"] = _np(b["g_true"][j])
        out["probs"] = _np(b["probs"]).astype(np.float32)
        for key in ("pred", "pseudo", "ids"):
            out[key] = _np(b[key]).astype(np.int64)
        out["labels"] = (np.full(count, -1, np.int64) if b["labels"] is None
                         else _np(b["labels"]).astype(np.int64))
        if "badge" in b:
            out["badge_h0"], out["badge_e0"] = _np(b["badge"][0]), _np(b["badge"][1])
        self._check_fits(out)
        self.store.write(row, out)
        self.written = row + count
        if row + count < self.n:
            self.store.commit(row + count)
        # else: the last rows are committed by finish() together with the extraction meta, in one
        # manifest update, so that a complete store always carries its meta (killed in between,
        # a rerun redoes the last batch instead of returning a store without it)

    def _check_fits(self, out: dict) -> None:
        """Finite descriptors too large for the store dtype (float16: 65504) raise naming the ids."""
        dtype = np.dtype(self.config["dtype"])
        for key, a in out.items():
            if a.dtype.kind != "f" or a.ndim != 2 or self.store.array(key).dtype != dtype or a.dtype == dtype:
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                bad = ~np.isfinite(a.astype(dtype)).all(axis=1) & np.isfinite(a).all(axis=1)
            if bad.any():
                ids = out["ids"][bad]
                more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
                raise ValueError(f"store: values of {key} overflow {dtype} (max {np.finfo(dtype).max:g}) for example "
                                 f"ids {ids[:20].tolist()}{more}; store float32 (dtype='float32') or rescale; "
                                 "nothing of this batch was stored")

    def finish(self, meta: dict):
        try:
            if self.store is None:
                raise ValueError("loader: yielded no batches")
            if self.written != self.n:
                raise ValueError(f"loader: yielded {self.written} examples, len(loader.dataset) is {self.n}")
            self.store.commit(self.n, meta={"config": self.config, "extract": meta})
        finally:
            self.close()
        return self.extraction()

    def close(self) -> None:
        """Release the store (and its write lock); what is committed stays."""
        if self.store is not None:
            self.store.close()

    def extraction(self):
        if self.store is not None and self.store.mode == "r" and self.store.complete:
            return extraction_from_store(self.store)  # a complete store, opened read-only
        self.close()
        return extraction_from_store(DescriptorStore.open(self.path, "r"))


def extraction_from_store(store: DescriptorStore) -> Extraction:
    """An Extraction whose arrays are the store's memmaps (read-only views)."""
    names = set(store.names)
    labels = store.rows("labels")
    grad_true = store.descriptors(g_prefix="g_true") if "g_true0" in names else None
    badge = None
    if "badge_h0" in names:
        badge = store.descriptors(z_prefix="badge_h", g_prefix="badge_e", same_widths=False)
    return Extraction(store.descriptors(), store.rows("probs"), store.rows("pred"),
               None if (labels < 0).all() else labels, store.rows("ids"), store.rows("pseudo"),
               grad_true, badge, dict(store.meta.get("extract", {}), store=store.path))


def _skip_rows(loader, start: int):
    """Batches of a generic iterable after its first `start` examples (slicing a straddling batch)."""
    row = 0
    for batch in loader:
        parts = batch if isinstance(batch, (tuple, list)) else (batch,)
        n = len(parts[0])
        if row + n <= start:
            row += n
            continue
        cut = max(0, start - row)
        row += n
        sliced = tuple(p[cut:] for p in parts)
        yield sliced if isinstance(batch, (tuple, list)) else sliced[0]
