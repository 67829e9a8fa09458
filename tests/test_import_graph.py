"""The import structure of pixtral_rt/ and kernels/ (installed as pixtral_rt.kernels):
  - no import cycle: the graph of imports between the project's modules, read with ast from every file,
    module-level AND function-level imports both counted (a function-level import defers a cycle to run
    time, it does not remove it), `from pkg import name` counted as an import of pkg.name when that is a
    module; with a negative control (the checker finds the cycle of a synthetic graph);
  - kernels/ imports nothing of the runtime above it, only the shared numerics (fp8, int4, reference.rope) and the
    compile counters;
  - every module imports alone in a fresh interpreter state (sys.modules emptied of pixtral_rt before each;
    one subprocess for all of them, torch kept loaded); modules whose optional dependency (the serve extra)
    is not installed are reported, not failed. __main__ modules are not imported (they run a command)."""
import ast
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
KERNELS_MAY_IMPORT = {"pixtral_rt", "pixtral_rt.fp8", "pixtral_rt.int4", "pixtral_rt.reference",
                      "pixtral_rt.reference.rope", "pixtral_rt.compile_events"}
OPTIONAL = {"fastapi", "uvicorn", "prometheus_client", "starlette"}


def project_modules() -> dict[str, Path]:
    """module name -> file, for pixtral_rt/** and kernels/*.py (as pixtral_rt.kernels.*)."""
    mods = {}
    for f in sorted((ROOT / "pixtral_rt").rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    for f in sorted((ROOT / "kernels").glob("*.py")):
        mods[f"pixtral_rt.kernels.{f.stem}"] = f
    mods.setdefault("pixtral_rt.kernels", ROOT / "kernels")
    return mods


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    f = mods.get(name)
    return f is not None and (f.name == "__init__.py" or f.is_dir())


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (module level or inside functions)."""
    if path.is_dir():
        return set()
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if _is_package(name, mods) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the deepest project module the dotted name reaches (pixtral_rt.a.b.Name -> pixtral_rt.a.b)
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("pixtral_rt"):
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the directed graph, or None (iterative DFS with colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
                continue
            if colour.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_cycle_finder_negative_control():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    cyc = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cyc is not None and cyc[0] == cyc[-1] and set(cyc) == {"a", "b", "c"}
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_import_parser_sees_function_level_and_relative_imports(tmp_path):
    """The parser counts `from ..x import y` inside a function, and `from . import mod` as the module."""
    pkg = tmp_path / "pixtral_rt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    mods = {"pixtral_rt": pkg / "__init__.py", "pixtral_rt.a": pkg / "a.py", "pixtral_rt.sub": pkg / "sub/__init__.py",
            "pixtral_rt.sub.b": pkg / "sub" / "b.py"}
    g = {m: imports_of(m, p, mods) for m, p in mods.items()}
    assert g["pixtral_rt.a"] == {"pixtral_rt.sub", "pixtral_rt.sub.b"}
    assert g["pixtral_rt.sub.b"] == {"pixtral_rt.a"}
    assert find_cycle(g) is not None


def test_no_import_cycle():
    g = import_graph()
    assert len(g) > 60 and "pixtral_rt.loading" in g and "pixtral_rt.kernels.gemv" in g
    assert "pixtral_rt.server.app" in g["pixtral_rt.server.cli"]      # function-level imports are edges
    cyc = find_cycle(g)
    assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_layers():
    """kernels/ below the runtime; decoder.py imports no process code; loading.py nothing of the serving
    loop or the server."""
    g = import_graph()
    for m, deps in g.items():
        if m.startswith("pixtral_rt.kernels."):
            above = {d for d in deps if not d.startswith("pixtral_rt.kernels") and d not in KERNELS_MAY_IMPORT}
            assert not above, f"{m} imports the runtime: {sorted(above)}"
    assert "pixtral_rt.tensor_parallel" not in g["pixtral_rt.decoder"]
    assert not {d for d in g["pixtral_rt.loading"]
                if d.startswith("pixtral_rt.server") or d in ("pixtral_rt.serving.llm_engine",
                                                             "pixtral_rt.tensor_parallel", "pixtral_rt.engine")}
    assert not any(d.startswith("pixtral_rt.server") for m, deps in g.items()
                   if not m.startswith("pixtral_rt.server") and m != "pixtral_rt.serve" for d in deps)


IMPORT_EACH = r"""
import importlib, json, sys, traceback
import torch  # noqa: F401  (kept loaded: re-importing it per module would only cost time)
out = {}
for name in json.loads(sys.argv[1]):
    for k in [k for k in sys.modules if k == "pixtral_rt" or k.startswith("pixtral_rt.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
        out[name] = "ok"
    except ModuleNotFoundError as exc:
        out[name] = f"missing {exc.name}" if (exc.name or "").split(".")[0] in OPTIONAL else traceback.format_exc()
    except BaseException:  # noqa: BLE001
        out[name] = traceback.format_exc()
print(json.dumps(out))
"""


def test_every_module_imports_alone():
    names = [m for m, p in project_modules().items() if not m.endswith("__main__")]
    code = f"OPTIONAL = {sorted(OPTIONAL)!r}\n" + IMPORT_EACH
    r = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    failed = {m: v for m, v in res.items() if v != "ok" and not v.startswith("missing ")}
    assert not failed, "\n".join(f"{m}:\n{v}" for m, v in failed.items())
    skipped = [m for m, v in res.items() if v.startswith("missing ")]
    print(f"{len(res) - len(skipped)} modules imported alone; optional dependency missing for {skipped}")
