"""Concurrency: one Generator under 8 threads of mixed calls, processes loading one folder at once.

Every concurrent result must equal the sequential one; every wait is bounded, so a
deadlock fails the test instead of hanging it. The scoring entry's first requests racing
init() are in tests/integrations/test_azureml.py, batch jobs sharing files in
tests/batch/test_job_concurrency.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import gpt2onnx
from gpt2onnx import GenerationParams
from gpt2onnx.errors import InvalidRequestError

from helpers.threads import in_threads

WAIT_S = 120
PROMPTS = ["The tower is", "In 1998 the", "", "a b c d e f g h", "\U0001f642 unicode \u00e9t\u00e9"]


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


def _calls(gen):
    """(name, zero-argument call) pairs of every kind; each returns something comparable."""
    greedy = GenerationParams(max_new_tokens=10)
    sampled = GenerationParams(max_new_tokens=10, do_sample=True, top_p=0.9, top_k=20, temperature=0.9, seed=7,
                               repetition_penalty=1.1)
    stopped = GenerationParams(max_new_tokens=20, ignore_eos=True, stop=("e", "th"), return_full_text=False)
    mixed = [(p, [greedy, sampled, stopped][i % 3]) for i, p in enumerate(PROMPTS)]
    return [
        ("greedy", lambda: [(r.text, r.token_ids) for r in gen.generate(PROMPTS, greedy)]),
        ("sampled", lambda: [(r.text, r.token_ids) for r in gen.generate(PROMPTS, sampled)]),
        ("stop", lambda: [(r.text, r.finish_reason) for r in gen.generate(PROMPTS, stopped)]),
        ("stream", lambda: [(s.token_id, s.text, s.finish_reason) for s in gen.generate_tokens(PROMPTS[3], sampled)]),
        ("batch-mixed", lambda: [(r.text, r.token_ids) for r in gen.generate_batch(mixed)]),
        ("stream-batch", lambda: sorted((i, s.token_id, s.text) for i, s in gen.stream_batch(mixed))),
        ("bad-params", lambda: _error(lambda: gen.generate("a", top_p=3))),
        ("too-long", lambda: _error(lambda: gen.generate("the " * 100, max_new_tokens=5))),
    ]


def _error(call) -> str:
    try:
        call()
    except InvalidRequestError as e:
        return str(e)
    raise AssertionError("no error")


def test_one_generator_eight_threads_mixed_calls(gen):
    calls = _calls(gen)
    expected = {name: call() for name, call in calls}  # sequential reference
    got: dict[int, list] = {}
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait(WAIT_S)
        order = calls[i:] + calls[:i]  # each thread starts with a different kind of call
        got[i] = [(name, call()) for _ in range(3) for name, call in order]

    in_threads(worker, 8, wait_s=WAIT_S)
    assert len(got) == 8
    for results in got.values():
        assert len(results) == 3 * len(calls)
        for name, value in results:
            assert value == expected[name], name


PROCESS = r"""
import json, sys
import gpt2onnx
g = gpt2onnx.load(sys.argv[1], threads=1)
prompts = json.loads(sys.argv[2])
out = {"greedy": [r.text for r in g.generate(prompts, max_new_tokens=12)],
       "sampled": [r.text for r in g.generate(prompts, max_new_tokens=12, do_sample=True, seed=5, top_k=0)]}
print(json.dumps(out))
"""


def test_processes_loading_one_folder_at_once(gen, tiny_int8):
    """Four processes verify the hashes of and load the same folder at the same moment."""
    expected = {"greedy": [r.text for r in gen.generate(PROMPTS, max_new_tokens=12)],
                "sampled": [r.text for r in gen.generate(PROMPTS, max_new_tokens=12, do_sample=True, seed=5,
                                                        top_k=0)]}
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, tiny_int8, json.dumps(PROMPTS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        outs = [p.communicate(timeout=WAIT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out) == expected
