"""Crashes of a batch job: SIGKILL at chosen moments and at random points, a full or read-only disk.

A hook parks the job at an exact moment (model load, state file half-written, mid-line,
right after an fsync, in the middle of the repair a resume does) before the SIGKILL; a
job is killed again and again at random points. After every crash the rerun must give
each input row exactly once, equal to an uninterrupted run. (Interrupted exports are in
tests/exporter/test_pipeline_crashes.py.)
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import gpt2onnx
from gpt2onnx import cli
from gpt2onnx.batch import BatchError, run_batch
from gpt2onnx.batch import state

from helpers.procs import reap, sigkill

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
WAIT_S = 60  # bound on waiting for a hook or a subprocess; nothing here should come close


def make_input(path, n: int, seed: int) -> int:
    """n lines: greedy and seeded sampling rows, input_data lines of 3 prompts, a few bad lines; returns rows."""
    rng = random.Random(seed)
    rows = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 20)))  # noqa: E731
            if i % 23 == 5:
                f.write('{"id": "bad", "prompt": "x", "top_p": 7}\n' if i % 2 else "not json\n")
                rows += 1
            elif i % 11 == 3:
                f.write(json.dumps({"input_data": [words(), words(), words()],
                                    "params": {"max_new_tokens": rng.randint(2, 12)}}) + "\n")
                rows += 3
            else:
                row = {"id": f"r{i}", "prompt": words(), "max_new_tokens": rng.randint(2, 16)}
                if i % 3 == 0:
                    row.update(do_sample=True, top_p=0.9, temperature=0.8, seed=i)
                f.write(json.dumps(row) + "\n")
                rows += 1
    return rows


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


@pytest.fixture(scope="module")
def job(tmp_path_factory, gen):
    """An input and its uninterrupted output: the reference every resumed run must reproduce."""
    d = tmp_path_factory.mktemp("crash-job")
    n_rows = make_input(d / "in.jsonl", 160, seed=11)
    run_batch(gen, d / "in.jsonl", d / "ref.jsonl", batch_size=4, progress=False)
    ref = read_rows(d / "ref.jsonl")
    assert len(ref) == n_rows and len({(r["line"], r["index"]) for r in ref}) == n_rows
    assert sum("error" in r for r in ref) >= 4
    return d, ref


# The batch CLI with a hook that parks the job at one exact moment (writes MARKER, then
# sleeps until the test kills it), or slows every batch down (HOOK=slow).
HOOKED = r"""
import os, sys, time
from gpt2onnx import batch, cli, runtime
from gpt2onnx.batch import state

hook, marker = os.environ.get("HOOK", ""), os.environ.get("MARKER", "")

def park():
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

real_fsync, calls = os.fsync, [0]
if hook == "load":                          # the model loading: the output and its state not created yet
    runtime.load = lambda *a, **k: park()
elif hook == "state":                       # the state's temp file written and fsynced, not yet renamed
    def fsync(fd):
        real_fsync(fd)
        park()
    state.os.fsync = fsync
elif hook.startswith("after-fsync-"):       # right after the Nth fsync of this run
    n = int(hook.rsplit("-", 1)[1])
    def fsync(fd):
        real_fsync(fd)
        calls[0] += 1
        if calls[0] == n:
            park()
    state.os.fsync = fsync
