"""The served MLflow pyfunc model: prompts in, completions out, with the Azure ML gpt2 params.

For example::

    import mlflow
    model = mlflow.pyfunc.load_model("out/gpt2-int8-mlflow")
    model.predict(["Hello,"], params={"max_new_tokens": 20, "seed": 1})
    # -> ['Hello, ...']

`gpt2onnx.integrations.mlflow` packages a model folder with this model (its code file
calls `python_model()`). Every prompt goes through `Generator.prepare`, so a request is
checked as everywhere else; a bad one, a misspelt param included, is an MLflow
invalid-parameter error (HTTP 400 from the scoring server) with the one-line reason.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import Gpt2OnnxError, InvalidRequestError
from ..cpu import threads_from_env

# The params of the Azure ML registry's gpt2 MLflow model (azureml-assets
# assets/models/system/gpt2/MLmodel): name, MLflow type, default. Its pipeline samples by
# default, at temperature 0.8; these defaults apply when a request leaves a param out.
CARD_PARAMS: tuple[tuple[str, str, Any], ...] = (
    ("top_p", "float", 1.0),
    ("temperature", "float", 0.8),
    ("max_new_tokens", "integer", 50),
    ("do_sample", "boolean", True),
    ("return_full_text", "boolean", True),
)
# The rest of GenerationParams, with its (Hugging Face) defaults; MLflow drops params the
# signature does not list, so every one a request may set must be here.
EXTRA_PARAMS: tuple[tuple[str, str, Any], ...] = (
    ("top_k", "long", 50),
    ("repetition_penalty", "float", 1.0),
    ("seed", "long", None),
    ("stop", "string[]", []),
    ("ignore_eos", "boolean", False),
    ("truncation", "boolean", False),
)
PARAM_DEFAULTS = {name: default for name, _, default in CARD_PARAMS + EXTRA_PARAMS}
BATCH_SIZE = 8  # prompts per generate call in predict(); bounds padding and memory


def require_mlflow():
    """The mlflow module, or a one-line error naming the extra to install."""
    try:
        import mlflow  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
    except ImportError:
        raise Gpt2OnnxError("MLflow is not installed; pip install 'gpt2onnx[mlflow]' "
                            "(mlflow-skinny and pandas)") from None
    return sys.modules["mlflow"]


class _Pyfunc:
    """The methods of the pyfunc model; `python_model()` mixes them into an mlflow PythonModel.

    Kept apart from mlflow so importing this module (the CLI does) costs nothing.
    """

    def load_context(self, context) -> None:
        from ..runtime import load

        config = dict(getattr(context, "model_config", None) or {})
        threads = config.get("threads") or threads_from_env()
        self.batch_size = int(config.get("batch_size") or BATCH_SIZE)
        self.generator = load(context.artifacts["model_dir"], threads=threads)
        schema_log = logging.getLogger("mlflow.models.utils")  # where MLflow reports the params it drops
        if not any(type(f).__name__ == "_DroppedParams" for f in schema_log.filters):
            schema_log.addFilter(_DroppedParams())
        _refuse_extra_columns()

    def predict(self, context, model_input, params=None) -> list[str]:
        """One completion per input row, as strings, in order (the Azure ML gpt2 response)."""
        from mlflow.exceptions import MlflowException

        try:
            _refuse_dropped_params()
            gp = generation_params(params)
            requests = []
            for i, prompt in enumerate(_prompts(model_input)):
                try:
                    requests.append(self.generator.prepare(prompt, gp))
                except InvalidRequestError as e:
                    raise InvalidRequestError(f"input row {i}: {e}") from None
            texts: list[str] = []
            for i in range(0, len(requests), self.batch_size):
                texts += [r.text for r in self.generator.generate_batch(requests[i:i + self.batch_size])]
            return texts
        except InvalidRequestError as e:  # the scoring server answers 400 instead of 500
            raise MlflowException.invalid_parameter_value(str(e)) from None


class _DroppedParams(logging.Filter):
    """Notes the params MLflow drops before `predict` on the request's prediction context.

    MLflow keeps only the signature's params and logs a warning about the others, so a
    misspelt one ("tempreature") would be ignored; `predict` refuses it with a did-you-mean
    instead, as every other gpt2onnx entry does.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            found = re.match(r"Unrecognized params (\[.*?\]) are ignored", record.getMessage())
            ctx = _prediction_context() if found else None
            if ctx is not None:
                ctx.gpt2onnx_dropped_params = ast.literal_eval(found.group(1))  # Context takes new attributes
        except Exception:  # another MLflow wording or version: the params stay dropped, as MLflow logs
            pass
        return True


