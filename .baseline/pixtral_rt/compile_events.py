"""Counters of the work that must not happen on the request path (issue 12): Triton compilations, autotuner
runs and CUDA graph captures. `install()` hooks Triton's post-compile callback once per process; capture
sites call `captured()`; autotuned kernels register their autotuner, whose cache size counts the tunings.
`snapshot()` -> {"triton_compile": n, "autotune": n, "graph_capture": n}; the engine exposes it
(LLMEngine.compile_events), so a test or a benchmark can check that a request changed none of them.
On the CPU (Triton interpreter) nothing compiles and nothing is captured: the counts stay 0 there."""
from __future__ import annotations

import threading
from collections import deque

_lock = threading.Lock()
_recent: deque = deque(maxlen=64)   # names of the latest compiles (what a request compiled, for messages)
_counts = {"triton_compile": 0, "graph_capture": 0}
_autotuners: list = []
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from triton import knobs
    except ImportError:          # older Triton: compile counts unavailable (reported as -1)
        _counts["triton_compile"] = -1
        return
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or str(kwargs.get("repr", "?"))[:160]
        with _lock:
            _counts["triton_compile"] += 1
            _recent.append(name)
        if previous is not None:
            return previous(*args, **kwargs)
        return None

    knobs.runtime.jit_post_compile_hook = hook


def register_autotuner(tuner) -> None:
    _autotuners.append(tuner)


def captured(n: int = 1) -> None:
    with _lock:
        _counts["graph_capture"] += n


def recent(n: int = 16) -> list[str]:
    """Names of the last n Triton compilations (oldest first)."""
    with _lock:
        return list(_recent)[-n:] if n else []


def snapshot() -> dict[str, int]:
    with _lock:
        out = dict(_counts)
    out["autotune"] = sum(len(getattr(t, "cache", {})) for t in _autotuners)
    return out
