"""Batch jobs over worker processes (``workers=2``): the same output as one process, resume, dead workers.

The parent is the only writer, so what `test_job_crashes.py` shows for one process holds
here too; these tests check what is new: the rows come back in input order, a small job
keeps every worker busy, finished rows reach the output while a later row is still
running, a SIGKILL of the parent leaves no worker behind and resumes,
a SIGKILL of a worker is a one-line error that keeps the rows written, and bad counts are
refused in one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import gpt2onnx
from gpt2onnx import cli
from gpt2onnx.batch import run_batch
from gpt2onnx.errors import InvalidRequestError

from helpers.procs import reap, sigkill

from test_job_crashes import make_input, read_rows

WAIT_S = 60
SECONDS = re.compile(rb', "seconds": [0-9.e-]+')
# Loaded by every interpreter the job starts (PYTHONPATH): with HOOK=slow each generated row takes
# 5 ms more in the workers, so a kill lands inside the job; with HOOK=stuck the row of input line
# STUCK_LINE never finishes (its worker sleeps), while the other worker goes on.
SLOW_SITE = """
import os
if os.environ.get("HOOK") in ("slow", "stuck"):
    import time
    from gpt2onnx.batch import core
    real = core.complete
    def complete(row, result, seconds):
        if os.environ["HOOK"] == "slow":
            time.sleep(0.005)
        elif row.line == int(os.environ["STUCK_LINE"]):
            time.sleep(600)
        return real(row, result, seconds)
    core.complete = complete
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_int8):
    """An input (greedy and seeded sampling rows, input_data lines, bad lines in the middle) and its
    one-process output."""
    d = tmp_path_factory.mktemp("workers-job")
    n_rows = make_input(d / "in.jsonl", 120, seed=3)
    run_batch(gpt2onnx.load(tiny_int8, threads=1), d / "in.jsonl", d / "ref.jsonl", batch_size=2, progress=False)
    assert len(read_rows(d / "ref.jsonl")) == n_rows
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(SLOW_SITE)
    return d


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_two_workers_write_the_same_bytes_as_one_process(job, tiny_int8, tmp_path, capsys, batching):
    """Via the CLI flag: rows handed out one by one to 2 workers come back in input order, error rows included."""
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", tiny_int8, str(job / "in.jsonl"), str(out), "--batch-size", "2", "--workers", "2",
                     "--no-progress", "--batching", batching]) == 0
    assert " ok, " in capsys.readouterr().out
    ref = SECONDS.sub(b"", (job / "ref.jsonl").read_bytes())
    assert SECONDS.sub(b"", out.read_bytes()) == ref
    assert b'"error"' in ref and ref.count(b"\n") > 16 * 2  # bad lines in the middle, many rows per worker
    state = json.loads((tmp_path / "out.jsonl.state").read_text())
    assert state["input_sha256"] and "workers" not in state  # a job may resume with another worker count


def test_a_small_job_keeps_every_worker_busy(tiny_int8, tmp_path):
    """12 rows on 2 workers: 6 each (before, a job of up to 8 batches was one task on one worker), and the same
    rows as one process."""
    from gpt2onnx.batch.pool import Workers, iter_pool
    from gpt2onnx.batch.rows import read_lines
    from gpt2onnx.params import DEFAULTS

    make_input(tmp_path / "in.jsonl", 12, seed=5)
    pool = Workers(tiny_int8, 2, threads=1, batch_size=8, batching="continuous")
    rows = [r for ready in iter_pool(pool, read_lines(str(tmp_path / "in.jsonl"), DEFAULTS)) for r in ready]
    generated = [r.worker for r in rows if "error" not in r.out]
    assert len(generated) >= 12 and sorted(set(generated)) == [0, 1], generated
    assert abs(generated.count(0) - generated.count(1)) <= 1, generated
    run_batch(gpt2onnx.load(tiny_int8, threads=1), tmp_path / "in.jsonl", tmp_path / "ref.jsonl", batch_size=8,
              progress=False)
    strip = lambda out: {k: v for k, v in out.items() if k != "seconds"}  # noqa: E731
    assert [strip(r.out) for r in rows] == read_rows(tmp_path / "ref.jsonl")


def test_finished_rows_reach_the_output_while_a_later_row_runs(job, tiny_int8, tmp_path):
    """The README's promise with workers: every finished row that can be written in input order is written at
    once. One row never finishes; the rows before it are all in the output (less the few its own worker held
    when it stopped), not only those of finished 16-row chunks as before; killed there, the job resumes."""
    ref = read_rows(job / "ref.jsonl")
    per_line = {}
    for r in ref:
        per_line[r["line"]] = per_line.get(r["line"], 0) + 1
    stuck = next(i for i in range(44, 48) if "error" not in ref[i] and per_line[ref[i]["line"]] == 1)
    out = tmp_path / "out.jsonl"
    proc = _start(job, tiny_int8, out, hook="stuck", STUCK_LINE=str(ref[stuck]["line"]))
    try:
        workers = _wait_for_rows(proc, out, stuck - 4)  # 2 x batch size: what the stuck worker holds at most
        time.sleep(1)  # nothing after the stuck row may follow
        assert read_rows(out) == ref[:len(read_rows(out))] and stuck - 4 <= len(read_rows(out)) <= stuck
        sigkill(proc, WAIT_S)
    finally:
        reap(proc, WAIT_S)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.05)
    _finish(job, tiny_int8, out)


