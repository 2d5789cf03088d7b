"""The prefix cache: the KV-cache bytes of full prompt blocks, keyed by a hash chain, LRU within a byte budget::

    cache = PrefixCache(block=64, capacity_bytes=256 << 20)
    keys = cache.keys(prompt_ids)               # one key per full block of the prompt
    found = cache.lookup(keys[:usable])          # the cached blocks at the prompt's start
    if cache.wants(keys[j]):                     # after block j was computed: its second sighting?
        cache.insert(keys[j], block_kv)

A prompt is prefilled in blocks of `block` tokens at positions 0, B, 2B ... (see
`_engine`), so block j's keys and values are a function of tokens [0, (j + 1) B) only.
They are stored under a hash chain, as vLLM's automatic prefix caching does::

    key_j = blake2b(key_{j-1} || tokens of block j)      key_-1 = b"" (16-byte digests)

so a key names the whole prefix up to its block's end, and a later prompt that starts with
the same tokens finds the same keys. A hit is the longest run of cached keys from block 0.
One cache belongs to one engine (one model, one block size, one KV dtype): the bytes
are the graph's own past/present values, float32 or int8, copied as they are.

Memory: every entry is one array (2 n_layer, n_head, block, head_dim) in the cache's dtype
(124M, 64-token blocks: 1.2 MB int8, 4.7 MB float32). When an insert would pass
`capacity_bytes`, the least recently used entries go first; a lookup counts as a use.

A block is stored the second time it is computed, not the first (`wants`: the keys seen once
are remembered, `SEEN_KEYS` of them, 16 bytes each): a job whose prompts share nothing then
holds nothing (measured, 124M int8, the job scenario's mixed job: storing every block filled
the 256 MiB budget, peak RSS 350 -> 592 MB), and a shared head is computed twice before its
blocks are served from the cache.
`stats()` gives hits (blocks copied) and misses (blocks computed after a lookup failed),
tokens whose prefill a hit saved,
entries, bytes and evictions. Thread-safe: one `Generator` may serve many threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_MB = 256  # default budget (MiB): 124M int8 cache, 64-token blocks: ~210 blocks (13.6k prompt tokens)
_DIGEST = 16  # bytes of each key: 128 bits, collisions out of reach for any job
SEEN_KEYS = 1 << 16  # keys of blocks computed once, remembered (least recent out): ~8 MB, 4M prompt tokens at 64


@dataclass(frozen=True)
class PrefixStats:
    """Counters of one prefix cache since it was made (or of a job: a difference of two)."""

    hits: int = 0  # full blocks found in the cache
    misses: int = 0  # full blocks looked up, not found, then computed
    saved_tokens: int = 0  # prompt tokens not prefilled thanks to hits (hits x block)
    entries: int = 0  # blocks held now
    bytes: int = 0  # bytes held now
    evictions: int = 0  # blocks dropped to stay within the budget

    def since(self, earlier: "PrefixStats") -> "PrefixStats":
        """The counts between `earlier` and this snapshot (entries and bytes: this snapshot's)."""
        return PrefixStats(self.hits - earlier.hits, self.misses - earlier.misses,
                           self.saved_tokens - earlier.saved_tokens, self.entries, self.bytes,
                           self.evictions - earlier.evictions)

    def __add__(self, other: "PrefixStats") -> "PrefixStats":
        """Counts of two caches together (the workers of a job)."""
        return PrefixStats(*(a + b for a, b in zip(self.as_dict().values(), other.as_dict().values())))

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "saved_tokens": self.saved_tokens,
                "entries": self.entries, "bytes": self.bytes, "evictions": self.evictions}


class PrefixCache:
    """Block KV by hash-chain key, least recently used out first, within `capacity_bytes`."""

    def __init__(self, *, block: int, capacity_bytes: int):
        if block < 1 or capacity_bytes < 0:
            raise ValueError(f"block must be >= 1 and capacity_bytes >= 0, got {block}, {capacity_bytes}")
        self.block = block
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()  # oldest use first
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # blocks computed once, not stored
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        """The hash-chain key of every full block of `tokens` (a partial last block has none)."""
        ids = np.asarray(tokens, np.int64)
        out, key = [], b""
        for end in range(self.block, len(ids) + 1, self.block):
            key = hashlib.blake2b(key + ids[end - self.block:end].tobytes(), digest_size=_DIGEST).digest()
            out.append(key)
        return out

    def lookup(self, keys: Sequence[bytes]) -> list[np.ndarray]:
        """The cached blocks for the longest run of `keys` from the first; counts a hit per block found
        and one miss when the run stops short (the caller computes that block, then asks again from
        the next: so every block asked for is counted once, as a hit or as a miss)."""
        found = []
        with self._lock:
            for key in keys:
                kv = self._entries.get(key)
                if kv is None:
                    break
                self._entries.move_to_end(key)
                found.append(kv)
            self._hits += len(found)
            self._misses += len(found) < len(keys)
        return found

    def wants(self, key: bytes) -> bool:
        """Whether a block just computed should be stored: True at its second sighting (and not
        held already); the first sighting is only remembered."""
        with self._lock:
            if key in self._entries:
                return False
            if key in self._seen:
                del self._seen[key]
                return True
            self._seen[key] = None
            if len(self._seen) > SEEN_KEYS:
                self._seen.popitem(last=False)
            return False

    def insert(self, key: bytes, kv: np.ndarray) -> bool:
        """Keep `kv` (owned by the cache from now on: pass a copy) under `key`, evicting the least
        recently used blocks as needed; False when one block alone passes the budget."""
        size = int(kv.nbytes)
        if size > self.capacity_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.capacity_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
                self._evictions += 1
            self._entries[key] = kv
            self._bytes += size
        return True

    def resize(self, capacity_bytes: int) -> None:
        """A new budget; the least recently used blocks go until the held bytes fit it."""
        with self._lock:
            self.capacity_bytes = capacity_bytes
            while self._entries and self._bytes > capacity_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
                self._evictions += 1

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> PrefixStats:
        with self._lock:
            return PrefixStats(self._hits, self._misses, self._hits * self.block, len(self._entries), self._bytes,
                               self._evictions)

    def clear(self) -> None:
        """Drop every block (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self._bytes = 0


def take_block(arrays: Sequence[np.ndarray], row: int, start: int, block: int) -> np.ndarray:
    """A copy of positions [start, start + block) of `row` from a cache's per-layer (B, H, T, D) arrays:
    one (len(arrays), H, block, D) array, the entry `insert` keeps."""
    return np.stack([a[row, :, start:start + block] for a in arrays])


def put_block(arrays: Sequence[np.ndarray], row: int, start: int, kv: np.ndarray) -> None:
    """Write an entry back at positions [start, start + its block) of `row` (the inverse of `take_block`)."""
    stop = start + kv.shape[2]
    for a, x in zip(arrays, kv):
        a[row, :, start:stop] = x


def capacity_bytes(mb) -> int:
    """A ``--prefix-cache-mb`` / ``prefix_cache_mb`` value in bytes (MiB; 0 = off).

    >>> capacity_bytes(256)
    268435456
    """
    from .errors import InvalidRequestError

    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0 or mb == float("inf"):
        raise InvalidRequestError(f"prefix_cache_mb must be a number of MiB >= 0 (0 turns the prefix cache off), "
                                  f"got {mb!r}")
    return int(mb * (1 << 20))
