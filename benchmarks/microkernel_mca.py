"""Static throughput of the cpu backend's micro-kernel on CPUs we cannot run on.

Compiles csrc/cpu/kernel_<isa>.cpp to assembly exactly as CMake does (g++ -O3
-fno-math-errno -std=c++17), takes the innermost loop of the register-blocked tile
(the loop with MR x NRV vfmadd231ps and the MR query broadcasts), and asks llvm-mca how
many cycles one iteration (one k step of an MR x NR tile) takes on each CPU model.

    python benchmarks/microkernel_mca.py                    # the working tree
    python benchmarks/microkernel_mca.py --source OLD/csrc/cpu  # e.g. a worktree of an older commit

Needs g++ and llvm-mca (Debian: `apt install llvm`). flops/cycle = 2 x VW x FMAs per
iteration / cycles per iteration; the peak is 2 x VW x FMA pipes (AVX-512 with two FMA
units: 64; AVX2 with two: 32).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-O3", "-fno-math-errno", "-std=c++17"]  # CMakeLists.txt's kernel flags
# isa -> (vector width in floats, llvm-mca CPU models to ask)
ISAS = {
    "avx512": (16, ["skylake-avx512", "icelake-server", "sapphirerapids"]),
    "avx2": (8, ["haswell", "skylake", "icelake-server", "znver2", "znver3"]),
}


def tile_constants(source: Path, isa: str) -> tuple[int, int]:
    """(MR, NRV) as kernel_<isa>.cpp defines them."""
    text = (source / f"kernel_{isa}.cpp").read_text()
    mr = int(re.search(r"#define PYFK_MR (\d+)", text).group(1))
    nrv = int(re.search(r"#define PYFK_NRV (\d+)", text).group(1))
    return mr, nrv


def assembly(source: Path, isa: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"kernel_{isa}.s"
        subprocess.run(["g++", *FLAGS, f"-I{source}", "-S", str(source / f"kernel_{isa}.cpp"), "-o", str(out)],
                       check=True, capture_output=True)
        return out.read_text()


def tile_loops(asm: str, fmas: int) -> list[list[str]]:
    """Bodies of every innermost loop (label .. backward jump to it, no label between) with
    exactly `fmas` vfmadd231ps and at least one vbroadcastss: the micro-kernel's k loop, once
    per place it is inlined."""
    lines = asm.splitlines()
    loops = []
    for i, line in enumerate(lines):
        label = re.match(r"^(\.L\d+):", line)
        if not label:
            continue
        for j in range(i + 1, min(i + 400, len(lines))):
            if re.search(r"\bj\w+\s+" + re.escape(label.group(1)) + r"$", lines[j]):
                if any(re.match(r"^\.L\d+:", x) for x in lines[i + 1:j]):
                    break  # another label inside: not an innermost, straight-line loop
                body = [x for x in lines[i + 1:j + 1] if not x.strip().startswith(".")]
                if (sum("vfmadd231ps" in x for x in body) == fmas
                        and any("vbroadcastss" in x for x in body)):
                    loops.append(body)
                break
    return loops


def mca_cycles(body: list[str], cpu: str, iterations: int = 500) -> float | None:
    run = subprocess.run(["llvm-mca", f"-mcpu={cpu}", f"-iterations={iterations}"], input="\n".join(body),
                         capture_output=True, text=True)
    m = re.search(r"^Total Cycles:\s+(\d+)", run.stdout, re.M)
    return int(m.group(1)) / iterations if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT / "csrc" / "cpu", help="directory with kernel_*.cpp")
    args = ap.parse_args()
    if not shutil.which("llvm-mca"):
        raise SystemExit("llvm-mca not found (Debian: apt install llvm)")
    print(f"source: {args.source}")
    print(f"{'isa':7} {'tile':6} {'cpu model':16} {'cycles/iter':>11} {'flops/cycle':>11}")
    for isa, (vw, cpus) in ISAS.items():
        mr, nrv = tile_constants(args.source, isa)
        loops = tile_loops(assembly(args.source, isa), mr * nrv)
        if not loops:
            raise SystemExit(f"{isa}: no loop with {mr * nrv} FMAs found")
        body = loops[0]
        for cpu in cpus:
            cycles = mca_cycles(body, cpu)
            if cycles is None:
                print(f"{isa:7} {mr}x{nrv * vw:<4} {cpu:16} {'(model unknown to this llvm-mca)':>24}")
                continue
            print(f"{isa:7} {mr}x{nrv * vw:<4} {cpu:16} {cycles:11.2f} {2 * vw * mr * nrv / cycles:11.1f}")


if __name__ == "__main__":
    main()
