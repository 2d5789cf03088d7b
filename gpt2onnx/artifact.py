"""The model folder: the contract between the exporter and the runtime.

A model folder holds ``model.onnx`` (+ ``model.onnx.data``), ``tokenizer.json``,
``config.json``, ``MODEL_CARD.md`` and the manifest ``gpt2onnx.json``. The manifest
records what the folder is (source, precision, dims, I/O names), how it was made
(tool versions, quantization), how good it is (parity figures), and the size and
sha256 of every file, so a damaged folder is refused at load instead of producing
wrong text.

>>> m = read_manifest("out/gpt2-int8")            # doctest: +SKIP
>>> m["precision"], m["dims"]["n_layer"]          # doctest: +SKIP
('int8', 12)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from typing import Any

from .errors import ArtifactError

MANIFEST = "gpt2onnx.json"
FORMAT = "gpt2onnx"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.onnx", "tokenizer.json", "config.json")
DIMS = ("n_layer", "n_head", "n_embd", "head_dim", "vocab_size", "n_positions")  # what the runtime reads
CONFIG_DIMS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")  # also in config.json


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in `folder` except the manifest itself."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        out[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return out


def write_manifest(folder: str, manifest: dict) -> None:
    """Write the manifest, adding the file table (call after every other file is written)."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=describe_files(folder))
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, os.path.join(folder, MANIFEST))


def fspath(folder: Any) -> str:
    """`os.fspath(folder)`, with a one-line `ArtifactError` for what is not a path (None, a number)."""
    try:
        return os.fspath(folder)
    except TypeError:
        raise ArtifactError(f"a model folder must be a path (str or os.PathLike), got {type(folder).__name__}; "
                            "pass the folder written by 'gpt2onnx export'") from None


def read_manifest(folder: str) -> dict:
    """Read and check the manifest of a model folder (no hashing; see `verify`).

    Every field the runtime reads is type-checked here (dims are positive integers, the
    special token ids lie inside the vocabulary), so a damaged or hand-edited manifest
    is one `ArtifactError` at load, never a `KeyError` or a wrong shape later.
    """
    folder = fspath(folder)
    if os.path.isfile(folder):
        raise ArtifactError(f"{folder!r} is a file; pass the model folder that holds it (the one with {MANIFEST})")
    if not os.path.isdir(folder):
        raise ArtifactError(f"model folder {folder!r} does not exist; export one with 'gpt2onnx export SOURCE {folder}'")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "model.onnx")) or any(
            n.startswith("decoder_model") for n in os.listdir(folder)
        ):
            raise ArtifactError(
                f"{folder!r} has an ONNX model but no {MANIFEST}: it is not a gpt2onnx export (an Optimum "
                "export?); make one from the original model with 'gpt2onnx export SOURCE OUTDIR'"
            )
        raise ArtifactError(f"{folder!r} is not a gpt2onnx model folder (no {MANIFEST}); "
                            "export one with 'gpt2onnx export SOURCE OUTDIR'")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.__class__.__name__}); the folder is damaged, re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a gpt2onnx manifest; re-export the model with 'gpt2onnx export'")
    version = manifest.get("format_version")
    if not _positive_int(version):
        raise ArtifactError(f"{path} has no valid format_version; the folder is damaged, re-export it")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"model folder format {version} is newer than this gpt2onnx supports ({FORMAT_VERSION}); "
            "upgrade gpt2onnx (pip install -U gpt2onnx)"
        )
    for key in ("dims", "files", "precision", "io"):
        if not isinstance(manifest.get(key), dict if key != "precision" else str):
            raise ArtifactError(f"{path} lacks '{key}'; the folder is damaged, re-export it")
    dims = manifest["dims"]
    for key in DIMS:
        if not _positive_int(dims.get(key)):
            raise ArtifactError(f"{path}: dims.{key} must be a positive integer, got {_show(dims.get(key))}; "
                                "the folder is damaged, re-export it")
    if dims["head_dim"] * dims["n_head"] != dims["n_embd"]:
        raise ArtifactError(f"{path}: dims.head_dim x n_head != n_embd; the folder is damaged, re-export it")
    for key in ("eos_token_id", "bos_token_id"):
        value = manifest.get(key)
        if key in manifest and not (type(value) is int and 0 <= value < dims["vocab_size"]):
            raise ArtifactError(f"{path}: {key} must be a token id in [0, {dims['vocab_size']}), got {_show(value)}; "
                                "the folder is damaged, re-export it")
    return manifest


