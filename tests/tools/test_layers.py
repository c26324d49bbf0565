"""The package's import graph: no cycle (function-local imports included) and layers
that run one way -- errors <- engine <- features <- al <- distributed/api <- cli/bench."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "pyfk"

# A module may import only from its own layer or a lower one.
LAYERS = {"pyfk.errors": 0, "pyfk.fileio": 0, "pyfk._version": 0, "pyfk.testing": 0, "pyfk.engine": 1,
          "pyfk.features": 2, "pyfk.al": 3, "pyfk.distributed": 4, "pyfk.api": 4, "pyfk.integrations": 5,
          "pyfk.bench": 5, "pyfk.plan": 5,
          "pyfk.bench_extract": 5, "pyfk.cli": 6, "pyfk.cli_select": 6, "pyfk.cli_audit": 6,
          "pyfk.__main__": 7, "pyfk": 8}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: Path, known: set) -> set:
    """pyfk modules imported anywhere in the file (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip |= {id(n) for sub in node.body for n in ast.walk(sub)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pyfk")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyfk") and node.level == 0:
            for a in node.names:  # `from pyfk.x import y` imports pyfk.x.y if that is a module
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: imports(p, set(files)) - {m} for m, p in files.items()}


def cycles(g: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_checker_finds_a_cycle_and_a_climb():
    g = {"pyfk.engine.a": {"pyfk.engine.b"}, "pyfk.engine.b": {"pyfk.engine.a"}, "pyfk.al.x": set()}
    assert cycles(g) == [["pyfk.engine.a", "pyfk.engine.b"]]
    assert layer("pyfk.engine.kernels.cpu") < layer("pyfk.features.store") < layer("pyfk.al.runner")


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, f"import cycles among pyfk modules: {found}"


def test_layers_run_one_way():
    climbs = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
              if d != "pyfk" and layer(d) > layer(m) and not m.startswith(d + ".")]
    assert not climbs, "a lower layer imports a higher one:\n" + "\n".join(sorted(climbs))
