"""Bad (and borderline good) requests: one table that every surface runs through.

The Python API (tests/runtime/test_requests.py), `gpt2onnx generate`
(tests/cli/test_cli_requests.py), run_batch (tests/batch/test_job_inputs.py) and Azure ML
run() in process and over HTTP (tests/integrations/test_azureml_requests.py). Each bad
request must give one line that names the problem (an `InvalidRequestError`, exit code 1,
an error row, HTTP 400), each good one the same text everywhere. Decisions are in
docs/reliability.md.
"""

from __future__ import annotations

import json

LONG = "the " * 100  # > 64 tokens: the tiny model's whole context
MB = 1 << 20

# (id, prompt, params, error regex or None when the request must succeed)
CASES = [
    ("empty-prompt", "", {"max_new_tokens": 3}, None),
    ("temperature-0-sampling", "the sky", {"max_new_tokens": 5, "do_sample": True, "temperature": 0, "seed": 3},
     None),
    ("truncation", LONG, {"max_new_tokens": 5, "truncation": True}, None),
    ("too-long", LONG, {"max_new_tokens": 5}, r"prompt .*has \d+ tokens.*exceeds the context of 64 tokens.*truncation"),
    ("max_new_tokens-0", "a", {"max_new_tokens": 0}, r"max_new_tokens must be an integer in \[1, 100_000\], got 0"),
    ("max_new_tokens-negative", "a", {"max_new_tokens": -3}, r"max_new_tokens must be an integer .*got -3"),
    ("max_new_tokens-huge", "a", {"max_new_tokens": 10**12}, r"max_new_tokens must be an integer .*got 1000000000000"),
    ("max_new_tokens-no-room", "a", {"max_new_tokens": 64},
     r"max_new_tokens 64 leaves no room .*context of 64 tokens; use max_new_tokens <= 63"),
    ("max_new_tokens-float", "a", {"max_new_tokens": 2.5}, r"max_new_tokens must be an integer .*got 2.5"),
    ("max_new_tokens-string", "a", {"max_new_tokens": "5"}, r"max_new_tokens must be an integer .*got '5'"),
    ("temperature-negative", "a", {"temperature": -0.5, "do_sample": True},
     r"temperature must be in \[0, 100\] \(0 = greedy\), got -0.5"),
    ("temperature-nan", "a", {"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
    ("temperature-inf", "a", {"temperature": float("inf"), "do_sample": True},
     r"temperature must be a finite number, got inf"),
    ("top_p-0", "a", {"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ("top_p-above-1", "a", {"top_p": 1.01}, r"top_p must be in \(0, 1\], got 1.01"),
    ("top_k-negative", "a", {"top_k": -1}, r"top_k must be an integer >= 0 \(0 disables\), got -1"),
    ("repetition_penalty-0", "a", {"repetition_penalty": 0}, r"repetition_penalty must be in \(0, 100\]"),
    ("repetition_penalty-negative", "a", {"repetition_penalty": -1.5}, r"repetition_penalty must be in \(0, 100\]"),
    ("unknown-name", "a", {"max_tokens": 5},
     r"unknown generation parameter 'max_tokens'; did you mean 'max_new_tokens'\?"),
    ("do_sample-string", "a", {"do_sample": "yes"}, r"do_sample must be true or false, got 'yes'"),
    ("stop-lone-surrogate", "a", {"stop": ["\ud800"]}, r"stop must be valid Unicode text"),
    ("prompt-lone-surrogate", "ok \udcff", {}, r"not valid Unicode \(lone surrogate"),
    ("prompt-not-a-string", 42, {}, r"must be a string"),
]
IDS = [c[0] for c in CASES]
NOT_ON_CLI = {"prompt-not-a-string"}  # argv is always text


def one_line(message: str) -> str:
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
    return message


def good_results(gen) -> dict:
    """The API's result of every good case: the reference for the other surfaces."""
    return {cid: gen.generate(prompt, **params)[0] for cid, prompt, params, err in CASES if err is None}


def jsonl_line(cid, prompt, params) -> str:
    """A request as a batch input line."""
    return json.dumps({"id": cid, "prompt": prompt, **params})  # ASCII: lone surrogates stay \ud800 escapes
