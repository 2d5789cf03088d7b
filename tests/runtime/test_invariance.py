"""A prompt gives the same tokens alone or in any batch (README promise), at real scale.

The int8 and int4 MatMul kernels compute rows in pairs and an odd M's last row takes
another kernel (see gpt2onnx._engine; the even-M rule covers int4 unchanged), so a row's tokens could depend on how many neighbours it
has. Tiny models hide it (few near-ties); the 124M architecture shows it within a few
dozen tokens. These tests run generation alone and in batches and compare token ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx._engine import Engine, needs_row_pairs
from gpt2onnx.artifact import read_manifest
from gpt2onnx.eval.gate import gate_text

WIKI = gate_text()


def _prompts(gen, lengths, start=0):
    ids = gen.tokenizer.encode(WIKI).ids
    return [gen.tokenizer.decode(ids[start + 300 * i:start + 300 * i + n]) for i, n in enumerate(lengths)]


def _check_alone_equals_batched(gen, prompts, max_new, **kw):
    reqs = [gen.prepare(p, max_new_tokens=m, ignore_eos=True, **kw) for p, m in zip(prompts, max_new)]
    together = gen.generate_batch(reqs)
    for i, (r, t) in enumerate(zip(reqs, together)):
        alone = gen.generate_batch([r])[0]
        assert alone.token_ids == t.token_ids, (
            f"row {i} (prompt {len(r.input_ids)} tokens) differs alone vs in a batch of {len(reqs)}")
    pairs = gen.generate_batch(reqs[:2])  # and in a batch of another size
    assert [p.token_ids for p in pairs] == [t.token_ids for t in together[:2]]


CASES = [  # (prompt lengths in tokens, max_new_tokens per row): equal, mixed, rows finishing at different steps
    ((96, 96, 96, 96), (40, 40, 40, 40)),
    ((96, 96, 96), (40, 7, 23)),
    ((5, 40, 96, 1, 17), (40, 12, 33, 5, 40)),
]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.7, "top_k": 0, "seed": 5}],
                         ids=["greedy", "sampled"])
def test_alone_equals_batched_124m(gpt2_124m, precision, sampling):
    gen = gpt2onnx.load(gpt2_124m[precision], threads=2, verify_hashes=False)
    for lengths, max_new in CASES:
        _check_alone_equals_batched(gen, _prompts(gen, lengths), max_new, **sampling)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_one_token_prompts_and_empty_prompt_124m(gpt2_124m, precision):
    gen = gpt2onnx.load(gpt2_124m[precision], threads=2, verify_hashes=False)
    _check_alone_equals_batched(gen, ["The", "", " of", "A"], (30, 30, 9, 30))


@pytest.mark.slow
def test_alone_equals_batched_124m_int8_kv_cache(gpt2_124m_kv8):
    """int8 weights with an int8 KV cache: the cache quantizes each row's own keys and values with
    static scales, so nothing a neighbour does reaches a row; greedy and sampled, every case."""
    gen = gpt2onnx.load(gpt2_124m_kv8, threads=2, verify_hashes=False)
    assert gen.manifest.kv_cache.dtype == "int8"
    for lengths, max_new in CASES:
        _check_alone_equals_batched(gen, _prompts(gen, lengths), max_new)
    _check_alone_equals_batched(gen, _prompts(gen, CASES[2][0]), CASES[2][1], do_sample=True, temperature=0.7,
                                top_k=0, seed=5)
    _check_alone_equals_batched(gen, ["The", "", " of", "A"], (30, 30, 9, 30))


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_alone_equals_batched_int8_kv_cache(tiny_kv8, weights):
    """The tiny model with an int8 KV cache, alone, in batches and admitted mid-flight (continuous batching)."""
    gen = gpt2onnx.load(tiny_kv8[weights], threads=1)
    prompts = [gen.tokenizer.decode(gen.tokenizer.encode(WIKI).ids[40 * i:40 * i + n]) for i, n in
               enumerate((5, 17, 1, 30, 12))]
    _check_alone_equals_batched(gen, prompts, (12, 5, 12, 9, 3))
    reqs = [gen.prepare(p, max_new_tokens=m, ignore_eos=True) for p, m in zip(prompts, (12, 5, 12, 9, 3))]
    alone = [gen.generate_batch([r])[0].token_ids for r in reqs]
    admitted = dict(gen.generate_iterable(iter(reqs), batch_size=2))
    assert [admitted[i].token_ids for i in range(len(reqs))] == alone


@pytest.mark.parametrize("precision", ["int8", "int4", "fp32", "int8-kv8", "fp32-kv8"])
def test_every_matmul_sees_an_even_number_of_rows_where_the_graph_needs_it(tiny_fp32, tiny_int8, tiny_int4, tiny_kv8,
                                                                           monkeypatch, precision):
    """The rule behind the promise, checked on every step: with an 8-bit MatMulNBits in the graph,
    rows x new tokens and rows x kept positions are even; without one, a lone row runs alone."""
    seen = []
    real = Engine.step

    def step(self, binding, ids, lengths, pos, last=True):
        keep = binding.logits.shape[1]
        seen.append((ids.shape[0] * ids.shape[1], ids.shape[0] * keep))
        return real(self, binding, ids, lengths, pos, last)

    monkeypatch.setattr(Engine, "step", step)
    folder = {"int8": tiny_int8, "int4": tiny_int4, "fp32": tiny_fp32, "int8-kv8": tiny_kv8["int8"],
              "fp32-kv8": tiny_kv8["fp32"]}[precision]
    gen = gpt2onnx.load(folder, threads=1)
    gen.generate(["a", "", "abc de", "abc de fg hi jk"], max_new_tokens=5)  # mixed lengths, odd and even
    gen.generate(["abc", "xyz"], max_new_tokens=3)  # equal odd lengths
    gen.generate_batch([gen.prepare("one row", max_new_tokens=4), gen.prepare("two", max_new_tokens=1),
                        gen.prepare("three rows", max_new_tokens=2)])  # shrinking 3 -> 2 -> 1
    list(gen.generate_tokens("x", max_new_tokens=3))
    assert seen
    if needs_row_pairs(read_manifest(folder)):
        assert all(m % 2 == 0 and head % 2 == 0 for m, head in seen), seen
    else:
        assert (1, 1) in seen  # the lone row's decode: no scratch row


def test_which_graphs_need_row_pairs(tiny_fp32, tiny_int8):
    """8-bit MatMulNBits anywhere -> pairs; fp32 or 4-bit block-32 everywhere -> none (measured, see _engine)."""
    assert needs_row_pairs(read_manifest(tiny_int8))
    assert not needs_row_pairs(read_manifest(tiny_fp32))
    m = read_manifest(tiny_int8)
    four = {"bits": 4, "block_size": 32, "lm_head": "int4", "table_block_size": 32}
    assert not needs_row_pairs(dataclasses.replace(m, precision="int4", quantization=four))
    for change in ({"lm_head": "int8"}, {"block_size": 128}, {"table_block_size": 128}):
        assert needs_row_pairs(dataclasses.replace(m, precision="int4", quantization={**four, **change})), change


# -- a killed and resumed job equals the uninterrupted one --------------------------------

def _without_timing(path):
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f if line.strip()]


@pytest.mark.slow
def test_killed_and_resumed_job_equals_uninterrupted_124m(gpt2_124m, tmp_path):
    """SIGKILL a `gpt2onnx batch` job at several points, resume it each time: every row (text, token
    counts, finish reason) equals the uninterrupted run's; only the timing field may differ."""
    model = gpt2_124m["int8"]
    gen = gpt2onnx.load(model, threads=2, verify_hashes=False)
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 60, size=24)
    src = tmp_path / "in.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i, p in enumerate(_prompts(gen, [int(n) for n in lengths])):
            f.write(json.dumps({"id": i, "prompt": p, "max_new_tokens": int(rng.integers(4, 24)),
                                "do_sample": bool(i % 2), "temperature": 0.8, "seed": i}) + "\n")
    cmd = [sys.executable, "-m", "gpt2onnx", "batch", model, str(src), "OUT", "--batch-size", "5",
           "--threads", "2", "--no-progress"]
    ref = tmp_path / "ref.jsonl"
    subprocess.run([a if a != "OUT" else str(ref) for a in cmd], check=True, capture_output=True, timeout=300)
    out = tmp_path / "out.jsonl"
    run = [a if a != "OUT" else str(out) for a in cmd]
    kills = 0
    for rows_before_kill in (3, 9, 16):
        proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= rows_before_kill:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(30)
    assert kills >= 2, "the job finished before it could be killed"
    subprocess.run(run, check=True, capture_output=True, timeout=300)
    assert _without_timing(out) == _without_timing(ref)
    assert os.path.getsize(out) > 0
