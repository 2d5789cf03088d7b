"""The runtime on an int8-KV folder: the cache is int8 bytes, generation works every way it works on fp32."""

from __future__ import annotations

import numpy as np

import gpt2onnx
from gpt2onnx._engine import Batch, Engine

PROMPTS = ["The history of", "A", "In 2011 the game was released", "Valkyria Chronicles III is a tactical role"]


def test_the_cache_is_allocated_in_the_manifests_dtype(tiny_kv8, tiny_int8, tiny_int8_kvfp32):
    for folder, dtype in ((tiny_kv8["int8"], np.int8), (tiny_kv8["fp32"], np.int8), (tiny_int8, np.int8),
                          (tiny_int8_kvfp32, np.float32)):
        gen = gpt2onnx.load(folder, threads=1)
        engine = Engine(folder, gen.manifest, threads=1)
        b = Batch(engine, slots=3, max_len=16)
        assert {a.dtype for a in b.cache.arrays} == {np.dtype(dtype)}
        b.prefill(["a", "b"], [[5, 6, 7], [8, 9, 10]])
        b.decode(np.array([1, 2] + [0] * (b.slots - 2)))  # 4 slots where rows go in pairs (int8 weights), else 3
        b.free(0)
        assert b.compact() == [1] and b.rows[0] == "b"  # compaction copies the int8 bytes as they are
        assert {a.dtype for a in b.cache.arrays} == {np.dtype(dtype)} and b.slots == (2 if engine.pairs else 1)


def test_generate_batched_streamed_and_continuous_on_int8_kv(tiny_kv8):
    gen = gpt2onnx.load(tiny_kv8["int8"], threads=1)
    batched = gen.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert [r.generated_tokens for r in batched] == [8] * len(PROMPTS)
    for prompt, r in zip(PROMPTS, batched):
        streamed = [s.token_id for s in gen.generate_tokens(prompt, max_new_tokens=8, ignore_eos=True)]
        assert tuple(streamed) == tuple(r.token_ids), prompt
    reqs = [gen.prepare(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (3, 8, 5, 8))]
    continuous = dict(gen.generate_iterable(iter(reqs), batch_size=2))  # rows admitted into freed slots mid-flight
    assert [continuous[i].token_ids for i in range(len(reqs))] == [r.token_ids[:n] for r, n in
                                                                   zip(batched, (3, 8, 5, 8))]
    sampled = gen.generate(PROMPTS[:2], max_new_tokens=6, do_sample=True, top_k=0, seed=3, ignore_eos=True)
    assert [r.token_ids for r in sampled] == [r.token_ids for r in
                                              gen.generate(PROMPTS[:2], max_new_tokens=6, do_sample=True, top_k=0,
                                                           seed=3, ignore_eos=True)]


def test_greedy_int8_kv_mostly_agrees_with_fp32_kv(tiny_kv8, tiny_fp32, tiny_int8):
    for kv8, fp in ((tiny_kv8["fp32"], tiny_fp32), (tiny_kv8["int8"], tiny_int8)):
        a = gpt2onnx.load(kv8, threads=1).generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
        b = gpt2onnx.load(fp, threads=1).generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
        same = np.array([x == y for r, s in zip(a, b) for x, y in zip(r.token_ids, s.token_ids)])
        assert same.size == 16 * len(PROMPTS) and same.mean() >= 0.9, same.mean()
