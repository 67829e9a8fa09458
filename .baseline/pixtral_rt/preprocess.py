"""Image preprocessing exactly as mistral_common defines it (tokens/tokenizers/image.py).

  plan_image(w, h, vision)  the resize rule: ratio = max(h, w) / max_side; if > 1, w = max(round(w / ratio), 1)
                            (Python's round), same for h; token grid = ceil(side / (patch * merge));
                            target pixels = grid * patch * merge (stretch, no padding).
  preprocess(pixels, (H, W)) uint8 RGB (h, w, 3) -> float32 (3, H, W):
                            OpenCV INTER_CUBIC resize on float pixels (A = -0.75, pixel-centre alignment,
                            replicated border, no antialias, no clamping; tap positions and weights as
                            OpenCV 5 computes them, see cubic_taps), then x / 255, (x - mean) / std.

Backends for `preprocess`: the native C++ op (`pixtral_rt._C`, multi-threaded) when it was built, else a
NumPy fallback with the same arithmetic; `backend()` says which one is in use. `preprocess_cuda` runs the
same op on the GPU (`pixtral_rt._C_cuda`): uint8 pixels in, normalised CHW (or patch-major) floats out,
on the device. Set PIXTRAL_RT_PREPROCESS=numpy to force the fallback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .config import VisionEncoderArgs

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP, RGB
STD = (0.26862954, 0.26130258, 0.27577711)

try:  # native CPU op
    from . import _C  # type: ignore[attr-defined]
except Exception as _exc:  # noqa: BLE001 - not built, or built for another Python
    _C = None
    _C_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    _C_ERROR = None

_C_cuda = None
_C_cuda_error: str | None = None
_cuda_tried = False


def backend() -> str:
    """'cpp' when the native C++ op is used, 'numpy' for the fallback."""
    if _C is not None and os.environ.get("PIXTRAL_RT_PREPROCESS", "").lower() != "numpy":
        return "cpp"
    return "numpy"


def backend_info() -> str:
    """One line for logs: which backend and, for the fallback, why."""
    if backend() == "cpp":
        return f"preprocess: native C++ op pixtral_rt._C ({_C.num_threads()} threads)"
    why = "forced by PIXTRAL_RT_PREPROCESS=numpy" if _C is not None else f"native op not built ({_C_ERROR})"
    return f"preprocess: NumPy fallback, {why}"


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ImagePlan:
    """Where an image of `width` x `height` goes: resized to `out_width` x `out_height` pixels, which is a grid
    of `rows` x `cols` patches (before spatial merge) and `token_rows` x `token_cols` [IMG] tokens."""

    width: int
    height: int
    out_width: int
    out_height: int
    rows: int
    cols: int
    merge: int

    @property
    def token_rows(self) -> int:
        return self.rows // self.merge

    @property
    def token_cols(self) -> int:
        return self.cols // self.merge

    @property
    def n_patches(self) -> int:
        return self.rows * self.cols

    @property
    def n_image_tokens(self) -> int:
        """[IMG] tokens (the positions that receive features)."""
        return self.token_rows * self.token_cols

    @property
    def n_tokens(self) -> int:
        """All tokens of the image: [IMG] * cols + [IMG_BREAK] per row, the last one [IMG_END]."""
        return self.token_rows * (self.token_cols + 1)

    def tokens(self, img: int, img_break: int, img_end: int) -> list[int]:
        toks = ([img] * self.token_cols + [img_break]) * self.token_rows
        toks[-1] = img_end
        return toks


def plan_image(width: int, height: int, vision: VisionEncoderArgs) -> ImagePlan:
    """mistral_common's ImageEncoder._image_to_num_tokens plus the target size of transform_image."""
    return plan_size(width, height, vision.patch_size, vision.image_size, vision.spatial_merge_size)


