"""Probe: is block-aligned chunked prefill exact enough for a prefix cache? (issue 22)

A prompt of L tokens is prefilled in blocks of B at positions 0, B, 2B ... (one onnxruntime
call per block, the past = the earlier blocks, in place in the shared past/present buffer).
For each model folder the probe answers, in bits (``identical``) or as the largest
difference (logits; cache in its own unit: float, or int8 steps):

- ``support``: does GroupQueryAttention run S > 1 new tokens over a non-empty past, and how
  far is the chunked prefill from the one-shot prefill of the same prompt?
- ``copied_past``: block k run after blocks 0..k-1 were computed in this call sequence, vs
  after their cache bytes were copied into a fresh cache (a prefix-cache hit), vs into a
  cache whose positions from kB on hold garbage (a reused slot, a scratch token).
- ``query_count``: the span [kB, L) as one call vs two (another query count).
- ``batch_same_block`` / ``batch_other_blocks`` / ``batch_with_first_block``: block k of a row
  alone vs in one call with other rows (same S; their pasts equal, different, or empty).
- ``keep``: the LM head's ``logits_to_keep`` (1 vs 2) does not touch the cache.
- ``decode_beside_prefill``: a decoding row's logits and cache when its neighbour slot is a
  scratch row (token 0 at position 0, today) vs a row mid-prefill fed a dummy token at its
  length (its next block overwrites it), and that row's blocks after the dummy vs alone.
- ``odd_tail_unpadded``: an odd tail block without its pad token (M odd) vs with it: where
  the even-M rule still matters (8-bit MatMulNBits: the last row differs).

    nice -n 19 python bench/prefill_probe.py models/tiny-int8 models/124m-int8 [--block 64 --length 229]

Prints one JSON object per folder. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from gpt2onnx.errors import first_line


def _engine(folder: str, threads: int):
    from gpt2onnx import artifact
    from gpt2onnx._engine import Engine

    manifest = artifact.read_manifest(folder)
    return Engine(folder, manifest, threads=threads), manifest


class Probe:
    def __init__(self, engine, block: int, length: int, seed: int = 7):
        self.e, self.B, self.L = engine, block, length
        rng = np.random.default_rng(seed)
        self.max_len = length + 2
        self.prompts = rng.integers(0, engine.vocab_size, (4, length))  # row 0 is "the" prompt

    def cache(self, rows: int = 1):
        return self.e.cache(rows, self.max_len)

    def call(self, cache, rows, ids, p0, keep: int = 2, pad: bool | None = None) -> np.ndarray:
        """One step: rows[i] gets ids[i] at positions p0[i]...; returns the last real position's logits (n, V)."""
        ids = np.asarray(ids, np.int64)
        p0 = np.asarray(p0, np.int64)
        s = ids.shape[1]
        pad = self.e.pairs and s % 2 == 1 if pad is None else pad
        if pad:
            ids = np.concatenate([ids, ids[:, -1:]], axis=1)
        view = cache.rows(cache.batch) if rows is None else _rows_view(cache, rows)
        pos = p0[:, None] + np.arange(ids.shape[1])[None]
        logits = _step(self.e, self.e.bind(view, keep=keep), ids, p0 + ids.shape[1], pos)
        out = logits[:, -1 - int(pad)].copy()
        if rows is not None and view is not cache:
            _write_back(cache, view, rows)
        return out

    def chunked(self, cache, row: int, prompt, start_block: int = 0, keep_mid: int = 1) -> np.ndarray:
        logits = None
        for a in range(start_block * self.B, len(prompt), self.B):
            b = min(a + self.B, len(prompt))
            logits = self.call(cache, [row], [prompt[a:b]], [a], keep=2 if b == len(prompt) else keep_mid)[0]
        return logits

    def kv(self, cache, row: int, a: int, b: int) -> list[np.ndarray]:
        return [x[row, :, a:b].copy() for x in cache.arrays]


def _step(e, binding, ids, lengths, pos) -> np.ndarray:
    """`Engine.step` without its error wrapper (the probe reports onnxruntime's own message)."""
    io = binding.io
    io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
    io.bind_cpu_input("attention_mask", (np.arange(int(lengths.max()))[None] < lengths[:, None]).astype(np.int64))
    io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
    e.session.run_with_iobinding(io)
    return binding.logits


