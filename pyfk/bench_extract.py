"""Descriptor extraction throughput against a plain forward+backward (DESIGN.md section 6).

    result = run_bench_extract("resnet18")            # or "lenet"
    print(format_table(result))

Three ways through the same model and the same in-memory DataLoader of random
images, each timed as the median of `repeats` passes after one warm-up batch:
  extract  `pyfk.extract(model, loader, layers)`: argmax pseudo labels, in memory;
  plain    a training step without the optimizer: model.eval(), parameters requiring
           grad, per batch logits = model(x); cross_entropy(logits, y, "sum").backward();
           model.zero_grad() (weight gradients computed);
  forward  model(x) under torch.no_grad(), for context.
Target: extract at >= 0.85x the images/s of plain (it skips the weight gradients,
so > 1x is expected).
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pyfk
from pyfk.al.models import MODELS, default_layers
from pyfk.bench import machine_info

TARGET = 0.85
CONFIGS = {
    "lenet": {"shape": (1, 28, 28), "n": 1024},
    "resnet18": {"shape": (3, 32, 32), "n": 512},
}
METHODS = ("extract", "plain", "forward")
_LABELS = {
    "extract": "extract (z, g; argmax labels)",
    "plain": "plain fwd+bwd (weight grads)",
    "forward": "forward only (no_grad)",
}


# ----------------------------------------------------------------------------- inputs

def make_model(name: str, width: int = 64, classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A built-in model (pyfk.al.models) with seeded random weights, in eval mode.

    The weights come from torch's CPU generator seeded with `seed` inside fork_rng, so
    the caller's random state is left as it was.
    """
    if name not in CONFIGS:
        raise ValueError(f"model: expected one of {sorted(CONFIGS)}, got {name!r}")
    kwargs = {"classes": classes, "in_channels": CONFIGS[name]["shape"][0]}
    if name == "resnet18":
        kwargs["width"] = width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**kwargs).eval()


def make_loader(name: str, n: int, batch_size: int, classes: int = 10, seed: int = 0) -> DataLoader:
    """n random images of the model's input shape with random labels, in a TensorDataset DataLoader."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *CONFIGS[name]["shape"], generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ----------------------------------------------------------------------------- the three ways

class _Setup:
    """Device placement matching pyfk.extract's defaults (bf16 autocast and channels_last on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.amp = self.cuda and torch.cuda.is_bf16_supported()

    def inputs(self, x, y):
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def run_extract(model, loader, layers, setup: _Setup):
    out = pyfk.extract(model, loader, layers, pseudo_label="argmax", device=setup.device, progress=False)
    setup.sync()
    return out


def run_plain(model, loader, setup: _Setup) -> None:
    """Forward + summed cross-entropy + backward with weight gradients, grads zeroed after each batch."""
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for x, y in loader:
            x, y = setup.inputs(x, y)
            with setup.autocast():
                logits = model(x)
            F.cross_entropy(logits.float(), y, reduction="sum").backward()
            model.zero_grad(set_to_none=True)
        setup.sync()
    finally:
        model.train(was_training)
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


def run_forward(model, loader, setup: _Setup) -> None:
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, _ = setup.inputs(x, y)
            with setup.autocast():
                model(x)
    setup.sync()


# ----------------------------------------------------------------------------- the harness