def plan_size(width: int, height: int, patch_size: int, max_side: int, merge: int = 1) -> ImagePlan:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w, h = width, height
    ratio = max(h / max_side, w / max_side)
    if ratio > 1:
        w = max(round(w / ratio), 1)  # Python's round (banker's), as mistral_common
        h = max(round(h / ratio), 1)
    unit = patch_size * merge
    tok_cols = (w - 1) // unit + 1
    tok_rows = (h - 1) // unit + 1
    return ImagePlan(width=width, height=height, out_width=tok_cols * unit, out_height=tok_rows * unit,
                     rows=tok_rows * merge, cols=tok_cols * merge, merge=merge)


# ------------------------------------------------------------------------------------------------ CPU op
def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be a uint8 numpy array (H, W, 3), got "
                         f"{getattr(pixels, 'dtype', type(pixels).__name__)} {getattr(pixels, 'shape', '')}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    return pixels


def preprocess(pixels: np.ndarray, out_hw: tuple[int, int], *, threads: int = 0,
               use: str | None = None) -> np.ndarray:
    """Resize + normalise: uint8 RGB (h, w, 3) -> float32 (3, H, W), contiguous.

    threads: C++ op worker threads (0 = all cores). use: 'cpp' / 'numpy' to pick a backend (default: backend())."""
    pixels = _check_pixels(pixels)
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"out_hw must be positive, got {out_hw}")
    use = use or backend()
    if use == "cpp":
        if _C is None:
            raise RuntimeError(f"native preprocess op not available ({_C_ERROR})")
        return _C.preprocess(np.ascontiguousarray(pixels), oh, ow, MEAN, STD, int(threads))
    if use != "numpy":
        raise ValueError(f"use must be 'cpp' or 'numpy', got {use!r}")
    return preprocess_numpy(pixels, (oh, ow))


