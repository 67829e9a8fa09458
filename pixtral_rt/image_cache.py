"""Decoded images by the digest of their encoded form, so a repeated image (turn 2 of an image chat re-sends
the same data URL) is neither base64-decoded, nor decoded to pixels, nor hashed again.

Key: SHA-256 of the encoded source as sent (the data URL string, or the file / download bytes) and of the
loading options that change the pixels (EXIF orientation applied or not). Value: the header facts the
limits are re-checked against on every hit (size, animated, encoded length), the RGB uint8 pixels, marked
read-only because every request that sends those bytes shares them, and the pixel digest once a request
computed it (the engine's image-feature cache and prefix cache key on it).
Least recently used entries are dropped past `max_bytes` of pixels (default 512 MiB; the server's
--image-cache-mb sets it, 0 turns the cache off). Thread-safe: requests open and decode images on a thread pool (chat.py).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class CachedImage:
    width: int                  # after EXIF orientation
    height: int
    format: str | None
    mode: str
    orientation: int
    animated: bool
    n_frames: object            # of an animated image, for the same messages as a first opening
    n_bytes: int                # encoded length, re-checked against ImageLimits.max_bytes
    pixels: np.ndarray          # (height, width, 3) uint8, read-only
    digest: tuple | None = None  # (digest function, its value on `pixels`), set by the first request that hashes


def encoded_key(source: str | bytes, exif_orientation: bool) -> bytes:
    """SHA-256 of an encoded image as sent (a data URL string is hashed as its ASCII bytes)."""
    data = source.encode("ascii", "surrogateescape") if isinstance(source, str) else source
    h = hashlib.sha256(b"exif=1;" if exif_orientation else b"exif=0;")
    h.update(data)
    return h.digest()


class DecodedImageCache:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[bytes, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: bytes) -> CachedImage | None:
        with self._lock:
            e = self._items.get(key)
            if e is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return e

    def put(self, key: bytes, entry: CachedImage) -> None:
        n = entry.pixels.nbytes
        if n > self.max_bytes:
            return
        entry.pixels.flags.writeable = False
        with self._lock:
            if key in self._items:
                return
            while self.bytes + n > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.pixels.nbytes
            self._items[key] = entry
            self.bytes += n

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


CACHE = DecodedImageCache(512 << 20)      # the process's cache (images.open_image)
