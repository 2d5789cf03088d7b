"""Azure ML batch-endpoint scoring entry: ``init()`` once per process, ``run(mini_batch)`` per mini-batch.

A batch deployment hands `run` input file paths: JSONL in the `gpt2onnx batch` line format, or
CSV/TSV with a ``prompt`` column (and optional ``id`` and parameter columns). Every prompt of
every file gives one JSON row, ``{"file", "id", "line", "index", ...}`` with the result or an
``"error"``, in file then line order (``output_action: append_row``), or one output file per
input (``GPT2ONNX_OUTPUT=files``). Rows run in memory through the core of ``gpt2onnx batch``
(`gpt2onnx.batch.iter_results`: the same parsing, checks, batching and error rows) with no file,
lock or fsync of their own: Azure ML retries a failed mini-batch whole. A bad line, record or
file becomes error rows naming the file; the job goes on. The ``GPT2ONNX_*`` variables, the
formats and a deployment: docs/azureml_batch.md.
"""

from __future__ import annotations

import csv
import json
import logging
import os

from .. import artifact
from ..batch import iter_results
from ..batch.core import iter_batches
from ..batch.rows import read_lines
from ..errors import ArtifactError, Gpt2OnnxError, InvalidRequestError
from ..fsutil import atomic_write_text
from ..params import looks_like_param
from ..cpu import threads_from_env
from . import deployment_log

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}

_log = logging.getLogger(__name__)
_state: dict = {}  # set by init(): generator, params, batch_size


def init() -> None:
    """Load the model once per process (Azure ML calls this before any `run`).

    Raises:
        ArtifactError: no model folder under AZUREML_MODEL_DIR, or more than one.
        InvalidRequestError: a GPT2ONNX_* variable is invalid.
    """
    from ..params import GenerationParams
    from ..runtime import load

    params = _env_params()
    job = GenerationParams.from_dict(params)  # a bad job config fails the deployment, not every row
    batch_size = _env_batch_size()
    output_dir = _env_output_dir()
    model_dir = find_model_dir()
    gen = load(model_dir, threads=threads_from_env())
    _state.update(generator=gen, params=job, batch_size=batch_size, output_dir=output_dir)
    deployment_log().info("gpt2onnx: loaded %s (%s, %d threads), batch size %d, params %s, output %s", model_dir,
                          gen.manifest.precision, gen.threads, batch_size, json.dumps(params),
                          "files" if output_dir else "rows")


def run(mini_batch: list[str]) -> list[str]:
    """Generate for every prompt of every file of a mini-batch; one JSON string per output row.

    For example::

        run(["/mnt/inputs/part-001.jsonl"])[0]
        # -> '{"file": "part-001.jsonl", "id": "q1", "line": 1, "index": 0, "text": "...", ...}'
    """
    if "generator" not in _state:
        raise Gpt2OnnxError("init() has not been called; Azure ML calls it first, call it yourself outside Azure ML")
    out: list[str] = []
    for path in mini_batch:
        path = os.fspath(path)
        lines = [json.dumps({"file": os.path.basename(path), **row}, ensure_ascii=False) for row in score_file(path)]
        if _state.get("output_dir"):
            _write_lines(os.path.join(_state["output_dir"], os.path.basename(path) + ".out.jsonl"), lines)
            out.append(path)  # one element per file: the file is done
        else:
            out += lines
    return out


