"""Block-aligned chunked prefill and the prefix cache change no token (issue 22's contract).

A prompt's tokens are the same with the cache, without it, alone, in any batch, static or
continuous, after a kill and resume, in every precision and KV-cache type, greedy or
seeded. The prompts share heads (as a batch job's instructions do) so the cache hits; each
test also checks that it did hit, and one poisons the cache to show a hit is really read.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx._engine import Engine
from gpt2onnx.batch import run_batch

from helpers.procs import ctrl_c_after

BLOCK = 8  # the default block of the tiny models' 64-token context (an eighth): heads of 3 blocks


def _requests(gen, *, n: int, head: int, heads: int = 2, tail=(1, 9), new=(3, 12), seed: int = 0, **params):
    """`n` requests: a `head`-token head (one of `heads`) + a tail, token ids set directly."""
    rng = np.random.default_rng(seed)
    vocab = min(gen.vocab_size, 900)
    tops = [tuple(int(x) for x in rng.integers(0, vocab, head)) for _ in range(heads)]
    out = []
    for i in range(n):
        tail_ids = tuple(int(x) for x in rng.integers(0, vocab, int(rng.integers(tail[0], tail[1] + 1))))
        r = gen.prepare("x", max_new_tokens=int(rng.integers(new[0], new[1] + 1)), ignore_eos=True,
                        **({**params, "seed": i} if params.get("do_sample") else params))
        out.append(dataclasses.replace(r, input_ids=tops[i % heads] + tail_ids))
    return out


def _all_ways(gen, reqs, mb: float):
    """Token ids of every request: alone (no cache), continuous at 1-3 slots and static, each with the cache."""
    alone = [gen.generate_batch([r])[0].token_ids for r in reqs]
    ways = {"alone": alone}
    for size in (1, 2, 3):
        got = dict(gen.generate_iterable(iter(reqs), batch_size=size, prefix_cache_mb=mb))
        ways[f"continuous-{size}"] = [got[i].token_ids for i in range(len(reqs))]
    ways["static"] = [t for k in range(0, len(reqs), 3)
                      for t in (x.token_ids for x in gen.generate_batch(reqs[k:k + 3], prefix_cache_mb=mb))]
    return ways


@pytest.mark.parametrize("folder", ["fp32", "int8", "int8-kvfp32", "int4", "fp32-kv8"])
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.9, "top_k": 0}],
                         ids=["greedy", "seeded"])
def test_tokens_same_with_and_without_the_cache_in_every_way(tiny_fp32, tiny_int8, tiny_int8_kvfp32, tiny_int4,
                                                              tiny_kv8, folder, sampling):
    path = {"fp32": tiny_fp32, "int8": tiny_int8, "int8-kvfp32": tiny_int8_kvfp32, "int4": tiny_int4,
            "fp32-kv8": tiny_kv8["fp32"]}[folder]
    gen = gpt2onnx.load(path, threads=1, prefill_block=BLOCK)
    reqs = _requests(gen, n=9, head=3 * BLOCK, **sampling)
    ways = _all_ways(gen, reqs, mb=1)
    for name, got in ways.items():
        assert got == ways["alone"], name
    s = gen.prefix_cache_stats()
    assert s.hits > 0 and s.saved_tokens == s.hits * BLOCK and s.entries > 0
    assert gen._engine.block == BLOCK == gpt2onnx.load(path, threads=1)._engine.block  # noqa: SLF001
    one_shot = gpt2onnx.load(path, threads=1, prefill_block=64)  # every prompt in one call: the same tokens
    assert [one_shot.generate_batch([r])[0].token_ids for r in reqs] == ways["alone"]


def test_a_hit_is_really_read_poisoned_blocks_change_tokens(tiny_fp32):
    """Without this, the test above could pass with a cache that is never used."""
    gen = gpt2onnx.load(tiny_fp32, threads=1, prefill_block=BLOCK)
    reqs = _requests(gen, n=4, head=3 * BLOCK, heads=1, new=(12, 12))
    want = [t for _, t in sorted((i, r.token_ids) for i, r in gen.generate_iterable(iter(reqs), prefix_cache_mb=1))]
    cache = gen.prefix_cache(1)
    for kv in cache._entries.values():  # noqa: SLF001 (the test reaches in on purpose)
        kv[...] = np.random.default_rng(0).standard_normal(kv.shape).astype(kv.dtype) * 5
    before = cache.stats().hits
    got = [t for _, t in sorted((i, r.token_ids) for i, r in gen.generate_iterable(iter(reqs), prefix_cache_mb=1))]
    assert cache.stats().hits > before and got != want
    assert [t for _, t in sorted((i, r.token_ids) for i, r in gen.generate_iterable(iter(reqs)))] == want


def test_prompts_go_in_blocks_and_a_decoding_row_waits_at_most_one(tiny_int8, monkeypatch):
    """Every prefill call holds at most one block per row, at a block boundary; between two decode steps
    that have a decoding row, at most one prefill call runs."""
    calls = []
    real = Engine.step

    def step(self, binding, ids, lengths, pos, last=True):
        calls.append(("decode" if last else "prefill", ids.shape, int(pos[0, 0])))
        return real(self, binding, ids, lengths, pos, last)

    monkeypatch.setattr(Engine, "step", step)
    gen = gpt2onnx.load(tiny_int8, threads=1, prefill_block=BLOCK)
    reqs = _requests(gen, n=6, head=4 * BLOCK, heads=6, tail=(3, 7), new=(10, 20))
    list(gen.generate_iterable(iter(reqs), batch_size=2))
    prefills = [c for c in calls if c[0] == "prefill"]
    assert all(shape[1] <= BLOCK and p % BLOCK == 0 for _, shape, p in prefills)
    assert any(shape[0] == 1 and p > 0 for _, shape, p in prefills)  # later blocks: one row per call
    first_decode = next(i for i, c in enumerate(calls) if c[0] == "decode")
    runs, n = [], 0
    for kind, _, _ in calls[first_decode:]:
        if kind == "prefill":
            n += 1
        else:
            runs.append(n)
            n = 0
    assert max(runs) == 1 and sum(runs) > 3  # rows admitted mid-flight: one block between decode steps


def test_the_block_size_is_checked(tiny_int8):
    for bad in (0, 7, -2, True, "64"):
        with pytest.raises(gpt2onnx.InvalidRequestError, match="prefill_block must be an even number"):
            gpt2onnx.load(tiny_int8, prefill_block=bad)


def _job_input(path, folder: str, n: int, seed: int = 1) -> None:
    """A job of `n` prompts: one of 2 heads of 3 blocks (single-token words) + a tail of 1-5 words."""
    from gpt2onnx.bench.measure import single_token_words

    words = single_token_words(gpt2onnx.load(folder, threads=1).tokenizer)
    rng = np.random.default_rng(seed)
    heads = ["".join(" " + w for w in rng.choice(words, 3 * BLOCK)) for _ in range(2)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            tail = "".join(" " + w for w in rng.choice(words, int(rng.integers(1, 6))))
            f.write(json.dumps({"id": i, "prompt": heads[i % 2] + tail, "max_new_tokens": int(rng.integers(2, 9)),
                                "ignore_eos": True, "do_sample": bool(i % 3 == 0), "seed": i}) + "\n")


def _texts(path) -> list[tuple]:
    with open(path, encoding="utf-8") as f:
        return [(r["id"], r["text"], r["generated_tokens"]) for r in map(json.loads, f)]


def test_jobs_count_hits_and_write_the_same_rows_on_or_off_and_after_a_resume(tiny_int8, tmp_path, monkeypatch):
    gen = gpt2onnx.load(tiny_int8, threads=1)
    _job_input(tmp_path / "in.jsonl", tiny_int8, 30)
    off = run_batch(gen, tmp_path / "in.jsonl", tmp_path / "off.jsonl", batch_size=3, prefix_cache_mb=0)
    assert (off.prefix_cache_hits, off.prefix_cache_misses, off.prefix_cache_saved_tokens) == (0, 0, 0)
    on = run_batch(gen, tmp_path / "in.jsonl", tmp_path / "on.jsonl", batch_size=3)  # on by default
    assert on.prefix_cache_hits > 0 and on.prefix_cache_saved_tokens == on.prefix_cache_hits * BLOCK
    assert on.prefix_cache_misses > 0  # the heads' blocks, once each, and whatever tails fill a block
    static = run_batch(gen, tmp_path / "in.jsonl", tmp_path / "static.jsonl", batch_size=3, batching="static")
    assert _texts(tmp_path / "on.jsonl") == _texts(tmp_path / "off.jsonl") == _texts(tmp_path / "static.jsonl")
    assert static.prefix_cache_hits > 0

    fresh = gpt2onnx.load(tiny_int8, threads=1)  # killed after 10 rows, resumed by a new process
    ctrl_c_after(fresh, monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        run_batch(fresh, tmp_path / "in.jsonl", tmp_path / "resumed.jsonl", batch_size=3)
    again = gpt2onnx.load(tiny_int8, threads=1)
    s = run_batch(again, tmp_path / "in.jsonl", tmp_path / "resumed.jsonl", batch_size=3)
    assert 0 < s.skipped_already_done < 30 and _texts(tmp_path / "resumed.jsonl") == _texts(tmp_path / "off.jsonl")


def test_workers_sum_their_counts(tiny_int8, tmp_path):
    """Each worker process keeps its own cache; the summary adds their counts."""
    _job_input(tmp_path / "in.jsonl", tiny_int8, 24)
    one = run_batch(tiny_int8, tmp_path / "in.jsonl", tmp_path / "one.jsonl", batch_size=2, threads=1)
    two = run_batch(tiny_int8, tmp_path / "in.jsonl", tmp_path / "two.jsonl", batch_size=2, threads=1, workers=2)
    assert _texts(tmp_path / "one.jsonl") == _texts(tmp_path / "two.jsonl")
    assert one.prefix_cache_hits > 0 and two.prefix_cache_hits > 0
    assert two.prefix_cache_saved_tokens == BLOCK * two.prefix_cache_hits


def test_cli_flag_and_summary(tiny_int8, tmp_path, capsys):
    from gpt2onnx.cli import main

    _job_input(tmp_path / "in.jsonl", tiny_int8, 12)
    assert main(["batch", tiny_int8, str(tmp_path / "in.jsonl"), str(tmp_path / "a.jsonl"), "--threads", "1",
                 "--no-progress"]) == 0
    assert "blocks hit" in capsys.readouterr().out
    assert main(["batch", tiny_int8, str(tmp_path / "in.jsonl"), str(tmp_path / "b.jsonl"), "--threads", "1",
                 "--no-progress", "--prefix-cache-mb", "0"]) == 0
    assert "prefix cache" not in capsys.readouterr().out
    assert _texts(tmp_path / "a.jsonl") == _texts(tmp_path / "b.jsonl")
    assert main(["batch", tiny_int8, str(tmp_path / "in.jsonl"), str(tmp_path / "c.jsonl"),
                 "--prefix-cache-mb", "-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefix_cache_mb must be a number of MiB >= 0" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tokens_same_with_and_without_the_cache_124m(gpt2_124m, precision):
    """The 124M architecture (int8: its default int8 KV cache), 64-token blocks, heads of 3 blocks plus tails of
    1-40 tokens, greedy and seeded: alone, continuous at 1-3 slots and static, with the cache."""
    gen = gpt2onnx.load(gpt2_124m[precision], threads=2, verify_hashes=False)
    assert gen.manifest.kv_cache.dtype == ("int8" if precision == "int8" else "fp32")
    for sampling in ({}, {"do_sample": True, "temperature": 0.8, "top_k": 0}):
        reqs = _requests(gen, n=7, head=192, tail=(1, 40), new=(20, 40), seed=5, **sampling)
        ways = _all_ways(gen, reqs, mb=64)
        for name, got in ways.items():
            assert got == ways["alone"], (precision, sampling, name)
    assert gen.prefix_cache_stats().hits >= 20
