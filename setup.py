"""Build pyfk's C++ extensions with CMake; everything else is pyproject.toml.

pyfk._C (CPU kernels) must build. pyfk._C_cuda (CUDA k-selection) is an optional
extension built in its own CMake tree only when CMake finds a CUDA compiler; if it
cannot be built, setuptools skips it with a warning (PYFK_NO_CUDA=1 skips it;
PYFK_CUDA_ARCH sets CMAKE_CUDA_ARCHITECTURES, default 90). Where a CUDA compiler exists
but the build fails, that is no quiet skip: a banner goes to stderr and the reason is
written to pyfk/_C_cuda_build_error.txt, which pyfk.backends() reports for the cuda backend
(and benchmarks/gpu_suite.py fails on); a successful build removes it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False):
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("PYFK_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
        ]
        jobs = str(os.cpu_count() or 2)
        if ext.name == "pyfk._C":
            subprocess.run(["cmake", str(ROOT), *cmake_args, "-DPYFK_CUDA=OFF"], cwd=build_dir, check=True)
            subprocess.run(["cmake", "--build", ".", "--target", "_C", "--parallel", jobs], cwd=build_dir,
                           check=True)
            return
        # pyfk._C_cuda is optional=True: a CompileError here makes setuptools skip it with a warning.
        marker = out_dir / "_C_cuda_build_error.txt"
        marker.unlink(missing_ok=True)
        if os.environ.get("PYFK_NO_CUDA"):
            raise CompileError("PYFK_NO_CUDA is set")
        extra = ["-DPYFK_CUDA=ON"]
        if os.environ.get("PYFK_CUDA_ARCH"):
            extra.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['PYFK_CUDA_ARCH']}")
        compiler = shutil.which("nvcc") is not None
        try:
            subprocess.run(["cmake", str(ROOT), *cmake_args, *extra], cwd=build_dir, check=True)
            compiler = "PYFK_BUILD_CUDA:INTERNAL=ON" in (build_dir / "CMakeCache.txt").read_text()
            if not compiler:
                raise CompileError("no CUDA compiler found")
            subprocess.run(["cmake", "--build", ".", "--target", "_C_cuda", "--parallel", jobs], cwd=build_dir,
                           check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            reason = f"the CUDA module failed to build ({exc})"
            if compiler:  # a toolkit is here, so this is a broken build, not a CPU-only machine: say so loudly
                marker.write_text(reason + "\n")
                bar = "!" * 78
                print(f"\n{bar}\npyfk: a CUDA compiler was found but pyfk._C_cuda FAILED to build; the cuda backend "
                      f"will be unavailable.\n{reason}\n(compiler errors above; recorded in {marker})\n{bar}\n",
                      file=sys.stderr)
            raise CompileError(reason) from exc


setup(ext_modules=[CMakeExtension("pyfk._C"), CMakeExtension("pyfk._C_cuda", optional=True)],
      cmdclass={"build_ext": CMakeBuild})
