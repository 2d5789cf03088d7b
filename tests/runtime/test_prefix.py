"""The prefix cache on its own: hash-chain keys, longest-run lookup, LRU within a byte budget, counters."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx._prefix import PrefixCache, PrefixStats, capacity_bytes, put_block, take_block
from gpt2onnx.errors import InvalidRequestError


def _kv(fill: int, nbytes: int = 1000) -> np.ndarray:
    return np.full((2, 1, nbytes // 2, 1), fill, np.int8)  # (2 n_layer, H, block, D): nbytes bytes


def test_keys_are_a_chain_over_full_blocks():
    c = PrefixCache(block=4, capacity_bytes=1 << 20)
    ids = list(range(100, 114))  # 14 tokens: 3 full blocks, a partial one without a key
    keys = c.keys(ids)
    assert len(keys) == 3 and len(set(keys)) == 3 and all(len(k) == 16 for k in keys)
    assert c.keys(ids[:8]) == keys[:2] and c.keys(ids[:7]) == keys[:1]  # a prefix's keys are the keys' prefix
    changed = ids[:5] + [999] + ids[6:]  # a token of block 1 differs: blocks 1, 2 change, block 0 does not
    k2 = c.keys(changed)
    assert k2[0] == keys[0] and k2[1] != keys[1] and k2[2] != keys[2]
    # block 2's key names the whole prefix: the same last-block tokens after another head differ
    assert PrefixCache(block=4, capacity_bytes=1).keys(ids[8:12]) != keys[2:3]
    assert PrefixCache(block=7, capacity_bytes=1).keys(ids)[0] != keys[0]
    assert c.keys([]) == [] and c.keys(ids[:3]) == []


def test_lookup_finds_the_longest_run_from_the_start_and_counts():
    c = PrefixCache(block=4, capacity_bytes=1 << 20)
    keys = c.keys(range(20))  # 5 blocks
    for j in (0, 1, 3):  # block 2 missing: block 3 is unreachable
        assert c.insert(keys[j], _kv(j))
    found = c.lookup(keys)
    assert [int(x.flat[0]) for x in found] == [0, 1]
    s = c.stats()
    assert (s.hits, s.misses, s.saved_tokens, s.entries) == (2, 1, 8, 3)  # one miss: block 2, computed next
    assert c.lookup(keys[2:]) == [] and c.stats().misses == 2
    assert len(c.lookup(keys[3:])) == 1 and c.stats().misses == 3 and c.stats().hits == 3
    assert c.lookup([]) == [] and c.stats().hits == 3 and c.stats().misses == 3


def test_least_recently_used_goes_first_within_the_budget():
    c = PrefixCache(block=4, capacity_bytes=3000)
    keys = c.keys(range(24))
    for j in range(3):
        c.insert(keys[j], _kv(j))
    assert c.stats().bytes == 3000
    c.lookup(keys[:1])  # block 0 used: block 1 is now the oldest
    c.insert(keys[3], _kv(3))
    assert keys[1] not in c and all(k in c for k in (keys[0], keys[2], keys[3]))
    c.insert(keys[4], _kv(4, 2000))  # needs two slots: blocks 2 and 0 go (oldest uses first)
    assert [k in c for k in keys[:5]] == [False, False, False, True, True]
    s = c.stats()
    assert (s.entries, s.bytes, s.evictions) == (2, 3000, 3)
    assert not c.insert(keys[5], _kv(5, 4000)) and keys[5] not in c and c.stats().bytes == 3000  # alone too big
    c.insert(keys[3], _kv(7))  # the same key again: replaced, counted once
    assert c.stats().bytes == 3000 and int(c.lookup(keys[3:4])[0].flat[0]) == 7
    c.resize(1000)  # the oldest use goes: block 4 (block 3 was just looked up)
    assert keys[4] not in c and keys[3] in c and c.stats().bytes == 1000 and c.stats().evictions == 4
    c.clear()
    assert c.stats().entries == 0 and c.stats().bytes == 0 and c.stats().hits == 2  # counters stay


def test_zero_budget_keeps_nothing():
    c = PrefixCache(block=2, capacity_bytes=0)
    [k] = c.keys([1, 2])
    assert not c.insert(k, _kv(1)) and c.lookup([k]) == [] and c.stats() == PrefixStats(misses=1)


def test_take_and_put_block_round_trip():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-128, 128, (3, 2, 10, 4)).astype(np.int8) for _ in range(4)]  # 2 layers x K, V
    kv = take_block(arrays, 1, 4, 3)
    assert kv.shape == (4, 2, 3, 4) and np.array_equal(kv[2], arrays[2][1, :, 4:7])
    kv[0] += 1  # a copy: the cache is untouched
    assert not np.array_equal(kv[0], arrays[0][1, :, 4:7])
    target = [np.zeros_like(a) for a in arrays]
    put_block(target, 2, 4, take_block(arrays, 1, 4, 3))
    assert all(np.array_equal(t[2, :, 4:7], a[1, :, 4:7]) for t, a in zip(target, arrays))
    assert all(not t[:2].any() and not t[2, :, :4].any() and not t[2, :, 7:].any() for t in target)


def test_stats_since_gives_a_jobs_counts():
    a = PrefixStats(hits=3, misses=4, saved_tokens=192, entries=5, bytes=50, evictions=1)
    b = PrefixStats(hits=10, misses=5, saved_tokens=640, entries=6, bytes=60, evictions=2)
    assert b.since(a) == PrefixStats(7, 1, 448, 6, 60, 1)
    assert set(b.as_dict()) == {"hits", "misses", "saved_tokens", "entries", "bytes", "evictions"}


def test_threads_share_one_cache(tmp_path):
    from helpers.threads import in_threads

    c = PrefixCache(block=4, capacity_bytes=20_000)
    keys = c.keys(range(4 * 40))

    def work(i: int) -> None:
        for j in range(i, 40, 4):
            c.insert(keys[j], _kv(j))
            c.lookup(keys[:j + 1])

    in_threads(work, 4)
    s = c.stats()
    assert s.bytes == 1000 * s.entries <= 20_000 and s.entries + s.evictions == 40


@pytest.mark.parametrize("bad", [-1, "256", True, float("nan"), float("inf"), None])
def test_capacity_must_be_megabytes_at_least_zero(bad):
    with pytest.raises(InvalidRequestError, match="prefix_cache_mb must be a number of MiB >= 0"):
        capacity_bytes(bad)


def test_capacity_in_mebibytes():
    assert capacity_bytes(0) == 0 and capacity_bytes(1) == 1 << 20 and capacity_bytes(0.5) == 1 << 19


def test_a_block_is_stored_at_its_second_sighting():
    c = PrefixCache(block=4, capacity_bytes=1 << 20)
    a, b = c.keys(range(8))
    assert not c.wants(a)  # first time computed: remembered only
    assert c.wants(a)  # second time: store it
    c.insert(a, _kv(1))
    assert not c.wants(a)  # held already
    assert not c.wants(b) and c.stats().entries == 1
    c.clear()
    assert not c.wants(b)  # forgotten by clear
