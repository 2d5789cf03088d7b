"""The KV cache: per-layer key/value buffers shared by the graph's past and present, and their memory.

>>> c = KVCache.zeros(batch=2, n_layer=1, n_head=1, head_dim=2, max_len=4)
>>> c.row(1).arrays[0].shape
(1, 1, 4, 2)

The graph appends each step's keys and values in place (GroupQueryAttention), so the
buffers are allocated once per batch at their longest and must cost memory only where
written: fresh zero pages without transparent huge pages (`KVCache.zeros`), a finished
row's pages given back to the OS (`release`), compaction in place (`move_down`).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np


class KVCache:
    """Per-layer key/value buffers (B, H, max_len, D) shared by the graph's past and present.

    float32, or int8 when the graph quantizes its cache (the manifest's ``kv_cache``): the
    graph quantizes what it appends and dequantizes what it reads, so to this class an
    int8 cache is bytes like any other (rows, views and compaction copy them as they are).
    """

    def __init__(self, arrays: list[np.ndarray]):
        import onnxruntime as ort

        self.arrays = arrays
        self.batch = arrays[0].shape[0]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # no copy

    @classmethod
    def zeros(cls, batch: int, n_layer: int, n_head: int, head_dim: int, max_len: int,
              dtype="float32") -> "KVCache":
        """Buffers whose memory is used only where written (fresh zero pages, no transparent huge pages).

        numpy asks for transparent huge pages on large arrays; then writing position 0 of one
        head commits the 2 MB around it, i.e. every (row, head) strip of a layer: a cache for
        8 slots x 1024 positions became 605 MB resident for rows of 256 tokens (measured: a
        continuous-batching job of 128-token prompts peaked at 816 MB; 4 kB pages fix it).
        An int8 zero reads as 0.0.
        """
        arrays = [np.zeros((batch, n_head, max_len, head_dim), dtype) for _ in range(2 * n_layer)]
        for a in arrays:
            _madvise(a, _MADV_NOHUGEPAGE)
        return cls(arrays)

    def row(self, r: int) -> "KVCache":
        """A view of one row (writes go into this cache)."""
        return KVCache([a[r:r + 1] for a in self.arrays])

    def rows(self, n: int) -> "KVCache":
        """A view of the first `n` rows (contiguous: writes go into this cache)."""
        return KVCache([a[:n] for a in self.arrays])

    def move_down(self, rows: list[int], used: int) -> None:
        """Copy row rows[i] to row i (rows ascending), the first `used` positions only (the rest
        were never written; copying them would page in the whole buffer)."""
        for a in self.arrays:
            for i, r in enumerate(rows):
                if r != i:
                    a[i, :, :used] = a[r, :, :used]

    def release(self, start: int, stop: int) -> None:
        """Give the memory of rows start..stop-1 back to the OS (their contents are not needed).

        A slot keeps the pages its longest row touched: without this, continuous batching
        over a mixed job grows every slot to the job's longest row (measured: peak RSS 1244
        MB vs 797 for static batching on 64 mixed prompts). Linux: `madvise(MADV_DONTNEED)`
        on the whole pages inside those rows (they read back as zeros; a free row's contents
        are never read: attention stops at each row's length). Elsewhere: nothing.
        """
        if start < stop:
            for a in self.arrays:
                _madvise(a[start:stop], _MADV_DONTNEED)  # contiguous: a C-order buffer or a leading-rows view


def _madvise(a: np.ndarray, advice: int) -> None:
    """madvise() the whole pages inside contiguous `a` (Linux; elsewhere nothing). Advice only: errors are ignored."""
    if _LIBC is None:
        return
    first = -(-a.ctypes.data // _PAGE) * _PAGE
    end = (a.ctypes.data + a.nbytes) // _PAGE * _PAGE
    if end > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), advice)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux: private anonymous pages are dropped and read back as zeros
_MADV_NOHUGEPAGE = 15
