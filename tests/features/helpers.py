"""Helpers shared by the store and extraction tests."""

import numpy as np

WIDTHS = (16, 8)


def store_spec(widths=WIDTHS, dtype="float16"):
    """DescriptorStore.create's `arrays` for z/g per scale plus int64 labels."""
    spec = {}
    for j, L in enumerate(widths):
        spec[f"z{j}"] = ((L,), dtype)
        spec[f"g{j}"] = ((L,), dtype)
    spec["labels"] = ((), "int64")
    return spec


def store_batch(rng, rows, widths=WIDTHS, start=0):
    """One batch of random rows for store_spec's arrays; labels count up from `start`."""
    b = {}
    for j, L in enumerate(widths):
        b[f"z{j}"] = rng.standard_normal((rows, L)).astype(np.float32)
        b[f"g{j}"] = rng.standard_normal((rows, L)).astype(np.float32)
    b["labels"] = np.arange(start, start + rows, dtype=np.int64)
    return b


class FailingLoader:
    """A DataLoader stand-in whose iteration raises after `fail_after` batches."""

    def __init__(self, loader, fail_after):
        self.loader, self.fail_after = loader, fail_after
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.fail_after:
                raise RuntimeError("loader died")
            yield batch
