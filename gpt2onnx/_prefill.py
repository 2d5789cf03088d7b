"""Block-aligned prefill: a prompt enters its slot in blocks of `Engine.block` tokens at positions 0, B, 2B::

    batch.start(slot, seq, prompt_ids)
    done = step(batch, group=True)   # {slot: (V,) logits} of finished prompts

Why fixed blocks: block j's keys and values are then a function of tokens [0, (j + 1) B)
only, computed the same way alone, in any batch, admitted mid-flight, after a resume, or
after blocks 0..j-1 came from the prefix cache (`_prefix`): a cache hit cannot change a
token. What `bench/prefill_probe.py` measured, and onnxruntime's one limit (GroupQueryAttention
takes S > 1 new tokens over a non-empty past only at batch 1, so a block after the first runs
one row per call): docs/reliability.md, "Chunked prefill and the prefix cache".

When (`_scheduler`): while no row decodes, every waiting prompt is prefilled; while rows
decode, one block per decode step, the oldest waiting prompt first, so a decoding row waits
at most one block. A slot mid-prefill rides in decode steps with a dummy token at its next
position (`Batch.decode`), which its next block overwrites.

Prefix cache: before a prompt's next block is computed, the cache gives the longest run of
its blocks from there (never the block holding the last token: its logits are needed);
a full block computed for the second time is stored (`PrefixCache.wants`). Lookups happen when a block is due, not at
admission, so prompts admitted together find the blocks their elders computed meanwhile.
"""

from __future__ import annotations

import numpy as np

from ._kvcache import KVCache
from ._prefix import put_block, take_block


def step(batch, *, group: bool) -> dict[int, np.ndarray]:
    """Run the next prefill call of `batch`; returns {slot: (V,) last logits} of the prompts it finished.

    The call is the oldest waiting slot's next block; with `group` and that block at position
    0, also the first blocks of the waiting slots next to it (contiguous slots) of the same length.
    """
    queue = batch.waiting()
    for s in queue if group else queue[:1]:
        _from_cache(batch, s)
    s = queue[0]
    slots = [s]
    if group and batch.lengths[s] == 0:
        n = _block_len(batch, s)
        same = {t for t in queue if batch.lengths[t] == 0 and _block_len(batch, t) == n}
        while slots[-1] + 1 in same:
            slots.append(slots[-1] + 1)
    return _run(batch, slots)


def _block_len(batch, s: int) -> int:
    return min(batch.engine.block, len(batch.todo[s]) - int(batch.lengths[s]))


def _from_cache(batch, s: int) -> None:
    """Copy the cached run of slot `s`'s next blocks into its cache row (once per position)."""
    prefix, B = batch.prefix, batch.engine.block
    c = int(batch.lengths[s])
    if prefix is None or batch.asked[s] == c:
        return
    usable = (len(batch.todo[s]) - 1) // B  # full blocks before the one holding the last token
    found = prefix.lookup(batch.keys[s][c // B:usable]) if c // B < usable else []
    for k, kv in enumerate(found):
        put_block(batch.cache.arrays, s, c + k * B, kv)
    batch.lengths[s] = batch.asked[s] = c + len(found) * B


def _run(batch, slots: list[int]) -> dict[int, np.ndarray]:
    """One call: the next block of contiguous `slots`, all at the same position and block length."""
    e, B = batch.engine, batch.engine.block
    c, n = int(batch.lengths[slots[0]]), _block_len(batch, slots[0])
    ids = np.array([batch.todo[t][c:c + n] for t in slots], np.int64)
    pad = n % 2 if e.pairs else 0
    if pad:  # even M: any token; its key/value at c + n is overwritten by the next step
        ids = np.concatenate([ids, ids[:, -1:]], axis=1)
    finishing = [c + n == len(batch.todo[t]) for t in slots]
    keep = 2 if e.pairs else 1  # the LM head on the last 2 positions where M must be even (logits of mid blocks unused)
    view = KVCache([a[slots[0]:slots[-1] + 1] for a in batch.cache.arrays])  # contiguous rows: writes land in place
    m = ids.shape[1]
    logits = e.step(e.bind(view, keep=keep), ids, np.full(len(slots), c + m),
                    np.tile(np.arange(c, c + m), (len(slots), 1)), last=False)
    out = {}
    for i, (t, fin) in enumerate(zip(slots, finishing)):
        batch.lengths[t] = c + n
        if batch.prefix is not None and n == B and batch.prefix.wants(batch.keys[t][c // B]):
            batch.prefix.insert(batch.keys[t][c // B], take_block(batch.cache.arrays, t, c, B))
        if fin:
            out[t] = logits[i, -1 - pad].copy()
            batch.todo[t] = None
    return out