def _positive_int(value: Any) -> bool:
    return type(value) is int and value >= 1  # not bool, not float


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_config(folder: str, dims: dict) -> None:
    """The manifest's dims must be the ones of config.json (which the sha256 table covers)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.__class__.__name__}); the folder is damaged, "
                            "re-export it") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} is not a model config (a JSON object); the folder is damaged, re-export it")
    for key in CONFIG_DIMS:
        if key in config and config[key] != dims[key]:
            raise ArtifactError(f"the manifest of {folder!r} says {key} {dims[key]} but config.json says "
                                f"{_show(config[key])}; the folder is damaged, re-export it")


def verify(folder: str, *, check_hashes: bool = True) -> dict:
    """Check that every file of the manifest is present, complete and (optionally) unchanged.

    Args:
        folder: the model folder.
        check_hashes: also compare sha256 (reads every byte; sizes are always checked).

    Returns:
        The manifest.

    Raises:
        ArtifactError: with one line naming the first problem found.

    >>> verify("out/gpt2-int8")["precision"]   # doctest: +SKIP
    'int8'
    """
    folder = fspath(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"the manifest of {folder!r} lists no {name}; the folder is damaged, re-export it")
    for name, info in files.items():
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or not isinstance(info, dict):
            raise ArtifactError(f"the manifest of {folder!r} has a bad file entry {name!r}; re-export it")
        if not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing; copy the whole model folder again or re-export it")
        size = os.path.getsize(path)
        if size != info.get("bytes"):
            raise ArtifactError(
                f"{path} is {size} bytes, the manifest says {info.get('bytes')} (truncated or replaced); "
                "copy the model folder again or re-export it"
            )
        if check_hashes and sha256_file(path) != info.get("sha256"):
            raise ArtifactError(
                f"{path} does not match its sha256 in the manifest (damaged or modified); "
                "copy the model folder again or re-export it"
            )
    _check_config(folder, manifest["dims"])
    return manifest


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


def summary(manifest: dict) -> str:
    """A few human-readable lines describing a model folder."""
    d = manifest["dims"]
    src = manifest.get("source", {})
    weights = "RANDOM WEIGHTS (seed %s; text is meaningless)" % src.get("seed") if src.get("random_weights") else "pretrained"
    total = sum(f["bytes"] for f in manifest["files"].values())
    lines = [
        f"model      {manifest.get('name', '?')} from {src.get('id', '?')} ({weights})",
        f"precision  {manifest['precision']}" + (
            f" ({manifest['quantization'].get('scheme')})" if manifest.get("quantization") else ""),
        f"dims       {d['n_layer']} layers, {d['n_head']} heads, {d['n_embd']} dims, vocab {d['vocab_size']}, "
        f"context {d['n_positions']}, {manifest.get('n_params', 0) / 1e6:.1f} M parameters",
        f"files      {len(manifest['files'])} files, {total / 1e6:.1f} MB",
    ]
    parity = manifest.get("parity") or {}
    if parity:
        lines.append("parity     " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in parity.items() if not isinstance(v, dict)))
    fid = manifest.get("fidelity") or {}
    if fid:
        lines.append("fidelity   " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in fid.items() if not isinstance(v, (dict, list))))
    tools = manifest.get("tools", {})
    lines.append("made with  " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    lines.append(f"created    {manifest.get('created', '?')}")
    return "\n".join(lines)
