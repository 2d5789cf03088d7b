"""Batch input: one JSONL line of a batch job -> one `Row` per prompt, or an error row.

>>> from gpt2onnx.batch.rows import parse_line
>>> [r.prompt for r in parse_line(1, b'{"input_data": ["Hi", "Yo"]}', True, {})]
['Hi', 'Yo']
>>> parse_line(2, b'{"id": "x"}', True, {})[0].out["error"]
'line 2 has no "prompt" (or "input_data")'

A line is ``{"id": ..., "prompt": "...", <GenerationParams overrides>}`` or the Azure ML
request form ``{"input_data": ["...", ...], "params": {...}}``. Each row carries its key
``line << 24 | index``, the resume key that `gpt2onnx.batch.state` reads back from the
output. A row that cannot be generated (bad JSON, bad params, a prompt too long for the
context) gets its `out` set to ``{"id", "line", "index", "error"}`` here, so the job
writes it in its place and goes on.
"""

from __future__ import annotations

import array
import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError
from ..params import GenerationParams

MAX_PROMPTS_PER_LINE = 100_000  # keeps (line, index) packable into one int64 key
_INDEX_BITS = 24  # key = line << 24 | index
_LINE_KEYS = ("id", "prompt")
_REQUEST_KEYS = ("id", "input_data", "params")


@dataclass
class Row:
    """One prompt of the input on its way to the output."""

    key: int  # line << 24 | index: the resume key, also stored in the row as line + index
    id: Any
    line: int
    index: int
    last_of_line: bool
    prompt: str = ""
    params: GenerationParams | None = None
    tokens: int = 0  # prompt length in tokens, for grouping
    out: dict | None = None  # the finished output row (None while pending)
    done: bool = False  # already in the output from an earlier run


def row_key_of(line: int, index: int) -> int:
    return line << _INDEX_BITS | index


def read_rows(path: str, base: dict, done: array.array, gen) -> Iterator[Row]:
    """Yield a `Row` per prompt of the input: marked done, an error row, or to generate."""
    room_cache: dict = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")
            if raw.startswith(b"\xef\xbb\xbf"):  # a BOM: line 1, or any line of files joined with cat
                raw = raw[3:]
            if not raw.strip():
                continue
            for row in parse_line(n, raw.rstrip(b"\r\n"), complete, base):
                if _contains(done, row.key):
                    row.done = True
                    yield row
                    continue
                if row.out is None:
                    _measure(row, gen, room_cache)
                yield row


def _contains(sorted_keys: array.array, key: int) -> bool:
    i = bisect.bisect_left(sorted_keys, key)
    return i < len(sorted_keys) and sorted_keys[i] == key


def parse_line(n: int, raw: bytes, complete: bool, base: dict) -> list[Row]:
    """The rows of one input line; a bad line or prompt gets its `out` set to an error row."""

    def error(message: str, index: int = 0, id_=None, last=True) -> Row:
        row = Row(row_key_of(n, index), f"line-{n}" if id_ is None else id_, n, index, last)
        row.out = {"id": row.id, "line": n, "index": index, "error": one_line(message)}
        return row

    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return [error(f"line {n} is not valid UTF-8; save the file as UTF-8")]
    except (ValueError, RecursionError) as e:
        hint = " (the file ends with an incomplete line)" if not complete else ""
        if isinstance(e, json.JSONDecodeError):
            reason = f"{e.msg.removesuffix(' at')} at character {e.pos}"
        else:  # too deeply nested, or an integer with too many digits
            reason = "too deeply nested" if isinstance(e, RecursionError) else str(e).split(":")[0]
        return [error(f"line {n} is not valid JSON{hint}: {reason}")]
    if not isinstance(obj, dict):
        return [error(f"line {n} must be a JSON object with a \"prompt\", got {type(obj).__name__}")]
    id_ = obj.get("id")
    if isinstance(id_, (dict, list)):
        return [error(f"line {n}: id must be a string or a number")]
    if "input_data" not in obj:
        row = Row(row_key_of(n, 0), f"line-{n}" if id_ is None else id_, n, 0, True)
        overrides = {k: v for k, v in obj.items() if k not in _LINE_KEYS}
        if "prompt" not in obj:
            return [error(f"line {n} has no \"prompt\" (or \"input_data\")", id_=row.id)]
        return [_fill(row, obj["prompt"], overrides, base)]
    unknown = sorted(set(obj) - set(_REQUEST_KEYS))
    if unknown:
        return [error(f"line {n}: unknown key {unknown[0]!r} in an input_data line; "
                      f"allowed: {', '.join(_REQUEST_KEYS)}", id_=id_)]
    prompts, line_params = obj["input_data"], obj.get("params", {})
    if not isinstance(prompts, list) or not prompts:
        return [error(f"line {n}: input_data must be a non-empty list of prompts", id_=id_)]
    if len(prompts) > MAX_PROMPTS_PER_LINE:
        return [error(f"line {n} has {len(prompts)} prompts; split it into lines of at most "
                      f"{MAX_PROMPTS_PER_LINE:_}", id_=id_)]
    if not isinstance(line_params, dict):
        line_params = {"params": line_params}  # from_dict names the problem
    rows = []
    for k, prompt in enumerate(prompts):
        rid = f"{n}:{k}" if id_ is None else f"{id_}:{k}"
        rows.append(_fill(Row(row_key_of(n, k), rid, n, k, k == len(prompts) - 1), prompt, line_params, base))
    return rows


def _fill(row: Row, prompt, overrides: dict, base: dict) -> Row:
    if not isinstance(prompt, str):
        row.out = error_row(row, f"prompt must be a string, got {type(prompt).__name__}")
        return row
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        row.out = error_row(row, "prompt is not valid Unicode (lone surrogate escape); send UTF-8 text")
        return row
    try:
        row.params = GenerationParams.from_dict({**base, **overrides})
    except InvalidRequestError as e:
        row.out = error_row(row, str(e))
        return row
    row.prompt = prompt
    return row


def _measure(row: Row, gen, room_cache: dict) -> None:
    """Count the prompt's tokens; a prompt that cannot fit the context becomes an error row."""
    ids = gen.tokenizer.encode(row.prompt).ids if row.prompt else [gen.bos_token_id]
    row.tokens = len(ids)
    prm = row.params
    room = gen.n_positions - prm.max_new_tokens
    if room < 1:
        row.out = error_row(row, f"max_new_tokens {prm.max_new_tokens} leaves no room for a prompt in the "
                                  f"model's context of {gen.n_positions} tokens; use max_new_tokens <= "
                                  f"{gen.n_positions - 1}")
    elif row.tokens > room and not prm.truncation:
        row.out = error_row(row, f"prompt has {row.tokens} tokens; with max_new_tokens {prm.max_new_tokens} "
                                  f"that exceeds the context of {gen.n_positions} tokens; shorten it, lower "
                                  "max_new_tokens, or set \"truncation\": true")


def error_row(row: Row, message: str) -> dict:
    return {"id": row.id, "line": row.line, "index": row.index, "error": one_line(message)}


def one_line(message: str, limit: int = 400) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