elif hook == "mid-line":                    # the 3rd batch written up to the middle of a row
    real_write, writes = state.Writer.write, [0]
    def write(self, rows):
        writes[0] += 1
        if writes[0] < 3:
            return real_write(self, rows)
        data = b"".join(state._dump(r) for r in rows)
        self.f.write(data[: len(data) - len(state._dump(rows[-1])) // 2])
        self.f.flush()
        real_fsync(self.f.fileno())
        park()
    state.Writer.write = write
elif hook == "slow":                        # 1 ms more per row, so random kills land inside the job
    real_complete = batch.core.complete
    def complete(row, result, seconds):
        time.sleep(0.001)
        return real_complete(row, result, seconds)
    batch.core.complete = complete
sys.exit(cli.main(sys.argv[1:]))
"""


def _cmd(model_dir, d, out) -> list[str]:
    return [sys.executable, "-c", HOOKED, "batch", model_dir, str(d / "in.jsonl"), str(out), "--batch-size", "4",
            "--threads", "1", "--no-progress"]


def _run_until_parked(cmd, hook: str, marker) -> None:
    """Start the job with `hook`, wait until it parks at its moment, then SIGKILL it."""
    env = dict(os.environ, HOOK=hook, MARKER=str(marker))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(marker):
            assert proc.poll() is None, f"hook {hook}: the job ended (rc {proc.returncode}) before parking: " \
                                        + proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"hook {hook} never reached"
            time.sleep(0.005)
        sigkill(proc, WAIT_S)
    finally:
        reap(proc, WAIT_S)
        proc.stderr.close()
        if os.path.exists(marker):
            os.remove(marker)


def _finish(cmd, out) -> str:
    """Rerun the job to the end; it reports the complete rows the killed runs left as already done."""
    done = out.read_bytes().count(b"\n") if out.exists() else 0  # a torn last row is not done
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S * 2)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (f", {done} already done" in r.stdout) if done else ("already done" not in r.stdout), (done, r.stdout)
    return r.stdout


def _check_complete(out, ref) -> None:
    rows = read_rows(out)
    keys = [(r["line"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    assert sorted(keys) == [(r["line"], r["index"]) for r in ref], "a row is missing"
    assert rows == ref  # in input order, the same text as the uninterrupted run


@pytest.mark.parametrize("hooks", [
    ["load"],
    ["state"],
    ["after-fsync-3"],  # state + 2 batches durable, killed before the 3rd batch is written
    ["mid-line", "after-fsync-1"],  # torn row; then the resume is killed right after repairing it
    ["after-fsync-5", "mid-line", "after-fsync-4"],  # three crashes in a row
], ids=lambda h: "+".join(h))
def test_batch_sigkill_at_exact_moments_then_rerun(job, tiny_int8, tmp_path, hooks):
    d, ref = job
    out = tmp_path / "out.jsonl"
    cmd = _cmd(tiny_int8, d, out)
    for hook in hooks:
        before = out.read_bytes() if out.exists() else b""
        _run_until_parked(cmd, hook, tmp_path / "parked")
        after = out.read_bytes() if out.exists() else b""
        if hook == "load":
            assert not out.exists() and not (tmp_path / "out.jsonl.state").exists()
        if hook == "state":
            assert not (tmp_path / "out.jsonl.state").exists() and list(tmp_path.glob(".tmp-*"))
        if hook == "mid-line":
            assert not after.endswith(b"\n"), "the hook should leave a torn row"
        if hook == "after-fsync-1" and before:  # the resume's first fsync is its repair of the torn tail
            assert after.endswith(b"\n") and before.startswith(after) and len(after) < len(before)
    assert " ok, " in _finish(cmd, out)
    _check_complete(out, ref)


def test_a_sampled_job_without_a_seed_resumes_to_the_uninterrupted_text(tiny_int8, tmp_path):
    """Rows sampled with no seed anywhere: the job draws a seed, keeps it in OUTPUT.state, and the rerun after a
    SIGKILL goes on with it, so the output equals one uninterrupted run with that job seed (before, the resumed
    rows were drawn afresh, with no warning)."""
    rng = random.Random(2)
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:
        for i in range(60):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"id": i, "prompt": words, "max_new_tokens": rng.randint(4, 14)} if i % 9 else
                               {"input_data": [words, words], "params": {"max_new_tokens": 6}}) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [*_cmd(tiny_int8, tmp_path, out), "--do-sample", "--temperature", "1.5"]
    _run_until_parked(cmd, "after-fsync-4", tmp_path / "parked")
    kept = read_rows(out)
    assert kept, "the kill should land after some rows were written"
    _finish(cmd, out)
    seed = json.loads((tmp_path / "out.jsonl.state").read_text())["seed"]
    assert isinstance(seed, int)
    whole = tmp_path / "whole.jsonl"
    assert cli.main(["batch", tiny_int8, str(tmp_path / "in.jsonl"), str(whole), "--batch-size", "3", "--threads",
                     "1", "--no-progress", "--do-sample", "--temperature", "1.5", "--seed", str(seed)]) == 0
    got, want = read_rows(out), read_rows(whole)
    assert got == want and got[: len(kept)] == kept
    assert len({r["text"] for r in got}) > len(got) * 0.9  # sampled: the rows differ


def test_batch_killed_again_and_again_at_random_points(job, tiny_int8, tmp_path):
    """Up to 6 SIGKILLs, each once the output has grown by a random amount; then one clean run."""
    d, ref = job
    out = tmp_path / "out.jsonl"
    cmd = _cmd(tiny_int8, d, out)
    final = os.path.getsize(d / "ref.jsonl")
    rng = random.Random(5)
    kills = 0
    for _ in range(6):
        size = out.stat().st_size if out.exists() else 0
        target = size + rng.randint(1, max(2, (final - size) // 3))
        proc = subprocess.Popen(cmd, env=dict(os.environ, HOOK="slow"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + WAIT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and out.stat().st_size >= target:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait(WAIT_S)
        if proc.returncode == 0:
            break
    assert kills >= 3, f"only {kills} kills landed inside the job"
    _finish(cmd, out)
    _check_complete(out, ref)


# -- a full or read-only disk ----------------------------------------------------------------


def test_batch_on_a_full_disk_keeps_rows_and_resumes(job, gen, small_disk, tiny_int8, monkeypatch, capsys):
    """A full disk stops the job with one line, the rows written so far stay, and once there is room the same
    command finishes the job. On a real 16 KiB tmpfs where one can be mounted (root), with a read-only step;
    elsewhere the disk "fills" with OSError(ENOSPC) from the 11th fsync (the state file, then 10 writes)."""
    d, ref = job
    mnt, remount = small_disk
    real_fsync = os.fsync
    if remount is None:
        calls = [0]

        def fsync(fd):
            calls[0] += 1
            if calls[0] > 10:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(state.os, "fsync", fsync)
    out = mnt / "out.jsonl"
    assert os.path.getsize(d / "ref.jsonl") > 16 * 1024, "the job must not fit the small disk"
    rc = cli.main(["batch", tiny_int8, str(d / "in.jsonl"), str(out), "--batch-size", "4", "--threads", "1",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "rows written so far are kept" in err and "rerun the same" in err
    kept = read_rows(out)  # every line complete
    assert len(kept) >= 10 and kept == ref[: len(kept)]
    if remount is None:
        monkeypatch.setattr(state.os, "fsync", real_fsync)  # space freed
    else:
        remount("ro")  # a read-only disk: refused before anything is touched
        with pytest.raises(BatchError, match=r"cannot open output .*Read-only file system.*writable"):
            run_batch(gen, d / "in.jsonl", out, batch_size=4, progress=False)
        assert read_rows(out) == kept
        remount("rw")
        remount(4096)  # space freed: the same command finishes the job
    s = run_batch(gen, d / "in.jsonl", out, batch_size=4, progress=False)
    assert s.skipped_already_done == len(kept)
    _check_complete(out, ref)
