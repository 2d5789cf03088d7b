"""Property tests (hypothesis) over the real tiny model: random valid `GenerationParams`.

They never crash generation; `max_new_tokens` is respected; the continuation never
contains a stop string and is exactly the unstopped continuation cut before the first
stop string; streaming gives the same. (Random request bodies for `azureml.run` are in
tests/integrations/test_azureml_requests.py, random JSONL lines for `run_batch` in
tests/batch/test_job_inputs.py.)
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2onnx
from gpt2onnx import GenerationParams
from gpt2onnx.errors import InvalidRequestError

from helpers.random_inputs import SCALE, SETTINGS

CONTEXT = 64  # the tiny model's


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
