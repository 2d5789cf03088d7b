"""Optional integrations with serving and data platforms.

Each module imports its platform only when used, so importing one never fails for lack
of an extra, and the CLI can register their commands without paying for the import:

- `gpt2onnx.integrations.mlflow` (extra ``[mlflow]``): package a model folder as an
  MLflow pyfunc model with the Azure ML gpt2 signature (`package_mlflow`).
- `gpt2onnx.integrations.azureml_batch`: Azure ML batch-endpoint scoring entry
  (`init` / `run` over JSONL and CSV files), on top of `gpt2onnx.batch`.
- `gpt2onnx.integrations.ray` (extra ``[ray]``; also `gpt2onnx.ray`): a callable class for
  `ray.data.Dataset.map_batches` (`Gpt2OnnxPredictor`).
"""

import os

THREADS_ENV = "GPT2ONNX_THREADS"  # intra-op threads of a Generator built by an integration


def threads_from_env(environ=None) -> int | None:
    """Intra-op threads from ``GPT2ONNX_THREADS``; None (unset or empty) means physical cores.

    >>> threads_from_env({"GPT2ONNX_THREADS": "4"})
    4
    """
    from ..errors import InvalidRequestError

    value = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidRequestError(f"{THREADS_ENV}={value!r} is not a positive integer; set it to the number of "
                                  "intra-op threads per process (e.g. 4) or unset it for the physical cores")
    return int(value)
