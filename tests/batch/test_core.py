"""The in-memory batch core: order, error rows in place, grouping by length, one prepare per prompt."""

from __future__ import annotations

import itertools

import pytest

import gpt2onnx
from gpt2onnx.batch import iter_results
from gpt2onnx.batch.core import WINDOW_BATCHES
from gpt2onnx.batch.rows import NO_PROMPT
from gpt2onnx.errors import InvalidRequestError

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


def _prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + (i * 5) % 17))  # 1 to 17 words


def test_order_error_rows_and_same_text_as_one_by_one(gen, monkeypatch):
    requests = [
        {"id": "a", "prompt": _prompt(1)},
        None,  # a blank line: no row, the numbering goes on
        {"prompt": _prompt(2), "max_new_tokens": 3},
        {"id": "typo", "prompt": "x", "tempreature": 0.5},
        {"id": "no-prompt"},
        {"id": "q", "input_data": [_prompt(3), 7, ""], "params": {"max_new_tokens": 4}},
        {"id": "long", "prompt": "the " * 80},
        "not an object",
        {"id": "z", "prompt": _prompt(4), "do_sample": True, "seed": 5},
    ]
    prepared, kinds = [], set()
    real_prepare = gen.prepare
    monkeypatch.setattr(gen, "prepare", lambda p, params=None, **kw: prepared.append(p) or kinds.add(type(params))
                        or real_prepare(p, params, **kw))
    rows = list(iter_results(gen, requests, batch_size=3, params={"max_new_tokens": 6}))
    assert [(r["id"], r["line"], r["index"], "error" in r) for r in rows] == [
        ("a", 1, 0, False), ("line-3", 3, 0, False), ("typo", 4, 0, True), ("no-prompt", 5, 0, True),
        ("q:0", 6, 0, False), ("q:1", 6, 1, True), ("q:2", 6, 2, False), ("long", 7, 0, True), ("line-8", 8, 0, True),
        ("z", 9, 0, False)]
    err = {r["id"]: r["error"] for r in rows if "error" in r}
    assert err["typo"].startswith("unknown generation parameter 'tempreature'; did you mean 'temperature'?")
    assert err["no-prompt"] == NO_PROMPT
    assert err["q:1"] == "prompt must be a string, got int"
    assert "exceeds the context of 64 tokens" in err["long"]
    assert "must be a JSON object" in err["line-8"]
    # every prompt of a well-formed request with good parameters is prepared exactly once, its parameters
    # already one checked GenerationParams (the typo row is refused when its parameters are merged)
    assert sorted(map(repr, prepared)) == sorted(map(repr, [_prompt(1), _prompt(2), _prompt(3), 7, "",
                                                             "the " * 80, _prompt(4)]))
    assert kinds == {gpt2onnx.GenerationParams}
    want = {
        "a": gen.generate(_prompt(1), max_new_tokens=6)[0],
        "line-3": gen.generate(_prompt(2), max_new_tokens=3)[0],
        "q:0": gen.generate(_prompt(3), max_new_tokens=4)[0],
        "q:2": gen.generate("", max_new_tokens=4)[0],
        "z": gen.generate(_prompt(4), max_new_tokens=6, do_sample=True, seed=5)[0],
    }
    for r in rows:
        if r["id"] in want:
            w = want[r["id"]]
            assert (r["text"], r["prompt_tokens"], r["generated_tokens"], r["finish_reason"]) == (
                w.text, w.prompt_tokens, w.generated_tokens, w.finish_reason), r["id"]
            assert r["seconds"] >= 0


def test_batches_group_prompts_of_similar_length(gen, monkeypatch):
    n, size = 64, 4
    requests = [{"id": i, "prompt": _prompt(i), "max_new_tokens": 2, "ignore_eos": True} for i in range(n)]
    batches, real = [], gen.generate_batch

    def spy(reqs, **kw):
        batches.append([len(r.input_ids) for r in reqs])  # prepared Requests, not raw prompts
        return real(reqs, **kw)

    monkeypatch.setattr(gen, "generate_batch", spy)
    rows = list(iter_results(gen, requests, batch_size=size, batching="static"))
    assert [r["id"] for r in rows] == list(range(n))
    assert sum(map(len, batches)) == n and max(map(len, batches)) == size
    lengths = [len(gen.tokenizer.encode(_prompt(i)).ids) for i in range(n)]
    padding = sum(max(b) * len(b) - sum(b) for b in batches)
    naive = sum(max(c) * len(c) - sum(c) for c in (lengths[i:i + size] for i in range(0, n, size)))
    assert padding < naive / 2


def test_reads_ahead_a_bounded_window(gen):
    """An endless input: the first rows come out after reading one window, not the whole input."""
    read = [0]

    def endless():
        for i in itertools.count():
            read[0] += 1
            yield {"prompt": _prompt(i), "max_new_tokens": 1}

    first = list(itertools.islice(iter_results(gen, endless(), batch_size=2), 3))
    assert [r["line"] for r in first] == [1, 2, 3]
    assert read[0] <= 2 * WINDOW_BATCHES * 2  # one window, topped up as rows leave it


def test_bad_job_settings_fail_at_the_call(gen):
    with pytest.raises(gpt2onnx.InvalidRequestError, match="batch_size"):
        iter_results(gen, [], batch_size=0)
    with pytest.raises(gpt2onnx.InvalidRequestError, match="did you mean 'temperature'"):
        iter_results(gen, [], params={"tempreature": 1})
    assert list(iter_results(gen, [])) == []


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_both_batchings_give_every_row_its_one_by_one_output(gen, batching):
    """Mixed prompt lengths and max_new_tokens, greedy and seeded: each row equals its alone run."""
    requests = [{"id": i, "prompt": _prompt(i) * (1 + i % 3), "max_new_tokens": 1 + (7 * i) % 13, "ignore_eos": True,
                 "do_sample": bool(i % 2), "temperature": 0.8, "seed": i} for i in range(23)]
    rows = list(iter_results(gen, requests, batch_size=5, batching=batching))
    assert [r["id"] for r in rows] == list(range(23))
    for req, row in zip(requests, rows):
        alone = gen.generate(req["prompt"], {k: v for k, v in req.items() if k not in ("id", "prompt")})[0]
        assert (row["text"], row["generated_tokens"], row["finish_reason"]) == \
            (alone.text, alone.generated_tokens, alone.finish_reason), req


def test_unknown_batching_is_refused(gen):
    with pytest.raises(InvalidRequestError, match="batching must be one of continuous, static"):
        iter_results(gen, [], batching="dynamic")
