"""Resumable extraction into an on-disk DescriptorStore (used by pyfk.extract(store=...)).

Every batch is written to the memory-mapped arrays and then committed with an
atomic manifest update, so an interrupted run (exception, Ctrl-C, kill) leaves
the rows of the last committed batch and a rerun with the same arguments
continues right after them. Arrays: z{j}, g{j} (g_true{j}) (n, L_j) float16 by
default; probs (n, C) float32; pred, pseudo, labels (-1 = none), ids (n,) int64;
badge_h0, badge_e0 when asked.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler, Subset

from pyfk.features.extraction import Extraction
from pyfk.features.store import DescriptorStore


def _np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class StoreWriter:
    def __init__(self, path, loader, config: dict, overwrite: bool):
        self.path = os.fspath(path)
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
        manifest = os.path.join(self.path, "manifest.json")
        if os.path.exists(manifest) and not overwrite:
            store = DescriptorStore.open(self.path, "r+")
            stored = store.meta.get("config")
            if stored != self.config:
                diff = sorted(k for k in set(self.config) | set(stored or {})
                              if (stored or {}).get(k) != self.config.get(k))
                raise ValueError(f"store: {self.path} was written with different settings ({diff}: "
                                 f"{ {k: (stored or {}).get(k) for k in diff} }); pass overwrite=True to start over")
            if store.n != self.n:
                raise ValueError(f"store: {self.path} holds {store.n} rows but the loader has {self.n}")
            self.store = store

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
                                            overwrite=True)

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
        self.store.write(row, out)
        self.store.commit(row + count)

    def finish(self, meta: dict):
        if self.store is None:
            raise ValueError("loader: yielded no batches")
        if self.store.rows_done != self.n:
            raise ValueError(f"loader: yielded {self.store.rows_done} examples, len(loader.dataset) is {self.n}")
        self.store.commit(self.n, meta={"config": self.config, "extract": meta})
        return self.extraction()

    def extraction(self):
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