def _rows_view(cache, rows):
    """A cache over `rows` of `cache`: a view when they are 0..n-1 (writes land in place), else a copy."""
    if list(rows) == list(range(len(rows))):
        return cache.rows(len(rows))
    from gpt2onnx._kvcache import KVCache

    return KVCache([np.ascontiguousarray(a[list(rows)]) for a in cache.arrays])


def _write_back(cache, view, rows):
    for a, v in zip(cache.arrays, view.arrays):
        a[list(rows)] = v


def _attempt(fn) -> dict:
    """fn(), or the one-line error onnxruntime gave."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 (reported)
        return {"error": first_line(str(err).split("Status Message: ")[-1])}


def diff(x, y) -> dict:
    """identical (bits) and the largest absolute difference of two arrays or lists of arrays."""
    xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
    same = all(np.array_equal(a, b) for a, b in zip(xs, ys))
    big = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(xs, ys))
    return {"identical": same, "max_abs_diff": big}


def probe(folder: str, *, block: int | None, length: int | None, threads: int) -> dict:
    e, manifest = _engine(folder, threads)
    n_pos = manifest.dims.n_positions
    B = block or (64 if n_pos >= 512 else 8)
    L = length or min(3 * B + B // 2 + 1, n_pos - 4)  # 3.5 blocks, an odd tail
    p = Probe(e, B, L)
    x = p.prompts[0]
    out = {"folder": folder, "precision": manifest.precision, "kv_cache": str(e.cache_dtype), "pairs": e.pairs,
           "block": B, "length": L, "threads": threads}
    k_last = (L - 1) // B  # the block holding the last token

    # A: the reference, chunked from an empty cache
    ca = p.cache()
    ref_logits = p.chunked(ca, 0, x)
    ref_kv = p.kv(ca, 0, 0, L)

    # support: one-shot prefill of the whole prompt
    c1 = p.cache()
    one = p.call(c1, [0], [x], [0])[0]
    out["support"] = {"logits_vs_one_shot": diff(ref_logits, one), "kv_vs_one_shot": diff(ref_kv, p.kv(c1, 0, 0, L))}

    # copied past, clean and over garbage
    res_clean, res_dirty = [], []
    rng = np.random.default_rng(1)
    for k in range(1, k_last + 1):
        for dirty, res in ((False, res_clean), (True, res_dirty)):
            cb = p.cache()
            if dirty:
                for a in cb.arrays:
                    a[...] = (rng.integers(-128, 128, a.shape) if a.dtype == np.int8
                              else rng.standard_normal(a.shape) * 10).astype(a.dtype)
            for a, src in zip(cb.arrays, ca.arrays):
                a[0, :, :k * B] = src[0, :, :k * B]
            lg = p.chunked(cb, 0, x, start_block=k)
            res.append(diff([ref_logits] + ref_kv, [lg] + p.kv(cb, 0, 0, L))["identical"])
    out["copied_past"] = {"blocks_identical_clean": res_clean, "blocks_identical_garbage_beyond": res_dirty}

    # query count: [kB, L) in one call vs two
    k = max(1, k_last - 1)
    a0 = k * B
    split = a0 + max(2, ((L - a0) // 2) // 2 * 2)
    cq = p.cache()
    for a, src in zip(cq.arrays, ca.arrays):
        a[0, :, :a0] = src[0, :, :a0]
    one_call = p.cache()
    for a, src in zip(one_call.arrays, ca.arrays):
        a[0, :, :a0] = src[0, :, :a0]
    lg1 = p.call(one_call, [0], [x[a0:]], [a0])[0]
    p.call(cq, [0], [x[a0:split]], [a0], keep=1)
    lg2 = p.call(cq, [0], [x[split:]], [split])[0]
    out["query_count"] = {"span": [a0, L], "split_at": split, "logits": diff(lg1, lg2),
                          "kv": diff(p.kv(one_call, 0, a0, L), p.kv(cq, 0, a0, L))}

    # batches: the prompt in row 1 of 4, every row chunked together (same blocks) ...
    cb4 = p.cache(4)
    lg = p.call(cb4, None, p.prompts[:, :B][[1, 0, 2, 3]], [0] * 4, keep=1)  # block 0: no past
    out["batch_first_block"] = diff(p.kv(ca, 0, 0, B), p.kv(cb4, 1, 0, B))
    out["batch_same_block"] = _attempt(lambda: diff(
        p.kv(ca, 0, B, 2 * B), (p.call(cb4, None, p.prompts[:, B:2 * B][[1, 0, 2, 3]], [B] * 4, keep=1),
                                p.kv(cb4, 1, B, 2 * B))[1]))
    # ... other rows at other blocks (full blocks only, not first), and a row at its first block
    cm = p.cache(2)
    other = p.prompts[1]
    p.chunked(cm, 1, other[:2 * B], keep_mid=1)  # row 1: 2 blocks in
    for a, src in zip(cm.arrays, ca.arrays):
        a[0, :, :B] = src[0, :, :B]
    # row 0 runs its block 1 (past B), row 1 its block 2 (past 2B): one call, S = B each
    out["batch_other_blocks"] = _attempt(lambda: (
        p.call(cm, [0, 1], [x[B:2 * B], other[2 * B:3 * B]], [B, 2 * B], keep=1),
        diff(p.kv(ca, 0, B, 2 * B), p.kv(cm, 0, B, 2 * B)))[1])
    cf = p.cache(2)
    for a, src in zip(cf.arrays, ca.arrays):
        a[0, :, :B] = src[0, :, :B]
    out["batch_with_first_block"] = _attempt(lambda: (
        p.call(cf, [0, 1], [x[B:2 * B], other[:B]], [B, 0], keep=1),
        diff(p.kv(ca, 0, B, 2 * B), p.kv(cf, 0, B, 2 * B)))[1])

    # keep: 2 for every block
    ck = p.cache()
    p.chunked(ck, 0, x, keep_mid=2)
    out["keep"] = {"kv_keep2_vs_keep1": diff(ref_kv, p.kv(ck, 0, 0, L))}

    # decode beside a prefilling slot
    y = p.prompts[2]
    kb = 2 * B  # slot 1 holds 2 blocks of y
    dec = {}
    for variant in ("scratch", "dummy"):
        cd = p.cache(2)
        p.chunked(cd, 0, x)
        p.chunked(cd, 1, y[:kb], keep_mid=1)
        if variant == "scratch":  # today's free slot: token 0 at position 0 (would wreck a prefilling row)
            ids, lengths = np.array([[x[-1]], [0]]), np.array([L + 1, 1])
        else:
            ids, lengths = np.array([[x[-1]], [y[kb]]]), np.array([L + 1, kb + 1])
        pos = (lengths - 1)[:, None]
        lg = _step(e, e.bind(cd), ids, lengths, pos)[:, -1].copy()
        dec[variant] = (lg[0], p.kv(cd, 0, 0, L + 1), cd)
    cd = dec["dummy"][2]
    y_logits = p.chunked(cd, 1, y, start_block=2)
    cy = p.cache()
    y_ref = p.chunked(cy, 0, y)
    out["decode_beside_prefill"] = {
        "decoding_row": diff([dec["scratch"][0]] + dec["scratch"][1], [dec["dummy"][0]] + dec["dummy"][1]),
        "prefilling_row_after_dummy": diff([y_ref] + p.kv(cy, 0, 0, L), [y_logits] + p.kv(cd, 1, 0, L))}

    # odd tail without its pad
    tail = L - k_last * B
    if tail % 2 == 1:
        cu = p.cache()
        for a, src in zip(cu.arrays, ca.arrays):
            a[0, :, :k_last * B] = src[0, :, :k_last * B]
        lg = p.call(cu, [0], [x[k_last * B:]], [k_last * B], keep=1, pad=False)[0]
        out["odd_tail_unpadded"] = {"tail": tail, "logits": diff(ref_logits, lg),
                                    "kv": diff(p.kv(ca, 0, k_last * B, L), p.kv(cu, 0, k_last * B, L))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--block", type=int, default=None, help="block size (default 64, 8 for contexts < 512)")
    ap.add_argument("--length", type=int, default=None, help="prompt tokens (default 3.5 blocks, odd)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    for folder in a.folders:
        res = probe(folder, block=a.block, length=a.length, threads=a.threads)
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}), flush=True)
        for k, v in res.items():
            if isinstance(v, dict):
                print(f"  {k}: {json.dumps(v)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
