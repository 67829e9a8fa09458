"""serving.sequence.image_digest: the prefix-cache key of an image's pixels. Large images are hashed in
slices on threads; the key must still change with any pixel and the shape, and equal copies must agree."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pixtral_rt.serving.sequence import _SLICE_BYTES, image_digest


def _flat(a: np.ndarray) -> bytes:
    h = hashlib.sha256(repr((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


@pytest.mark.parametrize("hw", [(1, 1), (17, 33), (1024, 1024), (1500, 701)])
def test_digest_changes_with_any_pixel(hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    a = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    d = image_digest(a)
    assert d == image_digest(a.copy()) == image_digest(torch.from_numpy(a.copy()))
    n = a.size
    # the first byte, the last, and bytes on both sides of every slice boundary
    k = min(8, n // _SLICE_BYTES)
    step = -(-n // k) if k >= 2 else n
    for i in sorted({0, n - 1, *range(step - 1, n, step), *range(step, n, step)} & set(range(n))):
        b = a.copy().reshape(-1)
        b[i] ^= 1
        assert image_digest(b.reshape(a.shape)) != d, f"byte {i} of {n} does not enter the digest"
    if k < 2:
        assert d == _flat(a)   # small images: plain SHA-256 of shape + pixels


def test_digest_depends_on_shape_and_dtype():
    a = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    assert image_digest(a) != image_digest(a.reshape(512, 2048, 3))
    assert image_digest(a[:512]) != image_digest(a[512:])
    f = np.random.default_rng(1).standard_normal((3, 512, 512)).astype(np.float32)
    assert image_digest(f) != image_digest(f.view(np.int32))


def test_digest_strided_view_equals_contiguous_copy():
    a = np.random.default_rng(2).integers(0, 256, (1200, 900, 4), dtype=np.uint8)
    rgb = a[..., :3]   # not contiguous
    assert image_digest(rgb) == image_digest(np.ascontiguousarray(rgb))
