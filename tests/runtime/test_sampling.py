"""sampling: distributions equal transformers' processors; invariants; seeded draws."""

import doctest
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import gpt2onnx.sampling
from gpt2onnx.params import GenerationParams
from gpt2onnx.sampling import make_rng, next_tokens, process_logits

EMPTY = np.array([], dtype=np.int64)


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def hf_scores(logits, p: GenerationParams, history, eos):
    """The processors transformers' generate() builds for `p`, in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    if p.ignore_eos:
        procs.append(MinNewTokensLengthLogitsProcessor(0, 10**9, eos))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    ids = torch.tensor(np.asarray(history, dtype=np.int64).reshape(1, -1))
    scores = procs(ids, torch.tensor(logits, dtype=torch.float32).reshape(1, -1))
    return scores[0].numpy()


def near_top_p_boundary(scores_before_top_p: np.ndarray, top_p: float) -> bool:
    """True when float rounding could decide whether a token passes top-p."""
    probs = np.sort(softmax(scores_before_top_p))  # ascending, like transformers
    return bool(np.any(np.abs(np.cumsum(probs) - (1 - top_p)) < 1e-5))


def test_docstring_examples():
    assert doctest.testmod(gpt2onnx.sampling).failed == 0


def test_library_modules_do_not_import_torch():
    code = (
        "import sys, gpt2onnx.params, gpt2onnx.sampling, gpt2onnx.textstream;"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


params_st = st.builds(
    GenerationParams,
    do_sample=st.booleans(),
    temperature=st.one_of(st.just(1.0), st.just(0.0), st.floats(0.05, 5.0), st.integers(1, 3)),
    top_k=st.one_of(st.just(0), st.integers(1, 8), st.integers(1, 400)),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.3, 4.0)),
    ignore_eos=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    params=params_st,
    v=st.sampled_from([2, 3, 17, 100, 1500]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]),
    n_history=st.integers(0, 30),
)
def test_distribution_equals_transformers(params, v, seed, scale, n_history):
    g = np.random.default_rng(seed)
    logits = (g.standard_normal(v) * scale).astype(np.float32)
    history = g.integers(0, v, n_history)  # repeats included on purpose
    eos = int(g.integers(0, v))
    if not params.greedy and params.top_p < 1.0:
        before = hf_scores(logits, params.replace(top_p=1.0), history, eos)
        assume(not near_top_p_boundary(before, params.top_p))

    ours = process_logits(logits, params, history=history, eos_token_id=eos)
    ref = hf_scores(logits, params, history, eos)

    assert ours.dtype == np.float32 and ours.shape == (v,)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))  # same tokens removed
    np.testing.assert_allclose(softmax(ours), softmax(ref), rtol=1e-4, atol=1e-7)
    if params.greedy:  # no warpers: the scores themselves match, not just their softmax
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        tok = next_tokens(logits[None], [params], [make_rng(0)], [history], eos_token_id=eos)
        assert tok[0] == int(torch.argmax(torch.from_numpy(ref)))


def test_distribution_equals_transformers_full_vocab_nucleus():
    """top-p without top-k on GPT-2's vocab size, flat enough to need > 1024 candidates."""
    g = np.random.default_rng(0)
    v = 50257
    logits = (g.standard_normal(v) * 0.5).astype(np.float32)
    history = g.integers(0, v, 200)
    for top_p, t in [(0.95, 1.0), (0.5, 0.7), (0.05, 1.3), (0.999, 2.0)]:
        p = GenerationParams(do_sample=True, top_k=0, top_p=top_p, temperature=t, repetition_penalty=1.3)
        ours = process_logits(logits, p, history=history, eos_token_id=50256)
        ref = hf_scores(logits, p, history, 50256)
        kept = int(np.isfinite(ref).sum())
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
        np.testing.assert_allclose(softmax(ours), softmax(ref), rtol=1e-4, atol=1e-9)
        assert kept > 1, kept
    assert int(np.isfinite(ours).sum()) > 4 * 1024  # the widening path was taken


