"""pip front end. Metadata lives in pyproject.toml; this file maps the package layout
(``kernels/`` installs as ``oneref.kernels``) and builds the native extension ``oneref._C``
by running CMake on CMakeLists.txt (the one description of the native build).

Environment switches (read at build time):

* ``ONEREF_SKIP_EXT=1``   do not build the extension (pure-Python install).
* ``ONEREF_FORCE_CUDA=1`` a CUDA build is required: a missing toolkit or a failed CUDA
  build is an error instead of a fallback to the CPU kernels.
* ``CUDA_HOME`` / ``CUDA_PATH`` or ``nvcc`` on ``PATH``: the CUDA toolkit. Without one the
  CPU kernels are built alone (said once in the build log).
* ``TORCH_CUDA_ARCH_LIST``  compute capabilities, default ``"8.0;9.0"``.
* ``MAX_JOBS``              parallel compile jobs (default: CPU count).
* ``ONEREF_BUILD_TYPE``     CMake build type, default ``Release``.

torch must be importable while building (the extension compiles against the installed torch),
hence ``pip install --no-build-isolation``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(message: str) -> None:
    print(f"oneref build: {message}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    """The nvcc of CUDA_HOME / CUDA_PATH, else the one on PATH (None without a toolkit)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc)
            _log(f"{var}={home} has no bin/nvcc; ignoring it")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, writing the module where setuptools expects it
    (in the source tree for editable installs)."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        force_cuda = _env_flag("ONEREF_FORCE_CUDA")
        cuda = self._cuda_mode(force_cuda)
        try:
            self._cmake(target, cuda)
        except subprocess.CalledProcessError as exc:
            if cuda != "ON" or force_cuda:
                raise RuntimeError(f"oneref: building the extension failed ({exc}); see the "
                                   "log above") from exc
            _log("the CUDA build failed; building the CPU kernels only (set "
                 "ONEREF_FORCE_CUDA=1 to make this an error)")
            self._cmake(target, "OFF")

    def _cuda_mode(self, force_cuda: bool) -> str:
        try:
            import torch  # the extension compiles against the installed torch
        except ImportError as exc:
            raise RuntimeError("oneref: torch is not importable while building the extension; "
                               "install torch first and run pip with --no-build-isolation "
                               "(or set ONEREF_SKIP_EXT=1)") from exc
        if shutil.which("cmake") is None:
            raise RuntimeError("oneref: cmake (>= 3.18) is needed to build the extension: "
                               "pip install cmake ninja (or set ONEREF_SKIP_EXT=1)")

        nvcc = find_nvcc()
        why = None
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        elif nvcc is None:
            why = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
        if why is None:
            self._nvcc = nvcc
            return "ON"
        if force_cuda:
            raise RuntimeError(f"oneref: ONEREF_FORCE_CUDA=1 but {why}")
        _log(f"building the CPU kernels only: {why}")
        return "OFF"

    def _cmake(self, target: Path, cuda: str) -> None:
        build_dir = Path(self.build_temp).resolve() / f"cmake-cuda-{cuda.lower()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ONEREF_BUILD_TYPE', 'Release')}",
            f"-DONEREF_OUTPUT_DIR={build_dir / 'out'}",
            f"-DONEREF_CUDA={cuda}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if cuda == "ON":
            args.append(f"-DCMAKE_CUDA_COMPILER={self._nvcc}")
            args.append(f"-DCUDAToolkit_ROOT={Path(self._nvcc).resolve().parent.parent}")
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
            args.append(f"-DONEREF_CUDA_ARCHS={archs}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)
        built = sorted((build_dir / "out").glob("_C.*"))
        if not built:
            raise RuntimeError(f"oneref: CMake finished but no _C module in {build_dir / 'out'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)
        _log(f"built {target.name} ({'CPU + CUDA' if cuda == 'ON' else 'CPU only'} kernels)")


ext_modules = [] if _env_flag("ONEREF_SKIP_EXT") else [CMakeExtension("oneref._C")]
if not ext_modules:
    _log("ONEREF_SKIP_EXT=1: not building the native extension oneref._C")

setup(
    packages=find_packages(include=["oneref", "oneref.*"]) + ["oneref.kernels"],
    package_dir={"oneref.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
