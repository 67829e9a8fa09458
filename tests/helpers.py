"""Small shared test utilities: prompts with the Pixtral image-token layout, random images, a local PNG server."""
from __future__ import annotations

import contextlib
import http.server
import threading

import torch

from pixtral_rt.config import PixtralArgs


def image_tokens(args: PixtralArgs, rows: int, cols: int) -> list[int]:
    """[IMG]*cols + [IMG_BREAK] per row (rows, cols after merging); the last token becomes [IMG_END]."""
    v = args.vision
    toks = []
    for _ in range(rows):
        toks += [v.image_token_id] * cols + [v.image_break_token_id]
    toks[-1] = v.image_end_token_id
    return toks


def random_images(args: PixtralArgs, grids: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """Random normalised (3, H, W) images whose patch grids are `grids` (rows, cols in merged units)."""
    g = torch.Generator().manual_seed(seed)
    unit = args.vision.patch_size * args.vision.spatial_merge_size
    return [torch.randn(3, r * unit, c * unit, generator=g) for r, c in grids]


def prompt_with_images(args: PixtralArgs, grids: list[tuple[int, int]], text_ids: list[int]) -> list[int]:
    """<s>[INST] <images> text [/INST]"""
    toks = [1, 3]
    for r, c in grids:
        toks += image_tokens(args, r, c)
    return toks + text_ids + [4]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def png_server(png: bytes):
    """A local HTTP server on 127.0.0.1 (tests never reach other addresses): every path answers `png` as
    image/png, except /to?url=U, which redirects (302) to U. Yields "http://127.0.0.1:PORT"."""
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/to?url="):
                self.send_response(302)
                self.send_header("Location", self.path[len("/to?url="):])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def rel(a, b) -> float:
    """Relative L2 error of a against b, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fp8_weights(N, K, device, seed):
    """Random (N, K) weights quantised per channel -> (W8 float8_e4m3fn, scale (N,) fp32); channel 0 has a
    40x larger range, so each channel's own scale matters."""
    import torch

    from pixtral_rt.fp8 import quantize_weight
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[0] *= 40
    w8, s = quantize_weight(w.to(device))
    return w8, s.reshape(-1).contiguous()


def small_image_messages(n_images: int, seed: int) -> list[dict]:
    """A chat request with n_images (<= 3) small random images of awkward sizes and a short text."""
    import numpy as np
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (17, 90), (64, 33)][:n_images]
    content = [{"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)} for h, w in sizes]
    return [{"role": "user", "content": content + [{"type": "text", "text": "Describe these, briefly."}]}]


def generate_concurrently(eng, reqs, overlap: bool | None = None):
    """eng.generate(*req) for every req at once (a thread each) -> (results in order, preemptions meanwhile).
    overlap: set the engine's delivery order for the run (True: one step late, as on a GPU), then restore it."""
    old = eng._overlap
    if overlap is not None:
        eng._overlap = overlap
    try:
        p0 = eng.metrics()["preemptions_total"]
        got = [None] * len(reqs)

        def run(i):
            got[i] = eng.generate(*reqs[i])

        ths = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
        [t.start() for t in ths]
        [t.join(300) for t in ths]
        return got, eng.metrics()["preemptions_total"] - p0
    finally:
        eng._overlap = old


def int4_weights(N, K, device, seed, group_size=128, scale_dtype=None):
    """Random (N, K) weights quantised by RTN in groups -> (Int4Weight in the kernel layout on `device`, the
    exact dequantised W (N, K) fp32 on `device`); row 0 has a 40x larger range, so each row's scales matter.
    scale_dtype: narrow the scales to it (kept fp32 where it does not hold them exactly)."""
    import torch

    from pixtral_rt import int4
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[0] *= 40
    packed, scale = int4.quantize_and_pack(w.bfloat16(), group_size)
    W = int4.dequantize(packed, scale, group_size)
    return int4.Int4Weight.from_checkpoint(packed, scale, device, scale_dtype), W.to(device)


def ctrl_c_default() -> None:
    """Popen preexec_fn for a child that a test sends SIGINT as a terminal's Ctrl-C would: SIGINT back to its
    default, so Python installs KeyboardInterrupt. A shell runs background jobs (`cmd &`, nohup) with SIGINT
    ignored and children inherit that; such a child would never see the test's Ctrl-C."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