def test_repetition_penalty_exact_values():
    logits = np.array([2.0, -2.0, 0.5, -0.5, 1.0], np.float32)
    p = GenerationParams(repetition_penalty=2.0)
    out = process_logits(logits, p, history=np.array([0, 1, 1, 1, 3]), eos_token_id=None)
    # Once per token, however often it was seen: positive / 2, negative * 2.
    np.testing.assert_array_equal(out, np.array([1.0, -4.0, 0.5, -1.0, 1.0], np.float32))
    np.testing.assert_array_equal(logits, [2.0, -2.0, 0.5, -0.5, 1.0])  # input untouched
    # The penalty moves id 0 down to 1.0, tying id 4: the first wins, like torch.argmax.
    tok = next_tokens(logits[None], [p], [make_rng(0)], [np.array([0, 1, 1, 1, 3])], eos_token_id=None)
    assert tok.tolist() == [0]
    tok = next_tokens(logits[None], [p.replace(repetition_penalty=2.5)], [make_rng(0)], [np.array([0])],
                      eos_token_id=None)
    assert tok.tolist() == [4]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
    b=st.integers(1, 4),
)
def test_greedy_is_argmax_with_first_max_on_ties(seed, ties, b):
    g = np.random.default_rng(seed)
    logits = (g.integers(-2, 3, (b, 50)) if ties else g.standard_normal((b, 50))).astype(np.float32)
    copy = logits.copy()
    params = [GenerationParams(do_sample=bool(g.integers(2)), temperature=0.0)] * b  # both greedy
    out = next_tokens(logits, params, [make_rng(1)] * b, [EMPTY] * b, eos_token_id=0)
    assert out.dtype == np.int64 and out.shape == (b,)
    assert out.tolist() == np.argmax(logits, axis=1).tolist()
    assert out.tolist() == torch.argmax(torch.from_numpy(logits), dim=1).tolist()
    np.testing.assert_array_equal(logits, copy)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 60),
    v=st.integers(1, 50),
    ties=st.booleans(),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
)
def test_top_k_leaves_at_most_k_tokens(seed, k, v, ties, top_p):
    g = np.random.default_rng(seed)
    logits = (g.integers(0, 3, v) if ties else g.standard_normal(v)).astype(np.float32)
    p = GenerationParams(do_sample=True, top_k=k, top_p=top_p)
    probs = softmax(process_logits(logits, p, history=EMPTY, eos_token_id=None))
    kept = np.flatnonzero(probs)
    assert 1 <= len(kept) <= k
    # The kept tokens are among the best: none removed token scores higher than a kept one.
    removed = np.setdiff1d(np.arange(v), kept)
    if len(removed):
        assert logits[removed].max() <= logits[kept].min()
    # Draws only ever come from the kept set.
    rng = make_rng(seed)
    draws = {int(next_tokens(logits[None], [p], [rng], [EMPTY], eos_token_id=None)[0]) for _ in range(30)}
    assert draws <= set(kept.tolist())


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    top_p=st.floats(0.01, 1.0),
    top_k=st.sampled_from([0, 5, 40]),
    temperature=st.floats(0.2, 3.0),
    v=st.sampled_from([5, 60, 3000]),
)
def test_top_p_keeps_the_minimal_set(seed, top_p, top_k, temperature, v):
    g = np.random.default_rng(seed)
    logits = (g.standard_normal(v) * 2).astype(np.float32)
    base = GenerationParams(do_sample=True, top_k=top_k, temperature=temperature)
    full = softmax(process_logits(logits, base, history=EMPTY, eos_token_id=None))  # before top-p
    order = np.argsort(-full, kind="stable")
    cum = np.cumsum(full[order])
    assume(np.all(np.abs(cum - top_p) > 1e-6))

    kept = np.isfinite(process_logits(logits, base.replace(top_p=top_p), history=EMPTY, eos_token_id=None))
    n = int(kept.sum())
    assert set(np.flatnonzero(kept)) == set(order[:n].tolist())  # the most likely ones
    assert n == len(cum) or cum[n - 1] >= top_p  # enough mass ...
    assert n == 1 or cum[n - 2] < top_p  # ... and not one token more than needed


def test_seeded_draws_are_reproducible_and_seed_dependent():
    g = np.random.default_rng(5)
    logits = g.standard_normal((40, 1000)).astype(np.float32)
    p = GenerationParams(do_sample=True, top_k=0, temperature=1.5)

    def run(seed):
        rng = make_rng(seed)
        return [int(next_tokens(row[None], [p], [rng], [EMPTY], eos_token_id=None)[0]) for row in logits]

    assert run(123) == run(123)
    assert run(123) != run(124)
    assert run(None) != run(None)  # fresh entropy