def test_workers_need_a_folder_and_a_sensible_count(job, tiny_int8, tmp_path, capsys):
    gen = gpt2onnx.load(tiny_int8, threads=1)
    with pytest.raises(InvalidRequestError, match="needs the model folder.*pass its folder"):
        run_batch(gen, job / "in.jsonl", tmp_path / "o.jsonl", workers=2)
    for bad in ("0", "-1", "4096"):
        rc = cli.main(["batch", tiny_int8, str(job / "in.jsonl"), str(tmp_path / "o.jsonl"), "--workers", bad])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "workers must be an integer from 1 to" in err, err
    for bad in (True, 1.5, "2"):
        with pytest.raises(InvalidRequestError, match="workers must be"):
            run_batch(tiny_int8, job / "in.jsonl", tmp_path / "o.jsonl", workers=bad)
    assert not (tmp_path / "o.jsonl").exists()  # refused before the output is touched


def _children(pid: int) -> list[int]:
    """Worker processes (spawned interpreters) whose parent is `pid`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _start(job, model_dir, out, hook: str = "slow", **env_vars) -> subprocess.Popen:
    env = dict(os.environ, HOOK=hook, PYTHONPATH=os.pathsep.join([str(job / "site"), *sys.path]), **env_vars)
    return subprocess.Popen([sys.executable, "-m", "gpt2onnx", "batch", model_dir, str(job / "in.jsonl"), str(out),
                             "--batch-size", "2", "--workers", "2", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(proc, out, rows: int) -> list[int]:
    """Wait until OUTPUT holds `rows` rows and both workers run; returns the workers' pids."""
    deadline = time.monotonic() + WAIT_S
    while True:
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) too early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the job never got there"
        workers = _children(proc.pid)
        if len(workers) == 2 and out.exists() and out.read_bytes().count(b"\n") >= rows:
            return workers
        time.sleep(0.005)


def _finish(job, model_dir, out) -> None:
    """Rerun to the end (no slow hook): each row once, the same bytes as one uninterrupted process."""
    done = out.read_bytes().count(b"\n")
    r = subprocess.run([sys.executable, "-m", "gpt2onnx", "batch", model_dir, str(job / "in.jsonl"), str(out),
                        "--batch-size", "2", "--workers", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=WAIT_S * 2)
    assert r.returncode == 0 and f", {done} already done" in r.stdout, (r.stdout, r.stderr)
    assert SECONDS.sub(b"", out.read_bytes()) == SECONDS.sub(b"", (job / "ref.jsonl").read_bytes())


def test_parent_killed_leaves_no_worker_and_resumes(job, tiny_int8, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _start(job, tiny_int8, out)
    try:
        workers = _wait_for_rows(proc, out, 20)
        sigkill(proc, WAIT_S)
    finally:
        reap(proc, WAIT_S)
    deadline = time.monotonic() + 10  # each worker notices within a second that its parent is gone
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.05)
    _finish(job, tiny_int8, out)


def test_a_worker_killed_is_a_one_line_error_and_the_rerun_finishes(job, tiny_int8, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _start(job, tiny_int8, out)
    try:
        workers = _wait_for_rows(proc, out, 20)
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=WAIT_S)  # never a hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "worker process died" in err and "rows written so far are kept" in err and "rerun the same job" in err
    assert not any(_alive(w) for w in workers[1:]), "the other worker was left running"
    kept = read_rows(out)
    assert kept and kept == read_rows(job / "ref.jsonl")[: len(kept)]
    _finish(job, tiny_int8, out)


@pytest.mark.slow
def test_sampled_job_on_two_workers_killed_and_resumed_equals_one_process_124m(gpt2_124m, tmp_path):
    """124M int8, sampled rows (most without a seed of their own), 2 workers x 1 thread: SIGKILL mid-job, rerun;
    the output equals one process with 2 threads given the job seed the first run drew (kept in OUTPUT.state)."""
    model = gpt2_124m["int8"]
    make_input(tmp_path / "in.jsonl", 30, seed=8)
    base = ["batch", model, str(tmp_path / "in.jsonl")]
    flags = ["--batch-size", "4", "--no-progress", "--do-sample", "--temperature", "0.9"]
    out = tmp_path / "out.jsonl"
    run = [sys.executable, "-m", "gpt2onnx", *base, str(out), *flags, "--workers", "2", "--threads", "1"]
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_bytes().count(b"\n") >= 8):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the job never got there"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    kept = read_rows(out)
    r = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f", {len(kept)} already done" in r.stdout, (r.stdout, r.stderr[-2000:])
    seed = json.loads((tmp_path / "out.jsonl.state").read_text())["seed"]
    assert cli.main([*base, str(tmp_path / "one.jsonl"), *flags, "--threads", "2", "--seed", str(seed)]) == 0
    assert read_rows(out) == read_rows(tmp_path / "one.jsonl") and read_rows(out)[: len(kept)] == kept
