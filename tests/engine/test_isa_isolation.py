"""The per-instruction-set kernel files must not leak their instruction set.

kernel_avx512.cpp, kernel_avx2.cpp and kernel_generic.cpp share the standard
library's templates (std::vector, std::thread, ...). If one of them compiled
those templates with AVX-512 enabled, the linker keeps one copy for all three,
and the avx2/generic kernels die with SIGILL on a CPU without AVX-512 -- which
happened on an AVX2-only AMD EPYC. This test builds pyfk._C unstripped, reads
its disassembly and checks that every function using VEX (AVX) or EVEX
(AVX-512) encodings lives in the namespace of a kernel allowed to use them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pybind11 = pytest.importorskip("pybind11")
pytestmark = pytest.mark.skipif(
    not (shutil.which("cmake") and shutil.which("objdump") and shutil.which("c++"))
    or not re.match(r"x86_64|AMD64", __import__("platform").machine()),
    reason="needs cmake, a C++ compiler and objdump on x86-64",
)

# Leading byte of an instruction in 64-bit mode: 0x62 starts an EVEX (AVX-512)
# encoding, 0xC4/0xC5 a VEX (AVX/AVX2/FMA) one; neither can follow a legacy prefix.
LEVEL = {"62": 2, "c4": 1, "c5": 1}
LEVEL_NAME = ["baseline", "AVX", "AVX-512"]


# objdump -C leaves some names mangled (lambdas inside function templates): an entity of
# namespace pyfk::<isa> (_ZN...), const member (_ZNK...) or local to one of its functions (_ZZN...).
MANGLED = r"_ZZ?NK?4pyfk{}"


def allowed_level(function: str) -> int:
    head = function.split("(", 1)[0]  # drop arguments; a return type may precede the name
    if re.search(r"(^|\s)pyfk::avx512::", head) or re.match(MANGLED.format("6avx512"), function):
        return 2
    if re.search(r"(^|\s)pyfk::avx2::", head) or re.match(MANGLED.format("4avx2"), function):
        return 1
    return 0


def isa_levels(disassembly: str) -> dict[str, int]:
    levels: dict[str, int] = {}
    function = None
    for line in disassembly.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            function = m.group(1)
            levels.setdefault(function, 0)
            continue
        # An instruction line has bytes, a tab and a mnemonic; a long instruction's
        # continuation line has bytes only (and its first byte means nothing).
        m = re.match(r"^\s+[0-9a-f]+:\t([0-9a-f]{2})[0-9a-f ]*\t\S", line)
        if m and function is not None:
            levels[function] = max(levels[function], LEVEL.get(m.group(1), 0))
    return levels


def test_checker_sees_vex_and_evex():
    sample = (
        "0000000000001000 <pyfk::generic::f(int)>:\n"
        "    1000:\tc5 fc 58 c1          \tvaddps %ymm1,%ymm0,%ymm0\n"
        "0000000000002000 <std::vector<long>::_M_fill_assign(unsigned long, long const&)>:\n"
        "    2000:\t62 f2 fd 08 7c c0    \tvpbroadcastq %rax,%xmm0\n"
        "0000000000002100 <pyfk::generic::g(int)>:\n"
        "    2100:\t48 b8 00 00 00 00 00 \tmovabs $0x62c5000000000000,%rax\n"
        "    2107:\t62 c5 \n"
        "0000000000003000 <void pyfk::avx512::sweep_rows<int>(int)>:\n"
        "    3000:\t62 f2 fd 08 7c c0    \tvpbroadcastq %rax,%xmm0\n"
    )
    levels = isa_levels(sample)
    assert levels["pyfk::generic::f(int)"] == 1
    assert levels["std::vector<long>::_M_fill_assign(unsigned long, long const&)"] == 2
    assert levels["pyfk::generic::g(int)"] == 0
    assert allowed_level("void pyfk::avx512::sweep_rows<int>(int)") == 2
    assert allowed_level("_ZZN4pyfk6avx512L9run_tasksIZNS0_L15parallel_ranges") == 2
    assert allowed_level("_ZZN4pyfk4avx2L9run_tasksIZNS0_L15parallel_ranges") == 1
    assert allowed_level("_ZNSt6vectorIlSaIlEE14_M_fill_assignEmRKl") == 0
    assert allowed_level("std::vector<long>::_M_fill_assign(unsigned long, long const&)") == 0


def test_no_instruction_set_leaks_out_of_its_kernel(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    # RelWithDebInfo: same -O3 kernel flags, but pybind11 does not strip the symbols.
    subprocess.run(
        ["cmake", str(ROOT), "-DPYFK_CUDA=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"],
        cwd=build, check=True, capture_output=True,
    )
    subprocess.run(["cmake", "--build", ".", "--target", "_C", "--parallel", "2"], cwd=build, check=True,
                   capture_output=True)
    (library,) = build.glob("_C*.so")
    dis = subprocess.run(["objdump", "-d", "-C", str(library)], check=True, capture_output=True, text=True).stdout
    levels = isa_levels(dis)
    assert any(name.startswith("pyfk::avx512::") or " pyfk::avx512::" in name for name in levels), \
        "no avx512 kernel symbols found: is the library stripped?"
    assert max(levels.values()) == 2, "the avx512 kernel has no AVX-512 instruction"
    leaks = sorted(f"{LEVEL_NAME[lvl]}: {name[:200]}" for name, lvl in levels.items() if lvl > allowed_level(name))
    assert not leaks, "functions outside an ISA kernel use its instructions:\n" + "\n".join(leaks)