def test_a_rows_draws_do_not_depend_on_the_batch():
    g = np.random.default_rng(9)
    steps = g.standard_normal((20, 3, 300)).astype(np.float32)
    p0 = GenerationParams(do_sample=True, seed=42, top_p=0.9, repetition_penalty=1.2)
    others = [
        [GenerationParams(), GenerationParams(do_sample=True, seed=1, top_k=0)],
        [GenerationParams(do_sample=True, seed=7, temperature=3), GenerationParams(repetition_penalty=2.0)],
    ]
    alone = []
    rng = make_rng(p0.seed)
    hist = [1, 2, 3]
    for step in steps:
        tok = next_tokens(step[:1], [p0], [rng], [np.array(hist)], eos_token_id=0)[0]
        alone.append(int(tok))
        hist.append(int(tok))
    for other in others:
        params = [p0, *other]
        rngs = [make_rng(q.seed) for q in params]
        hists = [[1, 2, 3], [4], [5, 6]]
        batched = []
        for step in steps:
            toks = next_tokens(step, params, rngs, [np.array(h) for h in hists], eos_token_id=0)
            for h, t in zip(hists, toks):
                h.append(int(t))
            batched.append(int(toks[0]))
        assert batched == alone
    assert len(set(alone)) > 5  # it really sampled


def test_draw_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1, 1e-12], np.float32))
    p = GenerationParams(do_sample=True, top_k=0)
    rng = make_rng(0)
    n = 20_000
    counts = np.bincount(
        [next_tokens(logits[None], [p], [rng], [EMPTY], eos_token_id=None)[0] for _ in range(n)],
        minlength=5,
    )
    np.testing.assert_allclose(counts / n, [0.5, 0.25, 0.15, 0.1, 0.0], atol=0.015)
    # With temperature 2 the distribution flattens to softmax(log p / 2).
    p2 = p.replace(temperature=2.0)
    counts = np.bincount(
        [next_tokens(logits[None], [p2], [rng], [EMPTY], eos_token_id=None)[0] for _ in range(n)],
        minlength=5,
    )
    np.testing.assert_allclose(counts / n, softmax(np.log([0.5, 0.25, 0.15, 0.1, 1e-12]) / 2), atol=0.015)


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(ignore_eos=True),
        GenerationParams(ignore_eos=True, repetition_penalty=0.5),
        GenerationParams(ignore_eos=True, do_sample=True, top_k=0),
        GenerationParams(ignore_eos=True, do_sample=True, top_k=3, top_p=0.5),
        GenerationParams(ignore_eos=True, do_sample=True, top_k=0, top_p=0.99, temperature=50),
    ],
)
def test_ignore_eos_never_yields_eos(params):
    eos = 3
    g = np.random.default_rng(0)
    logits = g.standard_normal((200, 10)).astype(np.float32)
    logits[:, eos] = 30.0  # eos is by far the most likely token
    rngs = [make_rng(i) for i in range(200)]
    toks = next_tokens(logits, [params] * 200, rngs, [np.array([eos, 1])] * 200, eos_token_id=eos)
    assert eos not in toks.tolist()
    assert np.isneginf(process_logits(logits[0], params, history=EMPTY, eos_token_id=eos)[eos])
    # ... and without ignore_eos, eos does come out.
    plain = params.replace(ignore_eos=False)
    toks = next_tokens(logits, [plain] * 200, rngs, [np.array([1])] * 200, eos_token_id=eos)
    assert eos in toks.tolist()


def test_tiny_temperature_is_greedy_and_finite():
    logits = np.array([1.0, 3.0, 2.9, -5.0], np.float32)
    p = GenerationParams(do_sample=True, top_k=0, temperature=1e-30)
    out = process_logits(logits, p, history=EMPTY, eos_token_id=None)
    assert not np.isnan(out).any() and out[1] == 0.0
    rng = make_rng(0)
    draws = {int(next_tokens(logits[None], [p], [rng], [EMPTY], eos_token_id=None)[0]) for _ in range(50)}
    assert draws == {1}


def test_temperature_zero_with_do_sample_is_greedy():
    logits = np.random.default_rng(1).standard_normal((8, 100)).astype(np.float32)
    p = GenerationParams(do_sample=True, temperature=0, top_k=0)
    toks = next_tokens(logits, [p] * 8, [make_rng(None) for _ in range(8)], [EMPTY] * 8, eos_token_id=None)
    assert toks.tolist() == logits.argmax(axis=1).tolist()


def test_batch_shape_checks():
    logits = np.zeros((2, 5), np.float32)
    p = GenerationParams()
    with pytest.raises(ValueError, match="one params, rng and history per row"):
        next_tokens(logits, [p], [make_rng(0)], [EMPTY], eos_token_id=None)
    with pytest.raises(ValueError, match="batch, vocab"):
        next_tokens(logits[0], [p], [make_rng(0)], [EMPTY], eos_token_id=None)