def _write_lines(path: str, lines: list[str]) -> None:
    """Write a JSONL file atomically: a retried mini-batch replaces it, never appends twice."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def score_file(path: str) -> list[dict]:
    """The output rows of one input file; problems become error rows, never exceptions."""
    gen, params, batch_size = _state["generator"], _state["params"], _state["batch_size"]
    name = os.path.basename(path)
    suffix = os.path.splitext(path)[1].lower()
    try:
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist"
            return [_file_error(f"cannot read {name}: it {what}")]
        if suffix in JSONL_SUFFIXES:
            rows = iter_batches(gen, read_lines(path, params), batch_size=batch_size)
            return [row.out for ready in rows for row in ready]
        if suffix in CSV_SUFFIXES:
            requests, errors = read_csv(path, delimiter=CSV_SUFFIXES[suffix])
            return _merge(list(iter_results(gen, requests, batch_size=batch_size, params=params)), errors)
        return [_file_error(f"{name}: unsupported file type {suffix or '(none)'!r}; "
                            f"use {', '.join(JSONL_SUFFIXES + tuple(CSV_SUFFIXES))}")]
    except (Gpt2OnnxError, OSError, UnicodeDecodeError) as e:
        return [_file_error(f"cannot read {name}: {e}")]
    except Exception as e:  # a bug must not kill the other files of the job; the log keeps the traceback
        _log.exception("gpt2onnx: internal error on %s", path)
        return [_file_error(f"internal error on {name}: {e.__class__.__name__}: {e}")]


def read_csv(path: str, *, delimiter: str = ",") -> tuple[list[dict | None], list[dict]]:
    """Turn a CSV file into batch requests (one per record) and error rows.

    Returns:
        (requests, errors): ``requests[n - 1]`` is record n as a batch line object, or
        None when record n is an error row in ``errors``.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "part-1.csv")
    >>> with open(path, "w", encoding="utf-8") as f:
    ...     _ = f.write('id,prompt,max_new_tokens\\nx,The tower is,20\\n')
    >>> read_csv(path)
    ([{'id': 'x', 'prompt': 'The tower is', 'max_new_tokens': 20}], [])
    """
    requests: list[dict | None] = []
    errors: list[dict] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        if "prompt" not in header:
            raise InvalidRequestError(f"the header has no 'prompt' column (columns: {', '.join(header) or 'none'})")
        while True:
            n = len(requests) + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                requests.append(None)
                errors.append({"id": f"line-{n}", "line": n, "index": 0,
                               "error": f"record {n} cannot be parsed ({e}); the rest of the file was not read"})
                break
            requests.append(_csv_request(record))
    return requests, errors


def _csv_request(record: dict) -> dict:
    request: dict = {}
    if record.get("id") not in (None, ""):
        request["id"] = record["id"]
    if record.get("prompt") is not None:  # None: a short record; the core reports the missing prompt
        request["prompt"] = record["prompt"]
    for key, cell in record.items():
        if key in ("id", "prompt") or not looks_like_param(key) or cell is None or cell.strip() == "":
            continue
        try:
            request[key] = json.loads(cell)
        except ValueError:
            request[key] = cell  # not JSON: GenerationParams names the bad value in the error row
    return request


def _merge(rows: list[dict], errors: list[dict]) -> list[dict]:
    return sorted(rows + errors, key=lambda r: (r["line"], r["index"]))


def _file_error(message: str) -> dict:
    return {"id": None, "line": 0, "index": 0, "error": " ".join(message.split())}


# -- configuration -----------------------------------------------------------------------


def find_model_dir(root: str | None = None) -> str:
    """The model folder: GPT2ONNX_MODEL_DIR, else the one the online entry finds under AZUREML_MODEL_DIR.

    A model registered from a folder is mounted as ``$AZUREML_MODEL_DIR/<folder>/`` and is
    found (`gpt2onnx.azureml.find_model_dir`); for any other layout, e.g. an MLflow model
    made by ``gpt2onnx mlflow`` (``<folder>/artifacts/<model>/``), set GPT2ONNX_MODEL_DIR.
    """
    from .azureml import find_model_dir as find_below

    base = root if root is not None else os.environ.get("AZUREML_MODEL_DIR")
    explicit = os.environ.get("GPT2ONNX_MODEL_DIR")
    if explicit:
        path = explicit if os.path.isabs(explicit) or not base else os.path.join(base, explicit)
        artifact.read_manifest(path)  # a clear error if it is not a model folder
        return path
    if not base:
        raise ArtifactError("AZUREML_MODEL_DIR is not set (not running in Azure ML?); set GPT2ONNX_MODEL_DIR "
                            "to the model folder")
    try:
        return find_below(base)
    except ArtifactError as e:
        raise ArtifactError(f"{e}; or set GPT2ONNX_MODEL_DIR to the model folder (relative to "
                            "AZUREML_MODEL_DIR or absolute)") from None


def _env_params() -> dict:
    text = os.environ.get("GPT2ONNX_PARAMS", "").strip()
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError as e:
        raise InvalidRequestError(f"GPT2ONNX_PARAMS is not valid JSON ({e}); set it to an object like "
                                  '{"max_new_tokens": 40}') from None
    if not isinstance(params, dict):
        raise InvalidRequestError('GPT2ONNX_PARAMS must be a JSON object like {"max_new_tokens": 40}')
    return params


def _env_output_dir() -> str | None:
    mode = os.environ.get("GPT2ONNX_OUTPUT", "rows").strip() or "rows"
    if mode == "rows":
        return None
    if mode != "files":
        raise InvalidRequestError(f"GPT2ONNX_OUTPUT={mode!r} must be 'rows' or 'files'")
    out = os.environ.get("AZUREML_BI_OUTPUT_PATH")
    if not out or not os.path.isdir(out):
        raise InvalidRequestError("GPT2ONNX_OUTPUT=files writes into AZUREML_BI_OUTPUT_PATH, which is "
                                  f"{'not set' if not out else 'not a folder: ' + repr(out)}; use it in an Azure ML "
                                  "batch deployment with output_action: summary_only")
    return out


def _env_batch_size() -> int:
    text = os.environ.get("GPT2ONNX_BATCH_SIZE", "").strip()
    if not text:
        return 8
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise InvalidRequestError(f"GPT2ONNX_BATCH_SIZE={text!r} must be an integer in [1, 1024]")
    return int(text)
