"""Concurrency: one Generator under 8 threads of mixed calls, processes loading one folder
at once, the scoring entry's first requests racing init(), and batch jobs sharing files.

Every concurrent result must equal the sequential one; every wait is bounded, so a
deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import gpt2onnx
from gpt2onnx import GenerationParams, runtime
from gpt2onnx.integrations import azureml
from gpt2onnx.batch import BatchError, run_batch
from gpt2onnx.errors import InvalidRequestError

from conftest import deployment_root

WAIT_S = 120


def _in_threads(fn, n: int) -> None:
    """Run fn(0) ... fn(n - 1) in n threads; fail if one hangs or raises."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors
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

    _in_threads(worker, 8)
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


def test_first_requests_race_init_and_load_once(tiny_int8, tmp_path, monkeypatch):
    """Eight scoring threads arrive before init(): the model is loaded exactly once."""
    monkeypatch.setenv("AZUREML_MODEL_DIR", deployment_root(tmp_path, tiny_int8))
    monkeypatch.setenv("GPT2ONNX_THREADS", "1")
    monkeypatch.setattr(azureml, "_generator", None)
    loads, real_load = [], runtime.load

    def counting_load(*a, **k):
        loads.append(a)
        time.sleep(0.2)  # widen the race
        return real_load(*a, **k)

    monkeypatch.setattr(runtime, "load", counting_load)
    body = json.dumps({"input_data": PROMPTS[:3], "params": {"max_new_tokens": 6, "do_sample": True, "seed": 2}})
    results = []
    barrier = threading.Barrier(8)

    def worker(_):
        barrier.wait(WAIT_S)
        results.append(azureml.run(body))

    _in_threads(worker, 8)
    assert len(loads) == 1
    assert len(results) == 8 and all(r == results[0] for r in results) and len(results[0]) == 3


# -- batch jobs ------------------------------------------------------------------------------

HELD_JOB = r"""
import os, sys, time
from gpt2onnx import batch, cli
real, calls = batch.core.complete, [0]
def held(row, result, seconds):  # after 8 rows, wait (bounded) until the test creates RELEASE
    calls[0] += 1
    deadline = time.monotonic() + 120
    while calls[0] == 9 and not os.path.exists(os.environ["RELEASE"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return real(row, result, seconds)
batch.core.complete = held
sys.exit(cli.main(sys.argv[1:]))
"""


def _input(path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"item {i} of the list", "max_new_tokens": 4 + i % 7}) + "\n")


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in f]


def test_second_job_on_the_same_output_is_refused(gen, tiny_int8, tmp_path):
    """Without the lock, both jobs appended every row not yet done (each row twice), and a late one could cut the
    first one's half-written row as torn."""
    _input(tmp_path / "in.jsonl", 120)
    run_batch(gen, tmp_path / "in.jsonl", tmp_path / "ref.jsonl", progress=False)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-c", HELD_JOB, "batch", tiny_int8, str(tmp_path / "in.jsonl"), str(out), "--threads", "1",
           "--no-progress", "--batch-size", "4"]
    env = dict(os.environ, RELEASE=str(tmp_path / "release"))
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (out.exists() and out.stat().st_size > 0):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(BatchError, match="is being written by another running batch job; wait for it"):
            run_batch(gen, tmp_path / "in.jsonl", out, progress=False)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert "being written by another running batch job" in second.stderr
        assert first.poll() is None, "the first job should still be running"
        (tmp_path / "release").touch()
        stdout, stderr = first.communicate(timeout=WAIT_S)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    assert _rows(out) == _rows(tmp_path / "ref.jsonl")
    s = run_batch(gen, tmp_path / "in.jsonl", out, progress=False)  # the lock is released at the end
    assert (s.ok, s.skipped_already_done) == (0, 120)


def test_jobs_in_threads_with_one_generator(gen, tmp_path):
    """Several outputs from one input at once, over one shared Generator: identical to a lone run."""
    _input(tmp_path / "in.jsonl", 60)
    run_batch(gen, tmp_path / "in.jsonl", tmp_path / "ref.jsonl", batch_size=5, progress=False)
    _in_threads(lambda i: run_batch(gen, tmp_path / "in.jsonl", tmp_path / f"out{i}.jsonl", batch_size=1 + i,
                                    progress=False), 4)
    ref = _rows(tmp_path / "ref.jsonl")
    for i in range(4):
        assert _rows(tmp_path / f"out{i}.jsonl") == ref
