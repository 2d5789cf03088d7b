"""Batch output: the OUTPUT.jsonl of a batch job, its OUTPUT.state, resume and locked appends.

For example::

    from gpt2onnx.batch.state import open_output
    out, done, job = open_output("out.jsonl", state)
    out.write([{"id": "a", "line": 1, "index": 0, "text": "..."}]); out.close()

How a job survives a crash::

    OUTPUT.state   written first (atomic): input sha256, job params, model identity, job seed
    OUTPUT         rows appended in input order; flush + fsync after every batch

    restart:  check OUTPUT.state  ->  cut a torn last line  ->  keys (line, index) of
              the rows present  ->  skip those rows  ->  append the rest

`open_output` does all of it in one call: it opens and locks OUTPUT, checks or writes its
``.state``, cuts a torn tail and returns a sized `Writer` (flock-ed, fsynced appends) with
the sorted done keys, for `gpt2onnx.batch.rows.read_lines` to mark done.
"""

from __future__ import annotations

import array
import hashlib
import json
import os

try:
    import fcntl
except ImportError:  # Windows: no lock on the output
    fcntl = None

from .._version import __version__
from ..errors import BatchError
from ..fsutil import atomic_write_text
from .rows import MAX_PROMPTS_PER_LINE, row_key_of

STATE_FORMAT = "gpt2onnx-batch-state"
STATE_VERSION = 1


def check_paths(input_path: str, output_path: str) -> None:
    """Before the model is loaded: the input is a file, and OUTPUT can be written and is not being written now.

    Nothing is created here; `open_output` creates OUTPUT once the model has loaded.
    """
    _check_input(input_path, output_path)
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        raise _cannot_open(output_path, "No such file or directory")
    if os.path.isfile(output_path):
        try:
            with open(output_path, "rb") as f:
                _lock(f, output_path)  # released at close: a busy output fails now, not after the model load
        except OSError as e:
            raise _cannot_open(output_path, e.strerror or e) from None


def _check_input(input_path: str, output_path: str) -> None:
    if not os.path.exists(input_path):
        raise BatchError(f"input file {input_path!r} does not exist")
    if not os.path.isfile(input_path):
        raise BatchError(f"input {input_path!r} is not a file; pass a JSONL file")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise BatchError("the output file is the input file; write the output elsewhere")
    if os.path.isdir(output_path):
        raise BatchError(f"output {output_path!r} is a directory; pass a file path like {output_path}/out.jsonl")


def fingerprint(path: str) -> tuple[str, int]:
    """sha256 of the input and its number of non-blank lines (the progress bar's first total)."""
    h, lines = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                h.update(raw)
                lines += bool(raw.strip())
    except OSError as e:
        raise BatchError(f"cannot read input {path!r} ({e.strerror or e})") from None
    return h.hexdigest(), lines


def model_identity(manifest) -> dict:
    """What the ``.state`` sidecar records of the model: a different model refuses to resume the job."""
    files = manifest.files
    return {"name": manifest.name, "precision": manifest.precision,
            "model_sha256": files.get("model.onnx", {}).get("sha256"),
            "data_sha256": files.get("model.onnx.data", {}).get("sha256")}


def _state_path(output_path: str) -> str:
    return output_path + ".state"


def open_output(output_path: str, state: dict) -> tuple["Writer", array.array, dict]:
    """Open OUTPUT for this job: lock it, check that it belongs to this job (or start it), cut a torn tail.

    Args:
        state: what the ``.state`` sidecar records of the job (input sha256, params, model, seed).

    Returns:
        (the `Writer`, sized after any cut; the sorted keys of the rows already written; the
        job's state: `state`, or the one an interrupted run wrote, whose `seed` the rest must use).
    """
    writer = Writer(output_path)  # opened and locked first: a second job on this output stops here
    try:
        done, job = _resume(output_path, state)
        writer.size = writer.f.seek(0, os.SEEK_END)  # after a torn tail was cut
    except BaseException:
        writer.close()
        raise
    return writer, done, job


