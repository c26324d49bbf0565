import os
import secrets

import numpy as np
import pytest
import torch

import pyfk
from pyfk.engine.kernels import cpu as cpu_kernels


def _available_cpu_backends():
    return [b["name"] for b in pyfk.backends() if b["available"] and "cpu" in b["devices"] and b["exact"]]


CPU_BACKENDS = _available_cpu_backends()

SEED_ENV = "PYFK_TEST_SEED"


@pytest.fixture
def rng(request):
    """A fresh seeded NumPy Generator per test. The seed is random unless PYFK_TEST_SEED
    is set; a failing test reports it (rerun with PYFK_TEST_SEED=<seed> to reproduce)."""
    seed = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else secrets.randbits(32)
    request.node.user_properties.append(("rng_seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "rng_seed":
                report.sections.append(("rng seed", f"{SEED_ENV}={value} reproduces this test's random inputs"))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=["auto", "avx2", "generic"])
def cpu_isa(request, monkeypatch):
    """Run the `cpu` backend once per instruction-set variant this CPU supports."""
    from pyfk import _C

    if request.param != "auto" and request.param not in _C.isas():
        pytest.skip(f"CPU lacks {request.param}")
    monkeypatch.setenv(cpu_kernels.ISA_ENV, request.param)
    return request.param


def make_arrays(rng, n, widths, dtype=np.float32, integer=False):
    def one(L):
        if integer:
            return rng.integers(-2, 3, size=(n, L)).astype(dtype)
        return rng.standard_normal((n, L)).astype(dtype)
    return [one(L) for L in widths], [one(L) for L in widths]


def make_descriptors(z, g, kind="numpy", torch_dtype=None):
    if kind == "torch":
        conv = [torch.from_numpy(a) for a in z], [torch.from_numpy(a) for a in g]
        if torch_dtype is not None:
            conv = [a.to(torch_dtype) for a in conv[0]], [a.to(torch_dtype) for a in conv[1]]
        return pyfk.Descriptors(*conv)
    return pyfk.Descriptors(z, g)


def as_float64(arrays):
    out = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.float().numpy()
        out.append(np.asarray(a, dtype=np.float64))
    return out
