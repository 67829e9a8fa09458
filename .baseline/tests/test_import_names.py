"""The name `kernels` belongs to PyPI's package (transformers imports it); ours is `pixtral_rt.kernels`.

kernels/ has no __init__.py (kernels/README.md, docs/DESIGN.md "Package layout and import names"), so it
can never hide PyPI's `kernels` or be hidden by it, whatever directory Python is started from. Each check
runs in a fresh interpreter (`python -c` puts its working directory first on sys.path, as `python -m`
does) started from the repository root, from tests/ and from a temporary directory.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_DIR = os.path.join(ROOT, "kernels")

# prints where each name came from as one JSON object
PROBE = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, sys
    out = {"sys_path0": sys.path[0]}
    try:
        import transformers
        transformers.LlavaForConditionalGeneration      # lazy attribute: imports the model (and hub kernels)
        transformers.Mistral3ForConditionalGeneration
        from transformers.integrations import hub_kernels  # the module that did `from kernels import ...`
        out["transformers"] = "ok"
    except ImportError as exc:
        out["transformers"] = f"{type(exc).__name__}: {exc}"
    try:
        importlib.metadata.distribution("kernels")
        out["pypi_kernels_installed"] = True
    except importlib.metadata.PackageNotFoundError:
        out["pypi_kernels_installed"] = False
    spec = importlib.util.find_spec("kernels")
    out["kernels_origin"] = spec.origin if spec else None            # None for a namespace package
    out["kernels_locations"] = list(spec.submodule_search_locations or []) if spec else []
    import pixtral_rt.kernels
    import pixtral_rt.kernels.rms_norm as rms_norm
    out["ours_path"] = list(pixtral_rt.kernels.__path__)
    out["ours_file"] = rms_norm.__file__
    print(json.dumps(out))
""")


def _probe(cwd: str) -> dict:
    # PYTHONPATH stays: on the GPU machine the source tree is on it instead of installed (and a repository
    # root there is one more way of putting our kernels/ folder on sys.path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"probe failed from {cwd}:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["root", "tests", "tmp"])
def test_kernels_name_is_not_shadowed(where, tmp_path):
    pytest.importorskip("transformers", reason="transformers is a test dependency ('.[test]'): the check "
                                               "imports its Llava and Mistral3 models")
    cwd = {"root": ROOT, "tests": os.path.join(ROOT, "tests"), "tmp": str(tmp_path)}[where]
    out = _probe(cwd)
    if where == "root":   # the case that broke: the repository root first on sys.path
        assert os.path.realpath(out["sys_path0"] or cwd) == os.path.realpath(ROOT)
    assert out["transformers"] == "ok", out
    # `kernels` is never our folder as a regular package
    assert out["kernels_origin"] != os.path.join(KERNELS_DIR, "__init__.py"), out
    if out["pypi_kernels_installed"]:   # then it is PyPI's, from site-packages
        assert out["kernels_origin"] and not out["kernels_origin"].startswith(KERNELS_DIR), out
    # ... and pixtral_rt.kernels is ours, whichever way pixtral_rt was installed
    assert os.path.basename(out["ours_file"]) == "rms_norm.py"
    assert any(os.path.isfile(os.path.join(p, "rms_norm.py")) for p in out["ours_path"]), out


def test_kernels_folder_has_no_init():
    # the mechanism itself: a regular package here would shadow PyPI's `kernels` from the repository root
    assert not os.path.exists(os.path.join(KERNELS_DIR, "__init__.py")), \
        "kernels/__init__.py makes kernels/ a regular package that hides PyPI's `kernels` (see kernels/README.md)"
