"""The micro-kernel's k loop compiles to the code the speed depends on.

For each of the avx512 / avx2 kernels, compiled to assembly with CMake's flags, every
inlined copy of the register-blocked tile loop (MR x NRV FMAs) must broadcast its MR
query values straight from memory (`vbroadcastss mem, reg`: a load-port uop) and do no
other floating-point work. Before this was checked, `vf{} + x` compiled to a scalar
vaddss plus a register broadcast per query row (GCC may not fold 0 + x: it is +0 for
x = -0), extra uops on the ports the FMAs need: the kernel ran at ~55-65% of its peak.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("microkernel_mca", ROOT / "benchmarks" / "microkernel_mca.py")
mca = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mca)

SOURCE = ROOT / "csrc" / "cpu"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_tile_loop_broadcasts_from_memory_and_does_only_fmas(isa):
    mr, nrv = mca.tile_constants(SOURCE, isa)
    loops = mca.tile_loops(mca.assembly(SOURCE, isa), mr * nrv)
    assert loops, f"{isa}: no loop with {mr * nrv} FMAs: the tile was not register-blocked"
    for body in loops:
        ops = [line.split()[0] for line in body if line.strip()]
        broadcasts = [line for line in body if "vbroadcastss" in line]
        assert len(broadcasts) == mr, body
        assert all(re.search(r"vbroadcastss\s+-?\w*\(", line) for line in broadcasts), \
            f"{isa}: a broadcast from a register (an extra shuffle uop):\n" + "\n".join(broadcasts)
        fp_other = [op for op in ops if re.match(r"v(add|sub|mul)[sp]s|vshufps|vpermps|vpbroadcast", op)]
        assert not fp_other, f"{isa}: floating-point work besides the FMAs in the k loop: {fp_other}"


def test_checker_sees_the_old_code():
    """The check fails on the loop the `vf{} + x` broadcast produced (from an older build)."""
    old = ["vaddss (%rax), %xmm3, %xmm4", "vmovups (%rsi), %zmm2", "vbroadcastss %xmm4, %zmm4",
           "vfmadd231ps %zmm2, %zmm4, %zmm28", "jne .L5"]
    broadcasts = [line for line in old if "vbroadcastss" in line]
    assert not all(re.search(r"vbroadcastss\s+-?\w*\(", line) for line in broadcasts)
    assert [op for op in (x.split()[0] for x in old) if re.match(r"v(add|sub|mul)[sp]s", op)] == ["vaddss"]
