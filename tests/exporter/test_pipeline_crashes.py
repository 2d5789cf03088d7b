"""Crashes of an export: a full or read-only disk, SIGINT and SIGKILL at chosen moments, Ctrl-C in --force.

An export writes into a hidden folder beside OUTDIR and renames it into place at the end:
whatever happens, there is the finished folder or nothing (a SIGKILL leaves the hidden
folder, which the next export removes). Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import gpt2onnx
from gpt2onnx import artifact, cli, fsutil
from gpt2onnx.errors import ExportError

WAIT_S = 60  # bound on waiting for a subprocess; nothing here should come close


def test_export_to_a_full_or_read_only_disk_leaves_nothing(tiny_src, small_disk, monkeypatch, capsys):
    """On a real 16 KiB tmpfs where one can be mounted (root), with a read-only step; elsewhere the disk
    "fills" with OSError(ENOSPC) from the last write of the export."""
    mnt, remount = small_disk
    if remount is None:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(artifact, "write_manifest", full)
    assert cli.main(["export", tiny_src, str(mnt / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == ("gpt2onnx: error: writing the export failed (No space left on device); check free disk space "
                   "and permissions of the output path\n"), err
    assert os.listdir(mnt) == []  # neither the folder nor a temporary one
    if remount is not None:
        remount("ro")
        with pytest.raises(ExportError, match=r"cannot write in .*; choose a writable output path"):
            gpt2onnx.export(tiny_src, str(mnt / "m"), progress=False)


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
