"""Crashes: batch jobs and exports killed at chosen moments, full and read-only disks.

tests/test_batch.py kills a job at three output sizes. Here a hook parks the job at an
exact moment (model load, state file half-written, mid-line, right after an fsync, in
the middle of the repair a resume does) before the SIGKILL; a job is killed again and
again at random points; and `gpt2onnx export` gets SIGINT and SIGKILL. After every
crash the rerun must give each input row exactly once, equal to an uninterrupted run.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import gpt2onnx
from gpt2onnx import artifact, cli, fsutil
from gpt2onnx.batch import BatchError, run_batch
from gpt2onnx.errors import ExportError

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
from gpt2onnx.batch import state as batchoutput

hook, marker = os.environ.get("HOOK", ""), os.environ.get("MARKER", "")

def park():
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

real_fsync, calls = os.fsync, [0]
if hook == "load":                          # the state file is written, the output opened, the model loading
    runtime.load = lambda *a, **k: park()
elif hook == "state":                       # the state's temp file written and fsynced, not yet renamed
    def fsync(fd):
        real_fsync(fd)
        park()
    batchoutput.os.fsync = fsync
elif hook.startswith("after-fsync-"):       # right after the Nth fsync of this run
    n = int(hook.rsplit("-", 1)[1])
    def fsync(fd):
        real_fsync(fd)
        calls[0] += 1
        if calls[0] == n:
            park()
    batchoutput.os.fsync = fsync
elif hook == "mid-line":                    # the 3rd batch written up to the middle of a row
    real_write, writes = batchoutput.Writer.write, [0]
    def write(self, rows):
        writes[0] += 1
        if writes[0] < 3:
            return real_write(self, rows)
        data = b"".join(batchoutput._dump(r) for r in rows)
        self.f.write(data[: len(data) - len(batchoutput._dump(rows[-1])) // 2])
        self.f.flush()
        real_fsync(self.f.fileno())
        park()
    batchoutput.Writer.write = write
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
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(WAIT_S) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        proc.stderr.close()
        if os.path.exists(marker):
            os.remove(marker)


def _finish(cmd) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S * 2)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
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
            assert after == b"" and (tmp_path / "out.jsonl.state").exists()
        if hook == "state":
            assert not (tmp_path / "out.jsonl.state").exists() and list(tmp_path.glob(".tmp-*"))
        if hook == "mid-line":
            assert not after.endswith(b"\n"), "the hook should leave a torn row"
        if hook == "after-fsync-1" and before:  # the resume's first fsync is its repair of the torn tail
            assert after.endswith(b"\n") and before.startswith(after) and len(after) < len(before)
    assert " ok, " in _finish(cmd)
    _check_complete(out, ref)


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
    _finish(cmd)
    _check_complete(out, ref)


# -- full and read-only disks ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs (root only; skipped elsewhere). Yields (path, remount(kib | 'ro' | 'rw'))."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]}); the monkeypatched tests cover it")

    def remount(opt: str) -> None:
        opt = f"size={opt}k" if isinstance(opt, int) else opt
        subprocess.run(["mount", "-o", f"remount,{opt}", str(mnt)], check=True, capture_output=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_batch_on_a_full_disk_keeps_rows_and_resumes(job, gen, small_disk, tiny_int8, capsys):
    d, ref = job
    mnt, remount = small_disk
    out = mnt / "out.jsonl"
    assert os.path.getsize(d / "ref.jsonl") > 16 * 1024, "the job must not fit the small disk"
    rc = cli.main(["batch", tiny_int8, str(d / "in.jsonl"), str(out), "--batch-size", "4", "--threads", "1",
                            "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "rows written so far are kept" in err and "rerun the same" in err
    kept = read_rows(out)  # every line complete
    assert len(kept) >= 10 and kept == ref[: len(kept)]
    remount("ro")  # a read-only disk: refused before anything is touched
    with pytest.raises(BatchError, match=r"cannot open output .*Read-only file system.*writable"):
        run_batch(gen, d / "in.jsonl", out, batch_size=4, progress=False)
    assert read_rows(out) == kept
    remount("rw")
    remount(4096)  # space freed: the same command finishes the job
    s = run_batch(gen, d / "in.jsonl", out, batch_size=4, progress=False)
    assert s.skipped_already_done == len(kept)
    _check_complete(out, ref)


def test_export_to_a_full_or_read_only_disk_leaves_nothing(tiny_src, small_disk, capsys):
    mnt, remount = small_disk
    assert cli.main(["export", tiny_src, str(mnt / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == ("gpt2onnx: error: writing the export failed (No space left on device); check free disk space "
                   "and permissions of the output path\n"), err
    assert os.listdir(mnt) == []  # neither the folder nor a temporary one
    remount("ro")
    with pytest.raises(ExportError, match=r"cannot write in .*; choose a writable output path"):
        gpt2onnx.export(tiny_src, str(mnt / "m"), progress=False)


def test_export_disk_full_simulated(tiny_src, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC from the last write of the export."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifact, "write_manifest", full)
    with pytest.raises(ExportError, match=r"writing the export failed \(No space left on device\)"):
        gpt2onnx.export(tiny_src, str(tmp_path / "m"), progress=False)
    assert os.listdir(tmp_path) == []


# -- interrupted exports ------------------------------------------------------------------------


def _export_and_signal(src, out, sig, when) -> tuple[int, str]:
    """Run `gpt2onnx export` and send `sig` once its temporary folder reaches the state `when`."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    proc = subprocess.Popen([sys.executable, "-m", "gpt2onnx", "export", src, out, "--precision", "int8", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_S
        while proc.poll() is None:
            tmp = glob.glob(os.path.join(parent, f".{name}.tmp-*"))
            if tmp and when(tmp[0]):
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "the export never reached the moment"
            time.sleep(0.002)
        assert proc.poll() is None or proc.returncode in (-sig, 130), "the export finished before the signal"
        return proc.wait(WAIT_S), proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
        proc.stderr.close()


