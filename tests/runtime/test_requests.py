"""Bad input through the Python API: `generate`, `generate_tokens`, request shapes, `load` arguments.

The table of requests is tests/helpers/bad_requests.py; the CLI, run_batch and Azure ML run it too.
Each bad request is one `InvalidRequestError` line, raised at the call (streaming included),
each good one generates. Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import pytest

import gpt2onnx
from gpt2onnx import GenerationParams
from gpt2onnx.errors import ArtifactError, InvalidRequestError

from helpers.bad_requests import CASES, IDS, MB, good_results, one_line


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


@pytest.fixture(scope="module")
def expected(gen):
    return good_results(gen)


@pytest.mark.parametrize("cid,prompt,params,err", CASES, ids=IDS)
def test_api(gen, expected, cid, prompt, params, err):
    if err is not None:
        with pytest.raises(InvalidRequestError, match=err) as e:
            gen.generate(prompt, **params)
        one_line(str(e.value))
        with pytest.raises(InvalidRequestError, match=err):  # streaming refuses it at the call, not at next()
            gen.generate_tokens(prompt, **params)
        return
    r = expected[cid]
    assert 1 <= r.generated_tokens <= params["max_new_tokens"]
    if cid == "empty-prompt":  # starts from <|endoftext|>
        assert r.prompt_tokens == 1
    if cid == "temperature-0-sampling":  # temperature 0 is greedy, even with do_sample
        assert r.token_ids == gen.generate(prompt, max_new_tokens=5)[0].token_ids
    if cid == "truncation":  # the last 64 - 5 tokens are kept
        assert r.prompt_tokens == 64 - 5
    steps = list(gen.generate_tokens(prompt, **params))
    assert tuple(s.token_id for s in steps) == r.token_ids


def test_api_request_shapes(gen, tiny_int8):
    p = GenerationParams(max_new_tokens=2)
    for bad in (["a"], [("a",)], [("a", p, 1)], None, "a", [["a", p]]):
        with pytest.raises(InvalidRequestError, match=r"or of \(prompt, GenerationParams\) pairs"):
            gen.generate_batch(bad)
        with pytest.raises(InvalidRequestError, match=r"or of \(prompt, GenerationParams\) pairs"):
            gen.stream_batch(bad)  # at the call, not at the first next()
    with pytest.raises(InvalidRequestError, match="request 0: params must be a GenerationParams"):
        gen.stream_batch([("a", {"max_new_tokens": 2})])
    with pytest.raises(InvalidRequestError, match="params must be a GenerationParams or a dict, got str"):
        gen.generate("a", "fast")
    for folder in (None, 3, ["x"]):
        with pytest.raises(ArtifactError, match=r"a model folder must be a path \(str or os.PathLike\)"):
            gpt2onnx.load(folder)
    for threads in (0, -1, 1.5, "2", True):
        with pytest.raises(InvalidRequestError, match="threads must be a positive integer"):
            gpt2onnx.load(tiny_int8, threads=threads)


def test_megabyte_prompt_is_refused_or_truncated(gen):
    """A 1 MB prompt is tokenized once, then one clear error, or its last tokens with truncation=True.
    (The CLI and run_batch cases are in tests/cli/test_cli_requests.py and tests/batch/test_job_inputs.py.)"""
    prompt = "the sky is blue " * (MB // 16)
    with pytest.raises(InvalidRequestError, match=r"prompt 0 has \d{6} tokens.*exceeds the context of 64"):
        gen.generate(prompt, max_new_tokens=5)
    r = gen.generate(prompt, max_new_tokens=5, truncation=True, ignore_eos=True)[0]
    assert r.prompt_tokens == 59 and r.generated_tokens == 5