def _refuse_extra_columns() -> None:
    """Refuse a DataFrame of several columns before MLflow keeps only its first one.

    The signature (the Azure ML gpt2 card's) is one unnamed string column, and MLflow checks
    only that an input has at least that many columns, then passes the first one on
    silently: a table {"id", "prompt"} would generate from its ids. There is no MLflow
    option to refuse that, so this wraps `mlflow.pyfunc._validate_prediction_input` (the
    check every `PyFuncModel.predict` runs, the scoring server's included): an input of more
    columns than a one-unnamed-string-column signature declares is an invalid-parameter
    error (HTTP 400) naming its columns. Installed once per process, by `load_context`;
    other models in the process with that same signature get the refusal too. Where MLflow
    has no such function (another version), inputs go through unchanged, as MLflow does.
    """
    import mlflow.pyfunc as pyfunc

    original = getattr(pyfunc, "_validate_prediction_input", None)
    if original is None or getattr(original, "gpt2onnx_guard", False):
        return

    def validate(data, params, input_schema, *args, **kwargs):
        cols = list(getattr(data, "columns", []))
        spec = getattr(input_schema, "inputs", None) or []
        if len(cols) > 1 and len(spec) == 1 and getattr(spec[0], "name", "") is None and \
                str(getattr(spec[0], "type", "")).endswith("string"):
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(
                f"the input has {len(cols)} columns {[str(c) for c in cols]}; send one string column of prompts "
                "(or a list of strings), e.g. df[['prompt']]")
        return original(data, params, input_schema, *args, **kwargs)

    validate.gpt2onnx_guard = True
    pyfunc._validate_prediction_input = validate


def _prediction_context():
    try:
        from mlflow.pyfunc.context import get_prediction_context
    except ImportError:  # an MLflow without it: dropped params are only logged, as MLflow does
        return None
    return get_prediction_context()


def _refuse_dropped_params() -> None:
    ctx = _prediction_context()
    dropped = getattr(ctx, "gpt2onnx_dropped_params", None)
    if dropped:
        ctx.gpt2onnx_dropped_params = None
        from ..params import GenerationParams

        GenerationParams.from_dict(dict.fromkeys(sorted(dropped, key=str)))  # raises the did-you-mean error


def python_model():
    """A new pyfunc model object (an `mlflow.pyfunc.PythonModel`); used by the model's code file."""
    mlflow = require_mlflow()

    cls = type("Gpt2OnnxPythonModel", (_Pyfunc, mlflow.pyfunc.PythonModel),
               {"__module__": __name__, "__doc__": "gpt2onnx text generation as an MLflow pyfunc model."})
    return cls()


def generation_params(params: Mapping[str, Any] | None):
    """MLflow request params -> GenerationParams; a missing param takes the signature default.

    >>> generation_params({"max_new_tokens": 5}).temperature
    0.8
    """
    from ..params import GenerationParams

    if params is not None and not isinstance(params, Mapping):
        raise InvalidRequestError(f"params must be a JSON object, got {type(params).__name__}")
    merged = {**PARAM_DEFAULTS, **(params or {})}
    if merged.get("stop") is not None and not isinstance(merged["stop"], str):
        merged["stop"] = list(merged["stop"])  # MLflow may hand over a numpy array
    return GenerationParams.from_dict(merged)


def _prompts(model_input) -> list[str]:
    """The prompts of a pyfunc input: a one-column DataFrame, a Series, a list or a string."""
    import numpy as np

    if isinstance(model_input, str):
        values = [model_input]
    elif hasattr(model_input, "columns"):  # pandas.DataFrame
        cols = list(model_input.columns)
        if len(cols) != 1:
            raise InvalidRequestError(f"the input must have one string column of prompts, got columns {cols}")
        values = model_input[cols[0]].tolist()
    elif hasattr(model_input, "tolist"):  # pandas.Series, numpy array
        values = np.asarray(model_input, dtype=object).reshape(-1).tolist()
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise InvalidRequestError(f"the input must be a list of strings, got {type(model_input).__name__}")
    return values  # each checked by Generator.prepare
