"""The decode loop (`_scheduler.run`) over a fake engine: admission, finishing, compaction, row pairs.

The fake engine's next token is a function of a row's last token and its position only,
so any dependence of a row's tokens on its company, its slot or its admission time is the
scheduler's (or the Batch's) fault, not the model's.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx import _scheduler
from gpt2onnx._kvcache import KVCache
from gpt2onnx.params import GenerationParams
from gpt2onnx.request import Request
from gpt2onnx.textstream import TextStream

V = 50  # vocabulary of the fake model; token 0 is never produced (it is the scratch rows' token)


class FakeBinding:
    def __init__(self, batch: int, keep: int):
        self.logits = np.zeros((batch, keep, V), np.float32)


class FakeEngine:
    """next token = (7 * last token + 3 * position) % (V - 1) + 1; records every step's rows and ids."""

    def __init__(self, pairs: bool, block: int = 4):
        self.pairs = pairs
        self.block = block  # prefill block: PROMPTS up to 7 tokens go in 1-2 blocks
        self.steps: list[np.ndarray] = []  # ids (B, S) of every step
        self.decodes: list[np.ndarray] = []  # ids (B, 1) of the decode steps

    def cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.zeros(batch, 1, 1, 2, max_len)

    def bind(self, cache: KVCache, keep: int = 1) -> FakeBinding:
        return FakeBinding(cache.batch, keep)

    def step(self, binding, ids, lengths, pos, last=True):
        self.steps.append(np.array(ids))
        if last:  # the Batch's decode step (a prefill asks for every kept position)
            self.decodes.append(np.array(ids))
        nxt = (7 * ids + 3 * pos) % (V - 1) + 1  # (B, S): the token after each position
        binding.logits[:] = 0
        keep = binding.logits.shape[1]
        for b in range(ids.shape[0]):
            for k in range(keep):
                binding.logits[b, k, nxt[b, ids.shape[1] - keep + k]] = 1.0
        return binding.logits[:, -1, :] if last else binding.logits


def seq(index: int, prompt: list[int], n: int, **params) -> _scheduler.Sequence:
    req = Request(f"p{index}", tuple(prompt), GenerationParams(max_new_tokens=n, **params))
    return _scheduler.Sequence(index, req, TextStream(lambda ids: " ".join(map(str, ids))))


def expected(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for p in range(len(prompt) - 1, len(prompt) - 1 + n):
        last = (7 * last + 3 * p) % (V - 1) + 1
        out.append(last)
    return out


def tokens_of(engine, first, more=None, slots=None) -> dict[int, list[int]]:
    got: dict[int, list[int]] = {}
    every = first + (list(more) if more else [])
    it = iter(every[len(first):]) if more else None
    max_len = max(len(s.request.input_ids) + s.params.max_new_tokens for s in every)
    for s, tok, reason, _ in _scheduler.run(engine, first, it, slots=slots or len(first), max_len=max_len,
                                            eos_token_id=V + 1):
        got.setdefault(s.index, []).append(tok)
        assert (reason is not None) == (len(got[s.index]) == s.params.max_new_tokens)
    return got


PROMPTS = [[5, 9, 2], [11], [3, 3, 3, 3, 3], [40, 41], [8, 1, 7, 2, 9, 4, 4]]
NEW = [4, 9, 2, 6, 5]


@pytest.mark.parametrize("pairs", [False, True])
def test_every_row_gets_its_own_tokens_alone_batched_and_admitted(pairs):
    want = {i: expected(p, n) for i, (p, n) in enumerate(zip(PROMPTS, NEW))}
    for i, (p, n) in enumerate(zip(PROMPTS, NEW)):
        assert tokens_of(FakeEngine(pairs), [seq(i, p, n)]) == {i: want[i]}
    assert tokens_of(FakeEngine(pairs), [seq(i, p, n) for i, (p, n) in enumerate(zip(PROMPTS, NEW))]) == want
    rows = [seq(i, p, n) for i, (p, n) in enumerate(zip(PROMPTS, NEW))]
    assert tokens_of(FakeEngine(pairs), rows[:2], rows[2:], slots=2) == want  # continuous: admitted into freed slots


@pytest.mark.parametrize("pairs", [False, True])
def test_steps_have_even_rows_with_pairs_and_the_batch_shrinks_when_nothing_is_left_to_admit(pairs):
    engine = FakeEngine(pairs)
    tokens_of(engine, [seq(i, p, n) for i, (p, n) in enumerate(zip(PROMPTS, NEW))])
    widths = [ids.shape[0] for ids in engine.decodes]
    assert widths == sorted(widths, reverse=True) and widths[-1] <= 2  # compacted as rows finish
    if pairs:
        assert all(ids.size % 2 == 0 for ids in engine.steps)  # M = B x S rows: even (odd prompts padded)
    else:
        assert widths[-1] == 1  # the last row decodes alone


def test_admission_fills_freed_slots_in_order_and_never_exceeds_the_slots():
    engine = FakeEngine(pairs=False)
    order = []
    rows = [seq(i, p, n) for i, (p, n) in enumerate(zip(PROMPTS, NEW))]
    first = [s.index for s, _, _, _ in _scheduler.run(engine, rows[:2], iter(rows[2:]), slots=2, max_len=20,
                                                      eos_token_id=V + 1)]
    for i in first:
        if i not in order:
            order.append(i)
    assert order == [0, 1, 2, 3, 4]  # each row's first token comes in admission order
    assert max(ids.shape[0] for ids in engine.steps) == 2


def test_history_is_built_only_for_rows_with_a_repetition_penalty(monkeypatch):
    calls = []
    real = _scheduler.Sequence.history
    monkeypatch.setattr(_scheduler.Sequence, "history", lambda self: calls.append(self.index) or real(self))
    tokens_of(FakeEngine(False), [seq(0, [1, 2], 5), seq(1, [3, 4], 5, repetition_penalty=1.3)])
    assert set(calls) == {1} and len(calls) == 5
