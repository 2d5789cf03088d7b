r"""File-system rules written once: atomic writes, and the temporary folders of an export.

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "x.json")
>>> atomic_write(p, b"{}\n"); open(p).read()
'{}\n'

`atomic_write` (temp file beside the target, fsync, rename) is the one way gpt2onnx
replaces a file it owns: manifests, bench records, batch state, Azure ML batch outputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile


@contextlib.contextmanager
def new_folder(outdir: str, *, prefix: str = ".new-"):
    """Build a folder in a temporary folder beside `outdir`; on success it replaces `outdir` whole.

    On any error (or Ctrl-C) the temporary folder is removed and `outdir` is left as it was.

    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "kit")
    >>> with new_folder(out) as tmp:
    ...     open(os.path.join(tmp, "a.txt"), "w").close()
    >>> os.listdir(out)
    ['a.txt']
    """
    parent = os.path.dirname(os.path.abspath(outdir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(outdir):
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, text.encode("utf-8"))


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        # mkstemp makes 0600 files; keep the mode of a file we replace, else rw-r--r--.
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- temporary folders of an export ----------------------------------------------------

def temp_prefix(out: str, kind: str = "tmp") -> str:
    """Name prefix of a temporary folder that an export of `out` makes beside it.

    ``.NAME.tmp-HOST-PID-`` is the folder being written, ``.NAME.old-HOST-PID-`` holds the
    previous folder while ``--force`` swaps it. Host and pid let a later export tell a
    folder left behind by a killed process from one that is still being written.

    >>> temp_prefix("out/gpt2-int8").startswith(".gpt2-int8.tmp-")
    True
    """
    return f".{os.path.basename(os.path.abspath(out))}.{kind}-{_host()}-{os.getpid()}-"


def remove_stale_temps(out: str) -> list[str]:
    """Remove the temporary folders that killed exports of `out` left beside it; returns their names.

    A SIGKILL (or SIGTERM, or a power cut) gives an export no chance to clean up. Only
    folders made on this host by a process that no longer exists are touched. A previous
    model folder parked by an interrupted ``--force`` swap is moved back to `out` when
    `out` is missing, so an export killed at that moment loses nothing.
    """
    return _remove_temps(out, lambda pid: not _alive(pid))


def remove_own_temps(out: str) -> list[str]:
    """Remove the temporary folders of `out` that this process made (after a failure or Ctrl-C).

    By name rather than by a variable, so a Ctrl-C that lands inside `mkdtemp` is covered;
    a previous folder parked by an interrupted ``--force`` swap is moved back first.
    """
    return _remove_temps(out, lambda pid: pid == os.getpid())


def _remove_temps(out: str, remove) -> list[str]:
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    removed: list[str] = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return removed
    host = _host()
    for entry in entries:  # ".NAME.old-*" sorts before ".NAME.tmp-*": a parked folder is restored first
        kind = next((k for k in ("old", "tmp") if entry.startswith(f".{name}.{k}-{host}-")), None)
        if kind is None:
            continue
        pid = entry[len(f".{name}.{kind}-{host}-"):].split("-", 1)[0]
        if not pid.isdigit() or not remove(int(pid)):
            continue
        path = os.path.join(parent, entry)
        parked = os.path.join(path, "x")
        try:
            if kind == "old" and os.path.isdir(parked) and not os.path.lexists(out):
                os.rename(parked, out)
        except OSError:
            continue  # keep it: it may hold the only copy of the previous folder
        shutil.rmtree(path, ignore_errors=True)
        removed.append(entry)
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    """True unless process `pid` surely does not exist (then its temporary folders are stale)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows, os.kill(pid, 0) would send CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True