def run_bench_extract(model: str = "resnet18", batch_size: int = 128, n: int | None = None, repeats: int = 3,
                      width: int = 64, threads: int | None = None, device: str = "cpu", seed: int = 0,
                      layers: list[str] | None = None, methods=METHODS) -> dict:
    """Time extract / plain fwd+bwd / forward on the same model and data; returns a JSON-ready dict."""
    if model not in CONFIGS:
        raise ValueError(f"model: expected one of {sorted(CONFIGS)}, got {model!r}")
    n = CONFIGS[model]["n"] if n is None else int(n)
    if n < 1 or batch_size < 1 or repeats < 1 or width < 1:
        raise ValueError(f"n, batch_size, repeats and width must be positive, got {n}, {batch_size}, "
                         f"{repeats}, {width}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: expected some of {list(METHODS)}, got {list(methods)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available here")
    if threads:
        torch.set_num_threads(int(threads))
    layers = list(layers) if layers else default_layers(model)
    net = make_model(model, width=width, seed=seed).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    loader = make_loader(model, n, batch_size, seed=seed)
    warm = DataLoader(torch.utils.data.Subset(loader.dataset, range(min(batch_size, n))), batch_size=batch_size)
    setup = _Setup(dev)
    runners = {
        "extract": lambda data: run_extract(net, data, layers, setup),
        "plain": lambda data: run_plain(net, data, setup),
        "forward": lambda data: run_forward(net, data, setup),
    }
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info(dev)  # before timing: the load average shows other work on the machine
    for m in methods:  # one warm-up batch each
        runners[m](warm)
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved, so slow drifts of the machine hit every method alike
        for m in methods:
            c0, t0 = time.process_time(), time.perf_counter()
            runners[m](loader)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)

    rows = []
    threads_now = torch.get_num_threads()
    for m in methods:
        seconds = statistics.median(times[m])
        # CPU seconds per wall second per thread: well below 1 means the threads did not get their cores
        util = sum(cpu[m]) / sum(times[m]) / threads_now
        rows.append({"method": m, "seconds": seconds, "times": times[m], "images_per_s": n / seconds,
                     "cpu_util": util})
    by = {r["method"]: r for r in rows}
    ratio = (by["extract"]["images_per_s"] / by["plain"]["images_per_s"]
             if "extract" in by and "plain" in by else None)
    return {
        "args": {"model": model, "batch_size": batch_size, "n": n, "repeats": repeats, "width": width,
                 "threads": threads, "device": str(dev), "seed": seed, "layers": layers,
                 "methods": list(methods)},
        "argv": list(sys.argv),
        "date": date,
        "machine": machine,
        "model": {"name": model, "params": sum(p.numel() for p in net.parameters()),
                  "input": list(CONFIGS[model]["shape"]), "amp_bf16": setup.amp},
        "rows": rows,
        "ratio_extract_plain": ratio,
        "target": TARGET,
        "meets_target": None if ratio is None else ratio >= TARGET,
    }


def format_table(result: dict) -> str:
    a, mach, mod = result["args"], result["machine"], result["model"]
    shape = "x".join(map(str, mod["input"]))
    desc = f"{a['model']}" + (f" width {a['width']}" if a["model"] == "resnet18" else "")
    lines = [
        f"pyfk {mach['pyfk']} extraction benchmark  {result['date']}",
        f"machine: {mach['cpu']}, {mach['cpu_count']} CPUs, torch {mach['torch']} with {mach['torch_threads']} "
        f"threads, load average {mach['loadavg_1min']:.2f}" + (f", GPU {mach['gpu']['name']}" if "gpu" in mach else ""),
        f"model: {desc} ({mod['params'] / 1e6:.2f}M params), layers {','.join(a['layers'])}; "
        f"{a['n']} random {shape} images, batch {a['batch_size']}, device {a['device']}"
        + (" (bf16 autocast)" if mod["amp_bf16"] else ""),
        "",
    ]
    plain = next((r for r in result["rows"] if r["method"] == "plain"), None)
    table = [("method", "s", "images/s", "vs plain", "CPU util")]
    for r in result["rows"]:
        rel = "-" if plain is None else f"{r['images_per_s'] / plain['images_per_s']:.2f}x"
        table.append((_LABELS[r["method"]], f"{r['seconds']:.3f}", f"{r['images_per_s']:.1f}", rel,
                      f"{100 * r['cpu_util']:.0f}%"))
    width = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        lines.append("  ".join([row[0].ljust(width[0])] + [c.rjust(w) for c, w in zip(row[1:], width[1:])]))
        if i == 0:
            lines.append("  ".join("-" * w for w in width))
    lines.append("")
    lines.append(f"s: median of {a['repeats']} passes after one warm-up batch; CPU util: process CPU time / "
                 f"(wall time x {mach['torch_threads']} threads), low values mean other work took the cores")
    low = [r["method"] for r in result["rows"] if r["cpu_util"] < 0.85]
    if low and a["device"] == "cpu":
        lines.append(f"warning: CPU utilisation below 85% for {', '.join(low)}: other processes took cores "
                     "from the torch threads, so these timings (and the ratio) are unreliable; rerun on a quiet "
                     "machine or with --threads below the free cores")
    if result["ratio_extract_plain"] is not None:
        verdict = "meets" if result["meets_target"] else "BELOW"
        lines.append(f"extract / plain fwd+bwd: {result['ratio_extract_plain']:.2f}x ({verdict} the target "
                     f">= {result['target']:.2f}x)")
    return "\n".join(lines)