def cubic_taps(src: int, dst: int, precise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV INTER_CUBIC taps along one axis: indices (dst, 4) int64 clamped to [0, src-1], weights (dst, 4)
    float32. Positions fx = (d + 0.5) * scale - 0.5 with scale = 1 / (dst / src); t = fx - floor(fx); Keys
    cubic with A = -0.75. Measured against OpenCV 5 (cv2 5.0): when both source sides are >= 4 pixels
    (precise=True) fx, t and the weights are computed in double and rounded to float at the end; for a source
    with a side < 4 OpenCV takes its generic path, which rounds fx to float and computes in float. Getting
    this wrong costs up to ~3e-4 after normalisation on ~1500-pixel axes."""
    scale = 1.0 / (dst / src)
    f = (np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5
    ft = np.float64 if precise else np.float32
    f = f.astype(ft)
    s = np.floor(f)
    t = (f - s).astype(ft)
    a, one = ft(-0.75), ft(1.0)
    t1 = t + one
    w0 = ((a * t1 - ft(5.0) * a) * t1 + ft(8.0) * a) * t1 - ft(4.0) * a
    w1 = ((a + ft(2.0)) * t - (a + ft(3.0))) * t * t + one
    u = one - t
    w2 = ((a + ft(2.0)) * u - (a + ft(3.0))) * u * u + one
    w3 = one - w0 - w1 - w2
    idx = s.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(idx, 0, src - 1), np.stack([w0, w1, w2, w3], axis=1).astype(np.float32)


def preprocess_numpy(pixels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """The fallback: horizontal then vertical cubic pass in float32 (OpenCV's order), then normalise."""
    h, w, _ = pixels.shape
    oh, ow = out_hw
    precise = min(h, w) >= 4  # OpenCV 5's choice of code path, see cubic_taps
    xi, xw = cubic_taps(w, ow, precise)
    yi, yw = cubic_taps(h, oh, precise)
    rows = np.unique(yi)  # only the source rows some output row reads
    src = pixels[rows]
    remap = np.searchsorted(rows, yi)
    tmp = src[:, xi[:, 0]] * xw[None, :, 0, None]                      # (r, ow, 3) float32
    for k in range(1, 4):
        tmp += src[:, xi[:, k]] * xw[None, :, k, None]
    out = tmp[remap[:, 0]] * yw[:, 0, None, None]                      # (oh, ow, 3)
    for k in range(1, 4):
        out += tmp[remap[:, k]] * yw[:, k, None, None]
    out /= np.float32(255.0)
    out -= np.asarray(MEAN, dtype=np.float32)
    out /= np.asarray(STD, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


# ------------------------------------------------------------------------------------------------ CUDA op
def _load_cuda():
    global _C_cuda, _C_cuda_error, _cuda_tried
    if not _cuda_tried:
        _cuda_tried = True
        try:
            from . import _C_cuda as mod  # type: ignore[attr-defined]
            _C_cuda = mod
        except Exception as exc:  # noqa: BLE001
            _C_cuda_error = f"{type(exc).__name__}: {exc}"
    return _C_cuda


def cuda_backend() -> str:
    """'cuda' when the native CUDA op is built, else 'cpu+copy' (preprocess on the CPU, then upload)."""
    return "cuda" if _load_cuda() is not None else "cpu+copy"


def preprocess_cuda(pixels, out_hw: tuple[int, int], *, device=None, out=None, layout: str = "chw",
                    patch_size: int = 16):
    """Resize + normalise on the GPU: uint8 RGB (h, w, 3) (numpy, or a torch tensor on any device) ->
    float32 torch tensor on `device`: layout 'chw' (3, H, W), or 'patches' (H/p * W/p, 3 * p * p) with
    patches row-major and each patch flattened as (c, ky, kx), i.e. Conv2d(kernel=stride=p) as a matmul.
    `out` (float32, contiguous, right numel) may be given to write into a packed buffer. Runs on the
    current CUDA stream; no host sync. Without the CUDA op it computes on the CPU and uploads."""
    import torch

    oh, ow = int(out_hw[0]), int(out_hw[1])
    if layout not in ("chw", "patches"):
        raise ValueError(f"layout must be 'chw' or 'patches', got {layout!r}")
    if layout == "patches" and (oh % patch_size or ow % patch_size):
        raise ValueError(f"out_hw {out_hw} is not a multiple of patch_size {patch_size}")
    if isinstance(pixels, np.ndarray):
        _check_pixels(pixels)
        pixels = torch.from_numpy(np.require(pixels, requirements=["C", "W"]))  # torch wants writable
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 3 \
            or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3), got {getattr(pixels, 'dtype', type(pixels))} "
                         f"{tuple(getattr(pixels, 'shape', ()))}")
    device = torch.device(device) if device is not None else (pixels.device if pixels.is_cuda
                                                               else torch.device("cuda"))
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device: compare as cuda:N
        device = torch.device("cuda", torch.cuda.current_device())
    shape = (3, oh, ow) if layout == "chw" else ((oh // patch_size) * (ow // patch_size), 3 * patch_size ** 2)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != oh * ow * 3 \
            or out.device != device:
        raise ValueError(f"out must be a contiguous float32 tensor of {oh * ow * 3} elements on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    mod = _load_cuda()
    if mod is None or device.type != "cuda":
        chw = torch.from_numpy(preprocess(pixels.cpu().numpy(), (oh, ow)))
        if layout == "patches":
            chw = chw_to_patches(chw, patch_size)
        out.copy_(chw.reshape(out.shape))
        return out
    src = pixels.to(device, non_blocking=True)
    if src.stride(2) != 1 or src.stride(1) != 3:
        src = src.contiguous()
    stream = torch.cuda.current_stream(device).cuda_stream
    mod.preprocess(src.data_ptr(), src.shape[0], src.shape[1], src.stride(0), out.data_ptr(), oh, ow,
                   1 if layout == "patches" else 0, patch_size, MEAN, STD, int(stream), device.index or 0)
    return out


def chw_to_patches(chw, p: int):
    """(3, H, W) -> (H/p * W/p, 3 * p * p): patches row-major, each flattened (c, ky, kx)."""
    c, h, w = chw.shape
    return chw.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)
