"""Batch jobs sharing files: a second job on the same output is refused (flock), and jobs in
threads over one shared Generator give outputs identical to a lone run.

Every wait is bounded, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import gpt2onnx
from gpt2onnx.batch import BatchError, run_batch

from helpers.threads import in_threads

WAIT_S = 120


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


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
    in_threads(lambda i: run_batch(gen, tmp_path / "in.jsonl", tmp_path / f"out{i}.jsonl", batch_size=1 + i,
                                   progress=False), 4, wait_s=WAIT_S)
    ref = _rows(tmp_path / "ref.jsonl")
    for i in range(4):
        assert _rows(tmp_path / f"out{i}.jsonl") == ref
