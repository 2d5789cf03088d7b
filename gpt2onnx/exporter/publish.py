"""Atomic publication of a model folder: build in a temporary folder, rename into place.

A failure or Ctrl-C at any point leaves either the old folder or the new one, never a
half-written one (the temporary folders are named by host and pid, so a later export
removes what a killed one left; see `gpt2onnx.artifact.temp_prefix`).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..fsutil import temp_prefix
from ..errors import ExportError


def check_outdir(cfg) -> str:
    """The absolute output path, after checking it may be written (refused if it exists, unless cfg.force)."""
    out = os.path.abspath(cfg.outdir)
    if os.path.exists(out):
        if not cfg.force:
            raise ExportError(f"output folder {cfg.outdir!r} exists; pass --force to replace it")
        if not os.path.isdir(out):
            raise ExportError(f"output path {cfg.outdir!r} exists and is not a folder; choose another path")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {parent!r} ({e.strerror}); choose a writable output path") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write in {parent!r}; choose a writable output path")
    return out


def publish(tmp: str, out: str) -> None:
    """Move the finished folder into place; an old one is removed only after."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give the usual permissions
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "x"))
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
