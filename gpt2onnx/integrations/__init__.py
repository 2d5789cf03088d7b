"""Optional integrations with serving and data platforms.

Each module imports its platform only when used, so importing one never fails for lack
of an extra, and the CLI can register their commands without paying for the import:

- `gpt2onnx.integrations.azureml` (extra ``[azureml]``): the Azure ML online-endpoint
  scoring entry (`init` / `run`); `gpt2onnx.integrations.azureml_kit` writes its
  deployment kit.
- `gpt2onnx.integrations.mlflow` (extra ``[mlflow]``): package a model folder as an
  MLflow pyfunc model with the Azure ML gpt2 signature (`package_mlflow`).
- `gpt2onnx.integrations.azureml_batch`: Azure ML batch-endpoint scoring entry
  (`init` / `run` over JSONL and CSV files), on top of `gpt2onnx.batch`.
- `gpt2onnx.integrations.ray` (extra ``[ray]``): a callable class for
  `ray.data.Dataset.map_batches` (`Gpt2OnnxPredictor`).
"""

import os

from ..cpu import THREADS_ENV, threads_from_env  # noqa: F401  (the integrations' thread setting)


def generate_rows(gen, requests, *, batch_size: int = 8, params=None) -> list[dict]:
    """Run request objects through `gpt2onnx.batch`; returns its output rows, in order.

    Each request is a JSONL line of the batch format (``{"id", "prompt", <params>}`` or
    ``{"input_data": [...], "params": {...}}``); None stands for a blank line, which
    keeps the line numbers of the others. Every prompt gives one row: ``{"id", "line",
    "index", "text", "prompt_tokens", "generated_tokens", "finish_reason", "seconds"}``
    or ``{"id", "line", "index", "error"}``.

    This goes through a temporary JSONL file so that the integrations parse, validate,
    batch and report errors exactly as ``gpt2onnx batch`` does, with no second copy of
    that logic.

    >>> generate_rows(gen, [{"id": "a", "prompt": "Hello"}], params={"max_new_tokens": 5})  # doctest: +SKIP
    [{'id': 'a', 'line': 1, 'index': 0, 'text': 'Hello, ...', ...}]
    """
    import json
    import tempfile

    from ..batch import run_batch

    with tempfile.TemporaryDirectory(prefix="gpt2onnx-rows-") as tmp:
        src, dst = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            for request in requests:
                # ASCII escapes keep a lone surrogate intact, so batch.py reports it as it would in a file
                f.write("\n" if request is None else json.dumps(request, default=str) + "\n")
        run_batch(gen, src, dst, batch_size=batch_size, params=params, progress=False)
        return read_jsonl(dst)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file written by `gpt2onnx.batch`."""
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
