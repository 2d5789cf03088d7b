"""Ray Data: generate over a Dataset with one model per actor (extra ``[ray]``).

For example::

    import ray, gpt2onnx.integrations.ray as g2r
    ds = ray.data.read_json("prompts.jsonl")  # a "prompt" column, optional "id"
    out = ds.map_batches(g2r.Gpt2OnnxPredictor, fn_constructor_args=("models/gpt2-int8",),
                         fn_constructor_kwargs={"threads": 2}, num_cpus=2, batch_size=64,
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4))
    out.write_json("results/")

or, with the sizing done for you, ``g2r.generate_dataset(ds, "models/gpt2-int8", actors=4, threads=2)``.

Each actor loads the model folder once (in ``__init__``) and runs ``batch_size`` prompts
per model call. A Ray row is a line of ``gpt2onnx batch`` held in memory: rows go through
the same core (`gpt2onnx.batch.iter_results`, no temporary file), so a row gives exactly
what ``gpt2onnx batch`` gives for the same line: same text for greedy or seeded sampling,
the same error messages. A bad row (no prompt, a prompt that is not a string, a bad or
misspelt parameter) gets its ``error`` and the others go on. Size it so actors x threads
= physical cores (docs/ray.md). This module does not import ray; Ray imports it on the
workers, so gpt2onnx must be installed there (or shipped with ``runtime_env={"py_modules":
[...]}``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from typing import Any

import numpy as np

from ..batch import iter_results
from ..batch.core import check_batch_size
from ..errors import ArtifactError, InvalidRequestError, first_line
from ..params import GenerationParams, looks_like_param, resolve

# Integer parameters: Arrow turns an int column with nulls into float64, so 5.0 must read as 5.
INT_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationParams) if f.type in ("int", "int | None"))


class Gpt2OnnxPredictor:
    """A callable class for `ray.data.Dataset.map_batches`: prompts in, generations out.

    Input columns: ``prompt``, ``id`` (optional, passed through), and any generation
    parameter (``max_new_tokens``, ``seed``, ...) to set per row; a missing value
    (None/NaN) keeps the job default. A column named like a parameter but misspelt
    (``tempreature``) gives its rows an error with a did-you-mean; other columns are
    ignored. Output columns: the input's ``id`` and ``prompt``, then ``text``,
    ``prompt_tokens``, ``generated_tokens``, ``finish_reason`` and ``error`` (None, or
    the one-line reason this row has no text). One output row per input row; a bad row
    never stops the job.

    Args:
        model_dir: the model folder; it must exist on every node that runs an actor.
        threads: onnxruntime intra-op threads of this actor; give the actor as many
            CPUs (``num_cpus``).
        params: job defaults (GenerationParams or dict); a row's own columns win.
        batch_size: prompts per model call, 1 to 1024 (a Ray batch is split into these).

    Raises:
        ArtifactError: the model folder is missing or damaged on this node (the message
            names the node).
        InvalidRequestError: `params` or `batch_size` is invalid (at actor start).

    For example::

        pred = Gpt2OnnxPredictor("models/gpt2-int8", params={"max_new_tokens": 5})
        out = pred({"prompt": np.array(["Hello", None], dtype=object)})
        list(out["error"])
        # -> [None, 'the row has no "prompt" (or "input_data"); give each row the text to continue as "prompt"']
    """

    def __init__(self, model_dir: str, *, threads: int = 1, params: GenerationParams | dict | None = None,
                 batch_size: int = 8):
        from ..runtime import load

        check_batch_size(batch_size)
        self.params = resolve(params)  # a bad job setting fails at actor start, not on every row
        self.batch_size = batch_size
        try:
            self.generator = load(os.fspath(model_dir), threads=threads)
        except ArtifactError as e:
            raise ArtifactError(f"{e} (on Ray node {socket.gethostname()}, pid {os.getpid()}: the model folder must "
                                "exist on every node; use shared storage or copy it to each node)") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()))) if batch else 0
        param_cols = [k for k in batch if k not in ("id", "prompt") and looks_like_param(k)]
        requests: list[dict | None] = []
        unreadable: dict[int, str] = {}
        for i in range(n):
            try:
                requests.append(_request(batch, i, param_cols))
            except Exception as e:  # a cell numpy cannot give back as a plain value: this row only
                requests.append(None)
                unreadable[i] = f"row cannot be read ({first_line(e, 300, with_type=True)})"
        by_line = {r["line"]: r for r in iter_results(self.generator, requests, batch_size=self.batch_size,
                                                      params=self.params)}
        # request i is line i + 1 and gives one row (a None gives none): "prompt" is never "input_data"
        ordered = [by_line.get(i + 1) or {"error": unreadable.get(i, "no result for this row")} for i in range(n)]
        out: dict[str, np.ndarray] = {}
        if "id" in batch:
            out["id"] = batch["id"]
        out["prompt"] = batch["prompt"] if "prompt" in batch else _column([None] * n)
        out["text"] = _column([r.get("text") for r in ordered])
        out["prompt_tokens"] = np.asarray([r.get("prompt_tokens", 0) for r in ordered], np.int64)
        out["generated_tokens"] = np.asarray([r.get("generated_tokens", 0) for r in ordered], np.int64)
        out["finish_reason"] = _column([r.get("finish_reason") for r in ordered])
        out["error"] = _column([r.get("error") for r in ordered])
        return out


def _request(batch: dict[str, np.ndarray], i: int, param_cols: list[str]) -> dict[str, Any]:
    """Row i as a batch line: its prompt (left out when null: the missing-prompt error) and non-null params."""
    request: dict[str, Any] = {}
    prompt = _python(batch["prompt"][i]) if "prompt" in batch else None
    if not _missing(prompt):
        request["prompt"] = prompt
    for key in param_cols:
        value = _python(batch[key][i])
        if _missing(value):
            continue
        if key in INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        request[key] = value
    return request


def generate_dataset(ds, model_dir: str, *, actors: int = 1, threads: int = 1,
                     params: GenerationParams | dict | None = None, batch_size: int = 8,
                     rows_per_call: int = 64):
    """``ds.map_batches(Gpt2OnnxPredictor, ...)`` with actors x threads CPUs reserved.

    Args:
        ds: a `ray.data.Dataset` with a ``prompt`` column.
        model_dir: the model folder, present on every node.
        actors: model replicas (processes) at most; each reserves ``threads`` CPUs. Ray
            starts one and adds more while input waits and CPUs are free.
        threads: onnxruntime intra-op threads per actor.
        params, batch_size: as for `Gpt2OnnxPredictor`.
        rows_per_call: rows Ray hands an actor at once (a multiple of batch_size).

    Returns:
        The lazy output Dataset (see `Gpt2OnnxPredictor` for its columns).

    For example::

        generate_dataset(ray.data.read_json("in.jsonl"), "models/gpt2-int8", actors=2, threads=2)
    """
    import ray.data

    for name, value in (("actors", actors), ("threads", threads), ("rows_per_call", rows_per_call)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    return ds.map_batches(
        Gpt2OnnxPredictor,
        fn_constructor_args=(os.fspath(model_dir),),
        fn_constructor_kwargs={"threads": threads, "params": params, "batch_size": batch_size},
        batch_size=rows_per_call,
        batch_format="numpy",
        num_cpus=threads,  # Ray places an actor only where its threads have cores
        # An autoscaling pool: a fixed pool of actors x threads = all CPUs holds every CPU
        # before the read tasks run, and the job waits forever for its input.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )


def _python(value):
    """A numpy/arrow cell as a plain Python value (JSON-ready)."""
    if isinstance(value, np.ndarray):
        return [_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_python(v) for v in value]
    return value


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _column(values: list) -> np.ndarray:
    col = np.empty(len(values), dtype=object)  # keeps None as None (a null in Arrow)
    col[:] = values
    return col
