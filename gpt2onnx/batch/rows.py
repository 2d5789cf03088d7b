"""Batch input: one request of a batch job (a JSONL line or a dict) -> one `Row` per prompt; and the output row.

>>> from gpt2onnx.params import DEFAULTS
>>> [r.prompt for r in parse_line(1, b'{"input_data": ["Hi", "Yo"]}', True, DEFAULTS)]
['Hi', 'Yo']
>>> parse_request(2, {"id": "x"}, DEFAULTS)[0].out["error"]
'the row has no "prompt" (or "input_data"); give each row the text to continue as "prompt"'

A request is ``{"id": ..., "prompt": "...", <GenerationParams overrides>}`` or the Azure
ML request form ``{"input_data": ["...", ...], "params": {...}}``. Each row carries its
key ``line << 24 | index``, the resume key that `gpt2onnx.batch.state` reads back from
the output, and its parameters: the job's `GenerationParams` with the request's own on
top (`GenerationParams.merge`, the one place they are checked). With a job seed, a row
that sets no seed of its own gets one derived from the job seed and its key (`row_seed`,
as vLLM gives each request its own seed), so a sampled job gives the same text however it
is batched, split over workers or resumed. A line
that is not JSON, not an object, of the wrong shape or with a bad parameter gets its
`out` set to ``{"id", "line", "index", "error"}`` here (`output_row` shapes every
output row); the prompt is checked when the core (`gpt2onnx.batch.core`) prepares it.
"""

from __future__ import annotations

import array
import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError, first_line
from ..params import GenerationParams

MAX_PROMPTS_PER_LINE = 100_000  # keeps (line, index) packable into one int64 key
_INDEX_BITS = 24  # key = line << 24 | index
_LINE_KEYS = ("id", "prompt")
_REQUEST_KEYS = ("id", "input_data", "params")
NO_PROMPT = 'the row has no "prompt" (or "input_data"); give each row the text to continue as "prompt"'


@dataclass
class Row:
    """One prompt of the input on its way to the output."""

    key: int  # line << 24 | index: the resume key, also stored in the row as line + index
    id: Any
    line: int
    index: int
    prompt: Any = None  # as given: Generator.prepare checks it
    params: GenerationParams | None = None  # the job's defaults + the request's own (None for an error row)
    request: Any = None  # the runtime.Request, once prepared
    out: dict | None = None  # the finished output row (None while pending)
    done: bool = False  # already in the output from an earlier run
    worker: int | None = None  # the worker process that generated it (`gpt2onnx.batch.pool`); None: this one

    @property
    def tokens(self) -> int:
        """Prompt length in tokens (0 until prepared), for grouping rows of similar length."""
        return len(self.request.input_ids) if self.request is not None else 0


def row_key_of(line: int, index: int) -> int:
    return line << _INDEX_BITS | index


def read_lines(path: str, base: GenerationParams, done: array.array | None = None, *,
               seed: int | None = None) -> Iterator[Row]:
    """Yield a `Row` per prompt of a JSONL file: marked done (its key is in `done`), an error row, or pending."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")
            if raw.startswith(b"\xef\xbb\xbf"):  # a BOM: line 1, or any line of files joined with cat
                raw = raw[3:]
            if not raw.strip():
                continue
            for row in parse_line(n, raw.rstrip(b"\r\n"), complete, base, seed=seed):
                row.done = done is not None and _contains(done, row.key)
                yield row


def _contains(sorted_keys: array.array, key: int) -> bool:
    i = bisect.bisect_left(sorted_keys, key)
    return i < len(sorted_keys) and sorted_keys[i] == key


def parse_line(n: int, raw: bytes, complete: bool, base: GenerationParams, *, seed: int | None = None
               ) -> list[Row]:
    """The rows of JSONL line `n`; a line that is not a JSON request gives one error row."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return [_error(n, f"line {n} is not valid UTF-8; save the file as UTF-8")]
    except (ValueError, RecursionError) as e:
        hint = " (the file ends with an incomplete line)" if not complete else ""
        if isinstance(e, json.JSONDecodeError):
            reason = f"{e.msg.removesuffix(' at')} at character {e.pos}"
        else:  # too deeply nested, or an integer with too many digits
            reason = "too deeply nested" if isinstance(e, RecursionError) else str(e).split(":")[0]
        return [_error(n, f"line {n} is not valid JSON{hint}: {reason}")]
    return parse_request(n, obj, base, seed=seed)


