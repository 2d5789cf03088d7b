"""The KV cache gives a finished row's memory back, and compaction keeps the rows it keeps."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gpt2onnx._kvcache import KVCache

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@linux_only
def test_release_returns_a_rows_pages_and_keeps_the_others():
    cache = KVCache.zeros(batch=3, n_layer=2, n_head=4, head_dim=64, max_len=16384)  # 16 MB per row and buffer
    for a in cache.arrays:
        a[0, :, :8] = 1.0
        a[1] = 2.0  # touch all of row 1: 4 buffers x 16 MB
        a[2, :, :8] = 3.0
    before = _rss_mb()
    cache.release(1, 2)
    assert before - _rss_mb() > 50  # 64 MB touched in row 1
    for a in cache.arrays:
        assert (a[0, :, :8] == 1.0).all() and (a[2, :, :8] == 3.0).all()  # neighbours untouched
        assert np.count_nonzero(a[1]) <= 2 * 4096 // 4  # released pages read back as zeros (all but the 2 edge pages)


def test_move_down_then_rows_is_the_compacted_cache():
    cache = KVCache.zeros(batch=4, n_layer=1, n_head=2, head_dim=8, max_len=10)
    for a in cache.arrays:
        for r in range(4):
            a[r, :, :5] = r + 1
    cache.move_down([1, 3], used=5)
    cache.release(2, 4)
    kept = cache.rows(2)
    for a in kept.arrays:
        assert (a[0, :, :5] == 2).all() and (a[1, :, :5] == 4).all()
        assert np.shares_memory(a, cache.arrays[0]) or a.base is not None  # a view: no copy of the cache
