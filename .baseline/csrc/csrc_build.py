"""Build description of the native extensions, imported by setup.py (`from csrc_build import extensions`).

  pixtral_rt._C       C++ CPU op (preprocess.cpp + bindings.cpp), needs pybind11 and a C++17 compiler
  pixtral_rt._C_cuda  CUDA op: preprocess_cuda.cu compiled by nvcc (see CudaExtension.prepare) and linked
                      with bindings_cuda.cpp and the static CUDA runtime; only when nvcc is found

No torch headers anywhere, so the build does not depend on the installed torch. Env knobs:
PIXTRAL_RT_NO_CUDA=1 skips the CUDA op; PIXTRAL_RT_CUDA_ARCHS="80;90" picks the GPU archs (default 80;90;
PTX for the newest, so newer GPUs JIT it); CUDA_HOME / nvcc on PATH locate the toolkit.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"]


def _rel(p: Path) -> str:
    return os.path.relpath(p, ROOT)  # setuptools wants sources relative to setup.py


def _pybind11_include() -> str | None:
    env = os.environ.get("PYBIND11_INCLUDE")
    if env:
        return env
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def _cuda_home() -> Path | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return Path(cand)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(os.path.realpath(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


class CudaExtension(Extension):
    """An Extension whose .cu sources are compiled by nvcc before the host compile/link (setup.py's
    OptionalBuildExt calls `prepare(build_ext)` first; a failure there means 'no CUDA op', never a failed
    install)."""

    def __init__(self, name, sources, cuda_sources, cuda_home: Path, **kw):
        super().__init__(name, sources, **kw)
        self.cuda_sources = cuda_sources
        self.cuda_home = cuda_home

    def prepare(self, build_ext) -> None:
        nvcc = str(self.cuda_home / "bin" / "nvcc")
        archs = os.environ.get("PIXTRAL_RT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        archs = [a.strip() for a in archs if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        out_dir = Path(build_ext.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in self.cuda_sources:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17", "--fmad=false",
                   "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-I", str(HERE), *gencode]
            print("pixtral_rt: " + " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            if str(obj) not in self.extra_objects:
                self.extra_objects.append(str(obj))


def extensions() -> list[Extension]:
    inc = _pybind11_include()
    if inc is None:
        print("pixtral_rt: pybind11 not importable at build time; native extension skipped "
              "(pip install pybind11, then reinstall with --no-build-isolation)", file=sys.stderr)
        return []
    exts: list[Extension] = [Extension(
        "pixtral_rt._C",
        sources=[_rel(HERE / "preprocess.cpp"), _rel(HERE / "bindings.cpp")],
        include_dirs=[inc, str(HERE)],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-pthread"],
        language="c++",
    )]
    cuda = None if os.environ.get("PIXTRAL_RT_NO_CUDA") == "1" else _cuda_home()
    if cuda is not None:
        lib = cuda / "lib64"
        if not lib.exists():
            lib = cuda / "lib"
        exts.append(CudaExtension(
            "pixtral_rt._C_cuda",
            sources=[_rel(HERE / "bindings_cuda.cpp")],
            cuda_sources=[_rel(HERE / "preprocess_cuda.cu")],
            cuda_home=cuda,
            include_dirs=[inc, str(HERE)],
            library_dirs=[str(lib)],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_compile_args=CXX_FLAGS,
            language="c++",
        ))
    return exts
