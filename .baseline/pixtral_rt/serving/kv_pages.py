"""The KV page allocator and the prefix cache.

The KV cache is n_pages pages of `page_size` token rows each (per layer: (n_pages, Hkv, page_size, D)). A
sequence owns a list of pages (its block table): position p lives in page table[p // page_size], row
p % page_size. Page 0 is the trash page: never handed out; padded batch rows and table entries past a
sequence's end point at it, so a graph replay for an idle row writes there and nowhere else.

Prefix cache: a full page whose K/V depend only on a known token prefix is registered under the hash of
that prefix (a chain: h_i = H(h_{i-1}, keys of page i), so equal hashes mean equal prefixes). The keys are
the token ids, except that the k-th [IMG] token of an image is keyed by the image's pixel digest and k, so
two different pictures never share pages. A new request takes the longest run of its leading page hashes
that is registered, with a reference count; pages whose count drops to 0 keep their contents and hash and
wait in LRU order; they are evicted (hash dropped) only when a fresh page is needed and the free list is
empty.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

TRASH_PAGE = 0


def page_hashes(keys: np.ndarray, page_size: int, n_pages: int | None = None,
                known: list[bytes] = ()) -> list[bytes]:
    """keys (T,) int64 -> hash of each full page's prefix, chained; at most n_pages of them. `known`: the
    hashes of the first pages, already computed from the same keys (the chain goes on from them)."""
    n = len(keys) // page_size if n_pages is None else min(n_pages, len(keys) // page_size)
    out = list(known[:n])
    prev = out[-1] if out else b""
    for i in range(len(out), n):
        prev = hashlib.blake2b(prev + keys[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PagePool:
    def __init__(self, n_pages: int, page_size: int):
        if n_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is the trash page), got {n_pages}")
        self.n_pages, self.page_size = n_pages, page_size
        self.ref = np.zeros(n_pages, dtype=np.int64)
        self.ref[TRASH_PAGE] = 1 << 40          # never freed, never handed out
        self.free: list[int] = list(range(n_pages - 1, TRASH_PAGE, -1))   # pop() gives low ids first
        self.hash_of: dict[int, bytes] = {}     # page -> its prefix hash (registered pages only)
        self.page_of: dict[bytes, int] = {}     # prefix hash -> page
        self.lru: OrderedDict[int, None] = OrderedDict()   # registered pages with ref 0, oldest first

    @property
    def usable(self) -> int:
        """Pages a single sequence could ever get (all but the trash page)."""
        return self.n_pages - 1

    @property
    def available(self) -> int:
        """Pages that can be handed out now: free + evictable."""
        return len(self.free) + len(self.lru)

    @property
    def used(self) -> int:
        """Pages held by sequences (reference count > 0)."""
        return self.usable - self.available

    def match(self, hashes: list[bytes]) -> list[int]:
        """The pages of the longest registered run of leading hashes (no references taken)."""
        pages = []
        for h in hashes:
            p = self.page_of.get(h)
            if p is None:
                break
            pages.append(p)
        return pages

    def allocate(self, prefix: list[int], n_new: int) -> list[int] | None:
        """Take a reference on each prefix page and n_new fresh pages -> the table, or None (nothing changed)
        when they do not fit."""
        revived = sum(1 for p in prefix if self.ref[p] == 0)    # those leave the evictable set
        if n_new > self.available - revived:
            return None
        for p in prefix:
            if self.ref[p] == 0:
                del self.lru[p]
            self.ref[p] += 1
        fresh = []
        for _ in range(n_new):
            if self.free:
                p = self.free.pop()
            else:
                p, _ = self.lru.popitem(last=False)             # evict the least recently used
                del self.page_of[self.hash_of.pop(p)]
            self.ref[p] = 1
            fresh.append(p)
        return prefix + fresh

    def register(self, page: int, h: bytes) -> None:
        """Page `page` now holds the K/V of the prefix hashed `h`. First writer wins: if another page holds
        that prefix already, this one stays private (freed normally)."""
        if h in self.page_of or page in self.hash_of or page == TRASH_PAGE:
            return
        self.page_of[h] = page
        self.hash_of[page] = h

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if p == TRASH_PAGE:
                continue
            self.ref[p] -= 1
            if self.ref[p] < 0:
                raise RuntimeError(f"KV page {p} released more often than it was taken")
            if self.ref[p] == 0:
                if p in self.hash_of:
                    self.lru[p] = None          # newest at the end
                else:
                    self.free.append(p)

    def forget_cached(self) -> None:
        """Drop every evictable prefix page (ref 0) back to the free list: the cache forgets them."""
        for p in list(self.lru):
            del self.page_of[self.hash_of.pop(p)]
            self.free.append(p)
        self.lru.clear()

    def check(self) -> None:
        """Invariants (tests): every page is exactly one of trash / held / free / evictable."""
        held = {int(p) for p in np.nonzero(self.ref[1:] > 0)[0] + 1}
        free, lru = set(self.free), set(self.lru)
        assert len(free) == len(self.free), "a page is twice on the free list"
        assert not (held & free) and not (held & lru) and not (free & lru), "a page is in two states"
        assert held | free | lru == set(range(1, self.n_pages)), "a page was lost"
        assert all(self.page_of[h] == p for p, h in self.hash_of.items())
