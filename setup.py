"""pixtral_rt: install the runtime (pixtral_rt/), its Triton kernels (kernels/ -> pixtral_rt.kernels) and,
when a C++ toolchain is present, the optional native extension built from csrc/ (pixtral_rt._C).

The native extension is optional: if it cannot be built, the install still succeeds and the runtime
uses (and names) its NumPy/torch fallback. Set PIXTRAL_RT_NO_EXT=1 to skip it deliberately.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the native extension if possible; never fail the install because of it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no extension"
            print(f"pixtral_rt: native extension not built ({exc}); the runtime uses its fallback", file=sys.stderr)

    def build_extension(self, ext):
        try:
            prepare = getattr(ext, "prepare", None)  # csrc_build.CudaExtension: nvcc-compile .cu sources first
            if prepare is not None:
                prepare(self)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"pixtral_rt: extension {ext.name} not built ({exc}); the runtime uses its fallback",
                  file=sys.stderr)


def native_extensions():
    if os.environ.get("PIXTRAL_RT_NO_EXT") == "1":
        return []
    try:
        from csrc_build import extensions  # csrc/ build description, kept beside the sources
    except Exception as exc:  # noqa: BLE001
        print(f"pixtral_rt: no native extension ({exc})", file=sys.stderr)
        return []
    return extensions()


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))

# fastapi >= 0.100: pydantic v2; uvicorn >= 0.30: Server.capture_signals, which pixtral_rt.serve overrides;
# llguidance: the grammars of response_format and tool calls (pixtral_rt/structured/); httptools + uvloop:
# uvicorn's C HTTP parser and event loop, which it picks when installed (as vLLM's fastapi[standard]): the
# server process spends 95 instead of 121 us of CPU per streamed token (benchmarks/bench_http_stack.py)
SERVE_REQUIRES = ["fastapi>=0.100", "uvicorn>=0.30", "prometheus-client>=0.17", "llguidance>=1.0",
                  "httptools>=0.6", "uvloop>=0.19; sys_platform != 'win32'"]

setup(
    name="pixtral_rt",
    version="0.1.0",
    description="GPU inference runtime for Mistral's Pixtral vision-language models (Triton + CUDA graphs)",
    python_requires=">=3.10",
    packages=["pixtral_rt", "pixtral_rt.reference", "pixtral_rt.serving", "pixtral_rt.server", "pixtral_rt.structured",
              "pixtral_rt.kernels"],
    package_dir={"pixtral_rt": "pixtral_rt", "pixtral_rt.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "numpy",
        "pillow>=10",
        "mistral_common[sentencepiece]>=1.5",  # sentencepiece: Pixtral-Large's v7m1 tokenizer
        "tqdm",
    ],
    extras_require={
        # the OpenAI-compatible HTTP server, python -m pixtral_rt.serve
        "serve": SERVE_REQUIRES,
        # numpy<2.3: Triton's CPU interpreter; OpenCV 5: the cubic-resize maths the pixel tests match;
        # openai + httpx: the server tests call it as clients do; jsonschema: structured outputs validated
        "test": ["pytest", "transformers>=4.48", "numpy<2.3", "opencv-python-headless>=5", *SERVE_REQUIRES,
                 "openai>=1.40", "httpx", "compressed-tensors>=0.9", "jsonschema>=4"],
    },
    ext_modules=native_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["pixtral-rt=pixtral_rt.generate:main", "pixtral-rt-serve=pixtral_rt.server.cli:main"]},
)
