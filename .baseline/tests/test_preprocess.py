"""Preprocessing vs mistral_common: the resize rule (token grid) and the pixel tensors (same shape, max abs
error <= 1e-4) for the NumPy fallback, the C++ op and (on a GPU) the CUDA op; C++ op == fallback."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixtral_rt import preprocess as pp
from pixtral_rt.config import MISTRAL_SMALL_31, PIXTRAL_12B, PIXTRAL_LARGE

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    HAS_CUDA = False

requires_cpp = pytest.mark.skipif(pp._C is None, reason=f"native extension pixtral_rt._C not built ({pp._C_ERROR}); "
                                                       "build it with pip install --no-build-isolation -e .")
SIZES = [(1, 1), (15, 17), (16, 16), (17, 1500), (1024, 1024), (1025, 1023), (2000, 1000), (5000, 200), (100, 40),
         (1541, 3), (3, 1024), (4, 1500), (1500, 5), (64, 64)]  # (width, height)
TOL = 1e-4  # the bound on max abs error vs mistral_common, after normalisation


def _mc_encoder(vision):
    pytest.importorskip("mistral_common", reason="mistral_common (the reference) not installed")
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
    return ImageEncoder(ImageConfig(vision.patch_size, vision.image_size, vision.spatial_merge_size),
                        SpecialImageIDs(vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id))


def _image(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_plan_documented_examples():
    p = pp.plan_image(2000, 1000, PIXTRAL_12B.vision)
    assert (p.out_width, p.out_height, p.rows, p.cols, p.n_tokens) == (1024, 512, 32, 64, 2080)
    p = pp.plan_image(100, 40, PIXTRAL_12B.vision)
    assert (p.out_width, p.out_height) == (112, 48)
    p = pp.plan_image(100, 40, MISTRAL_SMALL_31.vision)  # merge 2: grid unit 28 px
    assert (p.out_width, p.out_height, p.rows, p.cols, p.token_rows, p.token_cols) == (112, 56, 4, 8, 2, 4)
    assert p.tokens(10, 12, 13) == [10, 10, 10, 10, 12, 10, 10, 10, 10, 13]


@pytest.mark.parametrize("vision", [PIXTRAL_12B.vision, PIXTRAL_LARGE.vision, MISTRAL_SMALL_31.vision],
                         ids=["12b", "large", "small31"])
def test_plan_matches_mistral_common_token_grid(vision):
    enc = _mc_encoder(vision)
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(300)] + \
        [(2 * k + 1, 2048) for k in range(0, 40)]  # odd widths halved exactly: round-half-even cases
    for w, h in sizes:
        p = pp.plan_image(w, h, vision)
        wt, ht = enc._image_to_num_tokens(Image.new("L", (w, h)))
        assert (p.token_cols, p.token_rows) == (wt, ht), (w, h)
        assert p.out_width == wt * vision.patch_size * vision.spatial_merge_size


def _reference_pixels(pixels, plan):
    pytest.importorskip("mistral_common", reason="mistral_common (the reference) not installed")
    pytest.importorskip("cv2", reason="OpenCV (mistral_common's resize) not installed")
    from mistral_common.tokens.tokenizers.image import transform_image
    return transform_image(Image.fromarray(pixels), (plan.out_width, plan.out_height))


@pytest.mark.parametrize("use", ["numpy", pytest.param("cpp", marks=requires_cpp)])
@pytest.mark.parametrize("vision", [PIXTRAL_12B.vision, MISTRAL_SMALL_31.vision], ids=["12b", "small31"])
def test_pixels_match_mistral_common(use, vision):
    for i, (w, h) in enumerate(SIZES):
        pixels = _image(w, h, i)
        plan = pp.plan_image(w, h, vision)
        want = _reference_pixels(pixels, plan)
        got = pp.preprocess(pixels, (plan.out_height, plan.out_width), use=use)
        assert got.shape == want.shape and got.dtype == np.float32 and got.flags.c_contiguous
        err = float(np.abs(got - want).max())
        assert err <= TOL, f"{w}x{h}: max abs error {err:.3g} > {TOL}"


@requires_cpp
def test_cpp_op_equals_fallback():
    rng = np.random.default_rng(1)
    for w, h, ow, oh in [(4000, 3000, 1024, 768), (7, 3, 16, 16), (1, 900, 16, 512), (333, 777, 112, 256)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a = pp.preprocess(pixels, (oh, ow), use="cpp", threads=3)
        b = pp.preprocess(pixels, (oh, ow), use="numpy")
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert np.array_equal(a, pp.preprocess(pixels, (oh, ow), use="cpp", threads=1))


@requires_cpp
def test_cpp_taps_equal_python_taps():
    for src, dst in [(1, 16), (1500, 1024), (17, 32), (5000, 1024)]:
        for precise in (False, True):
            idx, w = pp._C.cubic_taps(src, dst, precise)
            pidx, pw = pp.cubic_taps(src, dst, precise)
            np.testing.assert_array_equal(idx, pidx)
            np.testing.assert_array_equal(w, pw)


def test_backend_reporting(monkeypatch):
    assert pp.backend() in ("cpp", "numpy")
    assert pp.backend_info().startswith("preprocess: ")
    monkeypatch.setenv("PIXTRAL_RT_PREPROCESS", "numpy")
    assert pp.backend() == "numpy" and "fallback" in pp.backend_info()


def test_bad_arguments():
    with pytest.raises(ValueError, match="uint8 numpy array"):
        pp.preprocess(np.zeros((4, 4, 3), np.float32), (16, 16))
    with pytest.raises(ValueError, match="uint8 numpy array"):
        pp.preprocess(np.zeros((4, 4), np.uint8), (16, 16))
    with pytest.raises(ValueError, match="out_hw must be positive"):
        pp.preprocess(np.zeros((4, 4, 3), np.uint8), (0, 16))
    with pytest.raises(ValueError, match="positive"):
        pp.plan_size(0, 5, 16, 1024)


def test_chw_to_patches_is_conv_layout():
    chw = torch.arange(3 * 32 * 48, dtype=torch.float32).reshape(3, 32, 48)
    patches = pp.chw_to_patches(chw, 16)
    assert patches.shape == (2 * 3, 3 * 16 * 16)
    weight = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.functional.conv2d(chw[None], weight, stride=16)[0]           # (5, 2, 3)
    mm = (patches @ weight.reshape(5, -1).T).T.reshape(5, 2, 3)
    torch.testing.assert_close(mm, conv, rtol=1e-4, atol=1e-2)


def test_preprocess_cuda_cpu_fallback_path_without_gpu():
    """Without the CUDA op (or on CPU) preprocess_cuda computes on the CPU and copies into `out`."""
    pixels = _image(50, 30, 3)
    out = torch.full((3 * 32 * 48,), float("nan"))
    got = pp.preprocess_cuda(pixels, (32, 48), device="cpu", out=out)
    np.testing.assert_allclose(got.reshape(3, 32, 48).numpy(), pp.preprocess(pixels, (32, 48)), atol=0)
    patches = pp.preprocess_cuda(pixels, (32, 48), device="cpu", layout="patches", patch_size=16)
    torch.testing.assert_close(patches, pp.chw_to_patches(torch.from_numpy(pp.preprocess(pixels, (32, 48))), 16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU for the CUDA preprocessing op")
def test_cuda_op_matches_mistral_common_and_fallback():
    if pp._load_cuda() is None:
        pytest.skip(f"CUDA extension pixtral_rt._C_cuda not built ({pp._C_cuda_error})")
    for i, (w, h) in enumerate(SIZES + [(4000, 3000)]):
        pixels = _image(w, h, i)
        plan = pp.plan_image(w, h, PIXTRAL_12B.vision)
        try:
            import cv2  # noqa: F401
            from mistral_common.tokens.tokenizers.image import transform_image
            want = transform_image(Image.fromarray(pixels), (plan.out_width, plan.out_height))
        except ImportError:  # GPU machine without mistral_common / OpenCV: the fallback is the reference
            want = pp.preprocess(pixels, (plan.out_height, plan.out_width), use="numpy")
        for src in (pixels, torch.from_numpy(pixels).cuda()):
            got = pp.preprocess_cuda(src, (plan.out_height, plan.out_width))
            assert got.is_cuda and got.shape == want.shape
            err = float((got.cpu() - torch.from_numpy(want)).abs().max())
            assert err <= TOL, f"{w}x{h}: CUDA op max abs error {err:.3g} > {TOL}"
        fb = pp.preprocess(pixels, (plan.out_height, plan.out_width), use="numpy")
        assert float((got.cpu() - torch.from_numpy(fb)).abs().max()) <= 1e-5
        packed = torch.full((plan.out_height * plan.out_width * 3,), float("nan"), device="cuda")
        patches = pp.preprocess_cuda(pixels, (plan.out_height, plan.out_width), out=packed, layout="patches",
                                     patch_size=16)
        torch.testing.assert_close(patches.reshape(-1, 3 * 256).cpu(), pp.chw_to_patches(got.cpu(), 16),
                                   rtol=0, atol=0)
    torch.cuda.synchronize()
