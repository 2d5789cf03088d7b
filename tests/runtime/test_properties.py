"""Property tests (hypothesis) over the real tiny model.

- Random valid `GenerationParams` never crash generation; `max_new_tokens` is respected;
  the continuation never contains a stop string and is exactly the unstopped
  continuation cut before the first stop string; streaming gives the same.
- Random bytes, text and JSON as a request body never make `azureml.run` raise (the
  server would answer 500): the answer is a list of strings or a 400 with one line.
- Random JSONL lines never crash `run_batch`: every non-blank line gives its rows (ok or
  error), keyed (line, index), once each, in order.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpt2onnx
from gpt2onnx import GenerationParams
from gpt2onnx.integrations import azureml
from gpt2onnx.batch import MAX_PROMPTS_PER_LINE, run_batch
from gpt2onnx.errors import InvalidRequestError
from gpt2onnx.params import FIELDS

CONTEXT = 64  # the tiny model's
# Fixed examples by default, so a failure reproduces; HYPOTHESIS_EXPLORE=1 draws new ones, ten times as many.
EXPLORE = bool(os.environ.get("HYPOTHESIS_EXPLORE"))
SCALE = 10 if EXPLORE else 1
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=not EXPLORE)


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


WORDS = st.sampled_from(["the", "of", "tower", "Valkyria", "1998", "\u00e9t\u00e9", "\u4e2d\u6587", "\U0001f642",
                         "\n", "  ", "@-@", "<|endoftext|>", "\x00", "\u200b"])
PROMPTS = st.one_of(st.lists(WORDS, max_size=40).map(" ".join), st.text(max_size=60))
PARAMS = st.fixed_dictionaries({
    "max_new_tokens": st.integers(1, 24),
    "do_sample": st.booleans(),
    "temperature": st.one_of(st.sampled_from([0.0, 1e-6, 0.7, 1.0, 100.0]), st.floats(0, 100)),
    "top_k": st.one_of(st.sampled_from([0, 1, 2, 50, 999, 1000, 10**6]), st.integers(0, 2000)),
    "top_p": st.one_of(st.sampled_from([1e-9, 0.5, 0.9, 1.0]), st.floats(0, 1, exclude_min=True)),
    "repetition_penalty": st.one_of(st.sampled_from([1.0, 1.3, 0.5, 100.0]), st.floats(0, 100, exclude_min=True)),
    "seed": st.integers(0, 2**63 - 1),
    "ignore_eos": st.booleans(),
    "truncation": st.booleans(),
})


@settings(max_examples=200 * SCALE, **SETTINGS)
@given(data=st.data())
def test_random_params_respect_max_new_tokens_and_stop_strings(gen, data):
    prompt = data.draw(PROMPTS, label="prompt")
    params = GenerationParams(**data.draw(PARAMS, label="params"), return_full_text=False)
    n_prompt = len(gen.tokenizer.encode(prompt).ids) if prompt else 1
    try:
        full = gen.generate(prompt, params)[0]
    except InvalidRequestError as e:  # the only refusal a valid request can get
        assert not params.truncation and n_prompt > CONTEXT - params.max_new_tokens, str(e)
        return
    assert 1 <= full.generated_tokens <= params.max_new_tokens
    assert full.prompt_tokens == min(n_prompt, CONTEXT - params.max_new_tokens)
    assert (full.finish_reason == "length") == (full.generated_tokens == params.max_new_tokens
                                                and full.token_ids[-1] != gen.eos_token_id or params.ignore_eos)
    if params.ignore_eos:
        assert gen.eos_token_id not in full.token_ids and full.generated_tokens == params.max_new_tokens
    elif full.finish_reason == "eos":
        assert full.token_ids[-1] == gen.eos_token_id and gen.eos_token_id not in full.token_ids[:-1]

    # stop strings: pieces of the unstopped continuation (so they do occur), or anything
    text = full.text
    piece = st.integers(0, max(len(text) - 1, 0)).flatmap(
        lambda i: st.integers(i + 1, min(len(text), i + 6)).map(lambda j: text[i:j])) if text else st.nothing()
    stop = data.draw(st.lists(st.one_of(piece, st.text(min_size=1, max_size=3)), min_size=1, max_size=4),
                     label="stop")
    stopped = gen.generate(prompt, params.replace(stop=stop))[0]
    assert not any(s in stopped.text for s in stop)
    cuts = [(i + len(s), i) for s in stop if (i := text.find(s)) != -1]
    assert stopped.text == (text[: min(cuts)[1]] if cuts else text)  # cut before the stop completed first
    if cuts:
        assert stopped.finish_reason == "stop" or stopped.generated_tokens == full.generated_tokens
    assert stopped.token_ids == full.token_ids[: stopped.generated_tokens]  # the same draws until the stop
    steps = list(gen.generate_tokens(prompt, params.replace(stop=stop)))
    assert "".join(s.text for s in steps) == stopped.text
    assert tuple(s.token_id for s in steps) == stopped.token_ids
    assert steps[-1].finish_reason == stopped.finish_reason and all(s.finish_reason is None for s in steps[:-1])
    with_prompt = gen.generate(prompt, params.replace(stop=stop, return_full_text=True))[0]
    assert with_prompt.text == prompt + stopped.text


# -- azureml.run: never a 500 -------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(st.characters(), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
SMALL_INTS = st.integers(-3, 70)
PARAM_VALUES = st.one_of(JSON, SMALL_INTS, st.floats(-1, 2), st.sampled_from([0, 1, 63, 64, "a", [], "\ud800"]))
REQUESTS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"input_data": st.one_of(st.lists(st.one_of(st.text(max_size=30), JSON), max_size=5), JSON)},
        optional={"params": st.one_of(st.dictionaries(st.sampled_from(FIELDS + ("bogus", "max_tokens")),
                                                      PARAM_VALUES, max_size=5), JSON),
                  "extra": JSON}),
)
LONE = st.text(st.characters(exclude_categories=()), max_size=40)  # with lone surrogates


def _check_answer(out, raw) -> None:
    if isinstance(out, list):
        assert all(isinstance(t, str) for t in out), raw
        return
    assert getattr(out, "status_code", None) == 400, (raw, out)
    body = json.loads(out.get_data())
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"], body


@pytest.fixture
def scoring(gen, monkeypatch):
    monkeypatch.setattr(azureml, "_generator", gen)
    return azureml


@settings(max_examples=500 * SCALE, **SETTINGS)
@given(raw=st.one_of(st.binary(max_size=120), LONE))
def test_azureml_run_random_bytes_and_text(scoring, raw):
    _check_answer(scoring.run(raw), raw)


@settings(max_examples=500 * SCALE, **SETTINGS)
@given(request=REQUESTS, as_text=st.booleans())
def test_azureml_run_random_json(scoring, request, as_text):
    raw = json.dumps(request) if as_text else request
    out = scoring.run(raw)
    _check_answer(out, raw)
    if isinstance(out, list):
        assert isinstance(request, dict) and len(out) == len(request["input_data"])


# -- run_batch: every line accounted for --------------------------------------------------------

LINE_JSON = st.one_of(
    JSON,
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=30), JSON)},
                          optional={"id": JSON, "max_new_tokens": st.integers(-1, 70), "top_p": PARAM_VALUES,
                                    "stop": PARAM_VALUES, "bogus": JSON, "truncation": st.booleans()}),
    st.fixed_dictionaries({"input_data": st.one_of(st.lists(st.one_of(st.text(max_size=20), JSON), max_size=4),
                                                   JSON)},
                          optional={"id": JSON, "params": st.one_of(
                              st.dictionaries(st.sampled_from(FIELDS + ("bogus",)), PARAM_VALUES, max_size=3), JSON),
                              "prompt": JSON}),
)
LINES = st.lists(st.one_of(LINE_JSON.map(lambda v: json.dumps(v).encode()),
                           st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                           st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf", b"{", b"\xff"])),
                 min_size=1, max_size=12)


def _expected_rows(raw: bytes) -> int:
    """How many output rows one input line must give (the batch module's contract, restated)."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        return 0
    try:
        obj = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
    except (ValueError, RecursionError):
        return 1
    if not isinstance(obj, dict) or "input_data" not in obj or isinstance(obj.get("id"), (dict, list)):
        return 1
    if set(obj) - {"id", "input_data", "params"}:
        return 1
    prompts = obj["input_data"]
    return len(prompts) if isinstance(prompts, list) and 0 < len(prompts) <= MAX_PROMPTS_PER_LINE else 1


@settings(max_examples=150 * SCALE, **SETTINGS)
@given(lines=LINES, crlf=st.booleans(), final_newline=st.booleans())
def test_run_batch_random_lines(gen, lines, crlf, final_newline):
    eol = b"\r\n" if crlf else b"\n"
    data = eol.join(lines) + (eol if final_newline else b"")
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "in.jsonl"), os.path.join(d, "out.jsonl")
        with open(src, "wb") as f:
            f.write(data)
        s = run_batch(gen, src, out, batch_size=3, params={"max_new_tokens": 3}, progress=False)
        with open(out, "rb") as f:
            rows = [json.loads(x) for x in f.read().decode("utf-8").splitlines()]
    physical = data.split(b"\n")
    if physical and physical[-1] == b"":
        physical.pop()
    expected = {n: _expected_rows(raw) for n, raw in enumerate(physical, start=1)}
    assert s.rows == len(rows) == sum(expected.values()) and s.ok + s.errors == s.rows
    keys = [(r["line"], r["index"]) for r in rows]
    assert keys == sorted(set(keys))  # once each, in input order
    assert keys == [(n, k) for n, count in expected.items() for k in range(count)]
    for r in rows:
        if "error" in r:
            assert set(r) == {"id", "line", "index", "error"} and r["error"] and "\n" not in r["error"]
        else:
            assert {"text", "prompt_tokens", "generated_tokens", "finish_reason"} <= set(r)
            assert 1 <= r["generated_tokens"] <= CONTEXT and isinstance(r["text"], str)
            assert not (isinstance(r["seconds"], float) and math.isnan(r["seconds"]))