def parse_request(n: int, obj: Any, base: GenerationParams, *, seed: int | None = None) -> list[Row]:
    """The rows of request `n` (a decoded JSON object); a malformed request gives one error row.

    Args:
        n: the request's line number (1-based), kept in its rows and their ids.
        obj: ``{"id", "prompt", <params>}`` (or its parameters in ``"params": {...}``), or
            ``{"id", "input_data": [...], "params": {...}}``.
        base: the job's default parameters; the request's own win.
        seed: the job seed: a row with no seed of its own gets `row_seed` (None: the rows keep `base.seed`).
    """
    if not isinstance(obj, dict):
        return [_error(n, f"line {n} must be a JSON object with a \"prompt\", got {type(obj).__name__}")]
    id_ = obj.get("id")
    if isinstance(id_, (dict, list)):
        return [_error(n, f"line {n}: id must be a string or a number")]
    if "input_data" not in obj:
        if "prompt" not in obj:
            return [_error(n, NO_PROMPT, id_=id_)]
        rows = [Row(row_key_of(n, 0), f"line-{n}" if id_ is None else id_, n, 0, obj["prompt"])]
        own = {k: v for k, v in obj.items() if k not in _LINE_KEYS and k != "params"}
        nested = obj.get("params", {})  # the request format's "params" object is welcome here too
        if not isinstance(nested, dict):
            return [_error(n, f"line {n}: params must be a JSON object of generation parameters", id_=id_)]
        both = sorted(set(nested) & set(own), key=str)
        if both:
            return [_error(n, f"line {n} sets {both[0]!r} both at the top level and in \"params\"; keep one",
                           id_=id_)]
        return _with_params(rows, {**nested, **own}, base, seed)
    unknown = sorted(set(obj) - set(_REQUEST_KEYS), key=str)
    if unknown:
        return [_error(n, f"line {n}: unknown key {unknown[0]!r} in an input_data line; "
                          f"allowed: {', '.join(_REQUEST_KEYS)}", id_=id_)]
    prompts = obj["input_data"]
    if not isinstance(prompts, list) or not prompts:
        return [_error(n, f"line {n}: input_data must be a non-empty list of prompts", id_=id_)]
    if len(prompts) > MAX_PROMPTS_PER_LINE:
        return [_error(n, f"line {n} has {len(prompts)} prompts; split it into lines of at most "
                          f"{MAX_PROMPTS_PER_LINE:_}", id_=id_)]
    rows = [Row(row_key_of(n, k), f"{n}:{k}" if id_ is None else f"{id_}:{k}", n, k, prompt)
            for k, prompt in enumerate(prompts)]
    return _with_params(rows, obj.get("params", {}), base, seed)


def _with_params(rows: list[Row], own: Any, base: GenerationParams, seed: int | None) -> list[Row]:
    """Give each row the job's parameters with the request's `own` on top; bad ones make every row an error row."""
    for row in rows:
        mine = own
        if seed is not None and isinstance(own, dict) and "seed" not in own:  # a row's own seed wins
            mine = {**own, "seed": row_seed(seed, row.line, row.index)}
        try:
            row.params = base.merge(mine)
        except InvalidRequestError as e:
            row.out = error_row(row, str(e))
    return rows


def row_seed(job_seed: int, line: int, index: int) -> int:
    """The seed of row (line, index) of a job: independent of every other row's, the same in every run.

    numpy's `SeedSequence` (how numpy derives parallel streams) mixes the job seed with the row's key.

    >>> row_seed(7, 1, 0) == row_seed(7, 1, 0) != row_seed(7, 2, 0)
    True
    """
    import numpy as np

    state = np.random.SeedSequence(job_seed, spawn_key=(line, index)).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # below 2**63, as GenerationParams.seed must be


def _error(n: int, message: str, id_=None) -> Row:
    row = Row(row_key_of(n, 0), f"line-{n}" if id_ is None else id_, n, 0)
    row.out = error_row(row, message)
    return row


def output_row(row: Row, **fields) -> dict:
    """The output line of a row: ``{"id", "line", "index"}`` then its result's fields or its ``"error"``."""
    return {"id": row.id, "line": row.line, "index": row.index, **fields}


def error_row(row: Row, message: str) -> dict:
    """The output row of a prompt that cannot be generated: ``{"id", "line", "index", "error"}``."""
    return output_row(row, error=first_line(message, 400))