def _resume(output_path: str, state: dict) -> tuple[array.array, dict]:
    """Check that OUTPUT belongs to this job, cut a torn tail; the sorted done keys and the job's state."""
    state_path = _state_path(output_path)
    has_rows = os.path.isfile(output_path) and os.path.getsize(output_path) > 0
    old = None
    if os.path.exists(state_path):
        try:
            with open(state_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("format") != STATE_FORMAT:
            if has_rows:
                raise BatchError(f"{state_path} is damaged; delete {output_path} and its .state file to start over")
            old = None
    if not has_rows:
        _write_state(state_path, state)
        return array.array("q"), state
    if old is None:
        raise BatchError(f"output {output_path!r} already exists and was not written by 'gpt2onnx batch' "
                         "(no .state file); choose another output file or delete it")
    for field, what in (("input_sha256", "a different input file"), ("params", "different generation parameters"),
                        ("model", "a different model")):
        if old.get(field) != state[field]:
            raise BatchError(f"output {output_path!r} was made from {what}; write to a new output file, "
                             f"or delete it and {os.path.basename(state_path)} to start over")
    return _done_keys(output_path), old


def _write_state(path: str, state: dict) -> None:
    try:
        atomic_write_text(path, json.dumps({**state, "gpt2onnx_version": __version__}, indent=1) + "\n")
    except OSError as e:
        raise BatchError(f"cannot write {path!r} ({e.strerror or e}); check the output folder exists "
                         "and is writable") from None


def _done_keys(output_path: str) -> array.array:
    """Keys of the complete rows of OUTPUT; a torn or damaged tail is cut off first."""
    keys = array.array("q")  # 8 bytes a row: a million-row output costs 8 MB
    in_order = True
    good_end = 0  # byte offset after the last good row
    damaged_at = None  # line number of the first bad line, if later rows are good
    try:
        with open(output_path, "rb") as f:
            offset, n = 0, 0
            for raw in f:
                n += 1
                key = _row_key(raw) if raw.endswith(b"\n") else None
                offset += len(raw)
                if key is None:
                    damaged_at = damaged_at or n
                    continue
                if damaged_at is not None:
                    raise BatchError(f"output {output_path!r} is damaged at line {damaged_at} (not a result row); "
                                     "repair or delete it")
                in_order = in_order and (not keys or key > keys[-1])
                keys.append(key)
                good_end = offset
        if good_end < offset:
            with open(output_path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise BatchError(f"cannot read or repair output {output_path!r} ({e.strerror or e})") from None
    return keys if in_order else array.array("q", sorted(set(keys)))


def _row_key(raw: bytes) -> int | None:
    try:
        row = json.loads(raw)
        line, index = row["line"], row["index"]
    except (ValueError, TypeError, KeyError):
        return None
    if type(line) is not int or type(index) is not int or line < 1 or not 0 <= index < MAX_PROMPTS_PER_LINE:
        return None
    return row_key_of(line, index)


class Writer:
    """Appends rows to OUTPUT; every `write` is flushed and fsynced before it returns.

    The file stays locked (flock) while the job runs: a second job started on the same
    output, by mistake or by an impatient retry, would cut the first one's last line as
    "torn" and write every row twice; it is refused instead.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = open(path, "ab")
            self.size = self.f.tell()
        except OSError as e:
            raise _cannot_open(path, e.strerror or e) from None
        try:
            _lock(self.f, path)
        except BaseException:
            self.f.close()
            raise

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = b"".join(_dump(r) for r in rows)
        try:
            self.f.write(data)
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            self._cut_back()
            raise BatchError(f"cannot write output {self.path!r} ({e.strerror or e}); the rows written so far "
                             "are kept: free space or fix the path, then rerun the same command to resume") from None
        self.size += len(data)

    def _cut_back(self) -> None:
        """Drop a partly written batch so the file ends with a complete row (best effort)."""
        self.close()
        try:
            with open(self.path, "r+b") as f:
                f.truncate(self.size)
        except OSError:
            pass  # the next run cuts the torn line anyway

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


def _lock(f, path: str) -> None:
    """flock OUTPUT for this job until `f` is closed; a lock held by another job is a one-line `BatchError`."""
    if fcntl is None:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BatchError(f"output {path!r} is being written by another running batch job; wait for it to "
                         "finish (or stop it), or write to another file") from None
    except OSError:
        pass  # a filesystem without locks: run one job per output, as before


def _cannot_open(path: str, reason) -> BatchError:
    return BatchError(f"cannot open output {path!r} for writing ({reason}); check the output folder exists "
                      "and is writable")


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}  # str.splitlines() splits on these


def _dump(row: dict) -> bytes:
    """One JSONL line. Text stays readable UTF-8; the three non-ASCII characters that line-splitting
    readers (Python's str.splitlines) take for line ends are escaped, so a row is always one line."""
    try:
        return (json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in an id: keep it as a JSON escape
        return (json.dumps(row) + "\n").encode("ascii")