MOMENTS = {
    "tmp-created": lambda tmp: True,  # before the model is loaded (torch is still importing)
    "fp32-graph-written": lambda tmp: os.path.exists(os.path.join(tmp, "fp32", "model.onnx.data")),
    "int8-graph-written": lambda tmp: os.path.exists(os.path.join(tmp, "model.onnx")),  # int8 parity running
}


@pytest.mark.parametrize("when", ["tmp-created", "fp32-graph-written"])
def test_export_sigint_leaves_nothing(tiny_src, tmp_path, when):
    out = str(tmp_path / "out")
    rc, err = _export_and_signal(tiny_src, out, signal.SIGINT, MOMENTS[when])
    assert rc == 130 and err == "gpt2onnx: interrupted\n", (rc, err)
    assert os.listdir(tmp_path) == []


def test_export_sigkill_leaves_a_temp_folder_that_the_next_export_removes(tiny_src, tmp_path):
    out = str(tmp_path / "out")
    left = []
    for when in ("tmp-created", "int8-graph-written"):
        rc, _ = _export_and_signal(tiny_src, out, signal.SIGKILL, MOMENTS[when])
        assert rc == -signal.SIGKILL
        # no OUTDIR, nothing half-done in its place; one temporary folder: each export removes the dead ones first
        now = os.listdir(tmp_path)
        assert len(now) == 1 and now[0].startswith(".out.tmp-") and now[0] not in left, (left, now)
        left = now
    gpt2onnx.export(tiny_src, out, progress=False)  # not confused, and it cleans up after the dead one
    assert os.listdir(tmp_path) == ["out"]
    gpt2onnx.load(out, threads=1).generate("hi", max_new_tokens=2)


def test_stale_temp_cleanup_spares_live_exports_and_restores_a_parked_folder(tiny_int8, tmp_path):
    out = str(tmp_path / "out")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(WAIT_S)
    try:
        host = fsutil.temp_prefix(out).split(".tmp-")[1].rsplit("-", 2)[0]
        running = tmp_path / f".out.tmp-{host}-{live.pid}-abc"
        stale = tmp_path / f".out.tmp-{host}-{dead.pid}-def"
        other_host = tmp_path / f".out.tmp-elsewhere-{dead.pid}-ghi"
        legacy = tmp_path / ".out.tmp-k2j4h5"  # from a gpt2onnx before host and pid were recorded
        parked = tmp_path / f".out.old-{host}-{dead.pid}-jkl"  # killed inside a --force swap
        for p in (running, stale, other_host, legacy, parked):
            p.mkdir()
        shutil.copytree(tiny_int8, parked / "x")
        assert sorted(fsutil.remove_stale_temps(out)) == sorted([stale.name, parked.name])
        assert sorted(os.listdir(tmp_path)) == sorted([running.name, other_host.name, legacy.name, "out"])
        artifact.verify(out)  # the previous model folder is back where it was
    finally:
        live.kill()
        live.wait(WAIT_S)


def test_ctrl_c_inside_the_force_swap_puts_the_old_folder_back(tiny_src, tiny_int8, tmp_path, monkeypatch):
    """--force parks the old folder, then renames the new one into place: interrupted between the two,
    the old one comes back (nothing lost) and no temporary folder stays."""
    out = str(tmp_path / "out")
    shutil.copytree(tiny_int8, out)
    before = artifact.read_manifest(out).to_dict()["created"]
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".out.tmp-") and str(dst) == out:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        gpt2onnx.export(tiny_src, out, force=True, progress=False)
    monkeypatch.setattr(os, "rename", real_rename)
    assert os.listdir(tmp_path) == ["out"]
    assert artifact.verify(out).to_dict()["created"] == before
