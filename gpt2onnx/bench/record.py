"""The bench result record: one versioned JSON file per benchmark run.

The benchmark runner writes these with `dump`; `gpt2onnx.report` reads many with
`load` and merges them. The layout (schema "gpt2onnx.bench/1")::

    {"schema": "gpt2onnx.bench/1", "created": "2024-05-01T12:00:00Z",
     "sku": "Standard_F4s_v2" | null, "projection": false,
     "environment": {cpu_model, physical_cores, logical_cores, isa{avx2, avx512f,
                     avx512_vnni, avx_vnni, amx}, cgroup_cpu_quota, affinity, memory_gib,
                     os, python, versions{gpt2onnx, onnxruntime, numpy, ..., openvino-genai},
                     git_revision, memory_bandwidth_gbs,
                     amx_usable (null: no AMX in the CPU; false: AMX switched off, see `amx_off`)},
     "model": {name, precision, kv_cache (fp32 if absent), random_weights, n_params, size_bytes,
               weight_bytes_per_token},
     "settings": {threads[], new_tokens, repeats, warmup, batch_sizes[], prompt_tokens[]},
     "results": [{runtime, precision, batch_size, prompt_tokens, new_tokens, threads,
                  load_s, tokenize_ms, first_token_ms{p50, p90},
                  token_ms{p50, p90, p99, mean}, tokens_per_s, peak_rss_mb,
                  floor_ratio, error}, ...],
     "quality": {...}}            # optional, e.g. {"wikitext2_ppl": 29.9}

`runtime` is one of `RUNTIMES` (gpt2onnx and its baselines pytorch, optimum, openvino,
openvino-capped: OpenVINO GenAI as on Cascade Lake, see `gpt2onnx.bench.ovgenai`).
A result row with `error` set is a run that failed (typically a baseline); its
figures may be null. Unknown keys are rejected so typos surface; `versions` and
`quality` are open.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime
from typing import Any

from ..errors import ArtifactError
from ..fsutil import atomic_write

SCHEMA = "gpt2onnx.bench/1"
SCHEMA_VERSION = 1
RUNTIMES = ("gpt2onnx", "pytorch", "optimum", "openvino", "openvino-capped")
PRECISIONS = ("fp32", "int8", "int4")

# field -> type spec: "int", "num", "bool", "str", "?x" (x or null), "[int]", "{str}",
# "dict" (any), a tuple of allowed strings, or a nested spec dict.
_ISA = {"avx2": "bool", "avx512f": "bool", "avx512_vnni": "bool", "avx_vnni": "bool", "amx": "bool"}
_ENV = {"cpu_model": "str", "physical_cores": "int", "logical_cores": "int", "isa": _ISA,
        "cgroup_cpu_quota": "?num", "affinity": "[int]", "memory_gib": "num", "os": "str",
        "python": "str", "versions": "{str}", "git_revision": "?str", "memory_bandwidth_gbs": "?num",
        "amx_usable": "?bool"}
_OPTIONAL_ENV = frozenset({"amx_usable"})  # records made before it: AMX state unknown
_MODEL = {"name": "str", "precision": PRECISIONS, "random_weights": "bool", "n_params": "int",
          "size_bytes": "int", "weight_bytes_per_token": "int", "kv_cache": ("fp32", "int8")}
_OPTIONAL_MODEL = frozenset({"kv_cache"})  # records made before int8 KV caches: fp32
_SETTINGS = {"threads": "[int]", "new_tokens": "int", "repeats": "int", "warmup": "int",
             "batch_sizes": "[int]", "prompt_tokens": "[int]"}
_ROW_KEYS = {"runtime": RUNTIMES, "precision": PRECISIONS, "batch_size": "int", "prompt_tokens": "int",
             "new_tokens": "int", "threads": "int", "error": "?str"}
_ROW_FIGURES = {"load_s": "num", "tokenize_ms": "num", "first_token_ms": {"p50": "num", "p90": "num"},
                "token_ms": {"p50": "num", "p90": "num", "p99": "num", "mean": "num"},
                "tokens_per_s": "num", "peak_rss_mb": "num", "floor_ratio": "?num"}
_TOP = {"schema": "str", "created": "str", "sku": "?str", "projection": "bool", "environment": _ENV,
        "model": _MODEL, "settings": _SETTINGS, "results": "list", "quality": "dict"}
_OPTIONAL_TOP = {"quality"}
_REQUIRED_VERSIONS = ("gpt2onnx", "onnxruntime", "numpy")


def _fail(source: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{source}: {msg}; re-run the benchmark or fix the file")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v) and v >= 0


def _check(value: Any, spec: Any, where: str, source: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _fail(source, f"{where} must be an object, got {type(value).__name__}")
        optional = _OPTIONAL_MODEL if spec is _MODEL else _OPTIONAL_ENV if spec is _ENV else frozenset()
        _check_fields(value, spec, where, source, optional)
        return
    if isinstance(spec, tuple):
        if value not in spec:
            raise _fail(source, f"{where} is {value!r}, expected one of {', '.join(spec)}")
        return
    if spec.startswith("?"):
        if value is None:
            return
        spec = spec[1:]
    ok = {"int": lambda v: _is_int(v) and v >= 0, "num": _is_num, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str), "list": lambda v: isinstance(v, list),
          "dict": lambda v: isinstance(v, dict),
          "[int]": lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
          "{str}": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())}[spec]
    if not ok(value):
        words = {"int": "a non-negative integer", "num": "a finite non-negative number", "[int]": "a list of integers",
                 "{str}": "an object of strings", "list": "a list", "dict": "an object"}
        raise _fail(source, f"{where} must be {words.get(spec, 'a ' + spec)}, got {value!r}")


def _check_fields(obj: dict, spec: dict, where: str, source: str, optional: frozenset = frozenset()) -> None:
    prefix = f"{where}." if where else ""
    for key in obj:
        if key not in spec:
            raise _fail(source, f"unknown field {prefix}{key} (typo? known: {', '.join(spec)})")
    for key, sub in spec.items():
        if key not in obj:
            if key in optional:
                continue
            raise _fail(source, f"missing field {prefix}{key}")
        _check(obj[key], sub, prefix + key, source)


def _check_schema(record: Any, source: str) -> None:
    if not isinstance(record, dict):
        raise ArtifactError(f"{source}: not a gpt2onnx bench record (top level is not an object)")
    schema = record.get("schema")
    if schema is None:
        raise ArtifactError(f"{source}: no 'schema' field, so not a gpt2onnx bench record; "
                            f"expected schema {SCHEMA}")
    m = re.fullmatch(r"gpt2onnx\.bench/(\d+)", str(schema))
    if m is None:
        raise ArtifactError(f"{source}: unknown schema {schema!r}; expected {SCHEMA}")
    version = int(m.group(1))
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{source}: schema {schema} is newer than this gpt2onnx (reads {SCHEMA}); "
                            "upgrade gpt2onnx")
    if version < SCHEMA_VERSION:
        raise ArtifactError(f"{source}: schema {schema} is older than this gpt2onnx (reads {SCHEMA}); "
                            "re-run the benchmark with this gpt2onnx")


def validate(record: dict, *, source: str) -> dict:
    """Check a bench record against schema gpt2onnx.bench/1.

    Args:
        record: the parsed JSON.
        source: where it came from (a path); named in every error.

    Returns:
        The same record.

    Raises:
        ArtifactError: wrong or missing schema, missing, unknown or mistyped fields.

    >>> validate({"schema": "gpt2onnx.bench/2"}, source="r.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    gpt2onnx.errors.ArtifactError: r.json: schema gpt2onnx.bench/2 is newer than this gpt2onnx ...; upgrade gpt2onnx
    """
    _check_schema(record, source)
    _check_fields(record, _TOP, "", source, frozenset(_OPTIONAL_TOP))
    try:
        datetime.fromisoformat(record["created"].replace("Z", "+00:00"))
    except ValueError:
        raise _fail(source, f"created is {record['created']!r}, not an ISO-8601 time") from None
    for name in _REQUIRED_VERSIONS:
        if name not in record["environment"]["versions"]:
            raise _fail(source, f"missing field environment.versions.{name}")
    if not record["results"]:
        raise _fail(source, "results is empty")
    for i, row in enumerate(record["results"]):
        where = f"results[{i}]"
        if not isinstance(row, dict):
            raise _fail(source, f"{where} must be an object")
        failed = row.get("error") is not None
        optional = {"error"}  # absent error = no error
        if failed:  # a failed row may carry null or missing figures; present ones are checked
            row = {k: v for k, v in row.items() if not (k in _ROW_FIGURES and v is None)}
            optional |= set(_ROW_FIGURES)
        _check_fields(row, {**_ROW_KEYS, **_ROW_FIGURES}, where, source, frozenset(optional))
        for key in ("batch_size", "new_tokens", "threads"):
            if row[key] < 1:
                raise _fail(source, f"{where}.{key} must be >= 1, got {row[key]}")
        if not failed and row["tokens_per_s"] <= 0:
            raise _fail(source, f"{where}.tokens_per_s must be > 0 for a row without error")
    return record


def load(path: str) -> dict:
    """Read and validate one bench record.

    Raises:
        ArtifactError: unreadable file, not JSON, or not a valid gpt2onnx.bench/1 record;
            the message names the file.

    >>> load("missing.json")
    Traceback (most recent call last):
    gpt2onnx.errors.ArtifactError: missing.json: cannot read bench record (No such file or directory); check the path
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read bench record ({e.strerror}); check the path") from e
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not a text file, so not a bench record (JSON expected)") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                            "the file is damaged, re-run the benchmark") from None
    return validate(record, source=path)


def dump(record: dict, path: str) -> None:
    """Validate `record` and write it to `path` atomically (temp file, then rename).

    >>> import tempfile, os
    >>> dump({}, os.path.join(tempfile.mkdtemp(), "r.json"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    gpt2onnx.errors.ArtifactError: ...r.json: no 'schema' field, ...
    """
    path = os.fspath(path)
    validate(record, source=path)
    atomic_write(path, (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def amx_off(record: dict) -> bool:
    """True when the CPU has AMX but the run could not use it (capped, "as on Cascade Lake").

    Such a record's gpt2onnx figures (and every runtime's that asks Linux for AMX) are not
    this machine's; they say what a CPU without AMX would do, with this machine's memory.

    >>> amx_off({"environment": {"isa": {"amx": True}, "amx_usable": False}})
    True
    >>> amx_off({"environment": {"isa": {"amx": False}, "amx_usable": None}})
    False
    """
    env = record["environment"]
    return bool(env["isa"].get("amx")) and env.get("amx_usable") is False


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(record: dict) -> list[dict]:
    """Speed-ups of every gpt2onnx row over each baseline row of the same shape.

    Rows match on batch_size, prompt_tokens and threads. Speed-ups are baseline /
    gpt2onnx for latencies (decode p50, first token p50) and gpt2onnx / baseline for
    tokens/s, so > 1 means gpt2onnx is faster. A failed baseline gives None ratios and
    its `baseline_error`. Failed gpt2onnx rows are skipped.

    >>> row = lambda rt, p, tok, first, tps: {"runtime": rt, "precision": p, "batch_size": 1,
    ...     "prompt_tokens": 8, "threads": 4, "token_ms": {"p50": tok}, "tokens_per_s": tps,
    ...     "first_token_ms": {"p50": first}, "error": None}
    >>> r = ratios({"results": [row("gpt2onnx", "int8", 10.0, 20.0, 100.0),
    ...                         row("pytorch", "fp32", 40.0, 60.0, 25.0)]})
    >>> (r[0]["baseline"], r[0]["decode_speedup"], r[0]["first_token_speedup"], r[0]["tokens_per_s_ratio"])
    ('pytorch', 4.0, 3.0, 4.0)
    """
    out = []
    rows = record["results"]
    for ours in rows:
        if ours["runtime"] != "gpt2onnx" or ours.get("error") is not None:
            continue
        for base in rows:
            if base["runtime"] == "gpt2onnx" or any(
                    base[k] != ours[k] for k in ("batch_size", "prompt_tokens", "threads")):
                continue
            failed = base.get("error") is not None
            out.append({
                "batch_size": ours["batch_size"], "prompt_tokens": ours["prompt_tokens"],
                "threads": ours["threads"], "precision": ours["precision"],
                "baseline": base["runtime"], "baseline_precision": base["precision"],
                "decode_speedup": None if failed else _div(base["token_ms"]["p50"], ours["token_ms"]["p50"]),
                "first_token_speedup": None if failed else
                _div(base["first_token_ms"]["p50"], ours["first_token_ms"]["p50"]),
                "tokens_per_s_ratio": None if failed else _div(ours["tokens_per_s"], base["tokens_per_s"]),
                "baseline_error": base.get("error"),
            })
    return out
