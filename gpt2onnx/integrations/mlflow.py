"""Package a model folder as an MLflow pyfunc model with the Azure ML gpt2 signature.

    gpt2onnx mlflow out/gpt2-int8 out/gpt2-int8-mlflow
    az ml model create -f out/gpt2-int8-mlflow/model.yml -g RG -w WORKSPACE

The model answers the Azure ML registry gpt2 model's requests (``{"input_data": [...],
"params": {...}}`` -> a list of strings) with onnxruntime instead of torch. It carries this
package as ``code_paths`` (gpt2onnx is on no index the serving side can reach; its runtime is
pure Python) and is a models-from-code model, not a pickle (MLflow is retiring pickles, and a
script ties it to no cloudpickle or Python version). The folder it writes and why:
docs/mlflow.md. The served model (`predict`, the params and their defaults) is
`gpt2onnx.integrations.mlflow_pyfunc`; its names are re-exported here, where every packaged
model's code file imports `python_model`.

For example::

    package_mlflow("out/gpt2-int8", "out/gpt2-int8-mlflow")
    # -> 'out/gpt2-int8-mlflow'
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

from .. import artifact
from .._version import __version__
from ..exporter import modelcard
from ..errors import ExportError, InvalidRequestError
from .mlflow_pyfunc import (  # noqa: F401  (the served model, re-exported: packaged models import python_model here)
    BATCH_SIZE, CARD_PARAMS, EXTRA_PARAMS, PARAM_DEFAULTS, generation_params, python_model, require_mlflow,
)

RUNTIME_REQUIREMENTS = ("onnxruntime", "numpy", "tokenizers", "tqdm")  # never torch
MODEL_CODE = "gpt2onnx_pyfunc.py"

_MODEL_CODE_TEXT = '''"""MLflow models-from-code entry written by gpt2onnx: the pyfunc model of this folder."""
import mlflow

from gpt2onnx.integrations.mlflow import python_model

mlflow.models.set_model(python_model())
'''


def signature():
    """The MLflow signature: one string column in, one string column out, CARD_PARAMS + EXTRA_PARAMS."""
    require_mlflow()
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    specs = []
    for name, kind, default in CARD_PARAMS + EXTRA_PARAMS:
        if kind.endswith("[]"):
            specs.append(ParamSpec(name, kind[:-2], default, (-1,)))
        else:
            specs.append(ParamSpec(name, kind, default))
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema(specs))


def requirements() -> list[str]:
    """pip requirements of the served model: the runtime's, pinned to this environment's versions."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in RUNTIME_REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def default_name(manifest) -> str:
    """An Azure ML model name for a folder: ``{name}-onnx-{precision}``, letters, digits, ``-_.`` only.

    For example::

        default_name(artifact.read_manifest("out/gpt2-int8"))
        # -> 'gpt2-onnx-int8'
    """
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{manifest.name}-onnx-{manifest.precision}")
    return name.strip("-_.")[:255] or "gpt2-onnx"


def _description(manifest) -> str:
    src = manifest.source
    text = (f"{manifest.name} ({src.id or '?'}) exported to ONNX ({manifest.precision}) by "
            f"gpt2onnx {__version__}: text generation on CPU with onnxruntime, no torch. See MODEL_CARD.md.")
    if src.random_weights:
        text = "RANDOM WEIGHTS (benchmarking only; the text is meaningless). " + text
    return text


def _model_yml(name: str, version: int | str, description: str, tags: dict) -> str:
    import yaml

    spec = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/model.schema.json",
        "name": name,
        "version": str(version),
        "type": "mlflow_model",
        "path": ".",  # relative to this file: the MLflow model folder itself
        "description": description,
        "tags": tags,
        "properties": {k: tags[k] for k in ("inference-min-sku-spec", "languages") if k in tags},
    }
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=120)


def package_mlflow(model_dir: str, out: str, *, name: str | None = None, version: int | str = 1,
                   description: str | None = None, batch_size: int = BATCH_SIZE, force: bool = False) -> str:
    """Write an MLflow pyfunc model (and its Azure ML ``model.yml``) for a model folder.

    Args:
        model_dir: a folder written by ``gpt2onnx export``; verified (sizes and sha256).
        out: the MLflow model folder to create.
        name: the Azure ML model name in ``model.yml``; default ``{name}-onnx-{precision}``.
        version: the Azure ML model version in ``model.yml``.
        description: the model description; default: what the folder is, from its manifest.
        batch_size: prompts per generate call when the model predicts many rows.
        force: replace ``out`` if it exists.

    Returns:
        ``out``.

    Raises:
        ArtifactError: ``model_dir`` is missing or damaged.
        ExportError: ``out`` exists (pass force=True) or cannot be written.

    For example::

        package_mlflow("out/gpt2-int8", "out/gpt2-int8-mlflow", version=2)
        # -> 'out/gpt2-int8-mlflow'
    """
    mlflow = require_mlflow()
    model_dir, out = os.fspath(model_dir), os.fspath(out)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}")
    manifest = artifact.verify(model_dir)
    if os.path.exists(out) and not force:
        raise ExportError(f"output {out!r} exists; pass --force (force=True) to replace it")
    tags = {str(k): str(v) for k, v in (manifest.tags or modelcard.tags(manifest.to_dict())).items()}
    name = name or default_name(manifest)
    description = description or _description(manifest)
    card = os.path.join(model_dir, "MODEL_CARD.md")
    artifacts = {"model_dir": os.path.abspath(model_dir)}
    if os.path.isfile(card):
        artifacts["model_card"] = os.path.abspath(card)

    dest = os.path.abspath(out)  # also drops a trailing slash
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    except OSError as e:
        raise ExportError(f"cannot write {out!r} ({e.strerror}); choose a writable output folder") from None
    try:
        staging = os.path.join(tmp, "_staging")
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        shutil.copytree(package, os.path.join(staging, "gpt2onnx"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        code_file = os.path.join(staging, MODEL_CODE)
        with open(code_file, "w", encoding="utf-8") as f:
            f.write(_MODEL_CODE_TEXT)
        target = os.path.join(tmp, "model")
        with _quiet_artifact_copies():
            mlflow.pyfunc.save_model(
                path=target,
                python_model=code_file,
                code_paths=[os.path.join(staging, "gpt2onnx")],
                artifacts=artifacts,
                signature=signature(),
                input_example=(["Hello, I'm a language model,"], {"max_new_tokens": 4, "do_sample": False}),
                pip_requirements=requirements(),
                model_config={"batch_size": batch_size},
                metadata={
                    "base_model_name": manifest.name,
                    "base_model_task": "text-generation",
                    "tags": tags,
                    "model_card": "MODEL_CARD.md",
                    "gpt2onnx": {"version": __version__, "precision": manifest.precision,
                                 "source": manifest.raw.get("source"), "format_version": manifest.format_version},
                },
            )
        if os.path.isfile(card):
            shutil.copyfile(card, os.path.join(target, "MODEL_CARD.md"))
        with open(os.path.join(target, "model.yml"), "w", encoding="utf-8") as f:
            f.write(_model_yml(name, version, description, tags))
        if os.path.exists(dest):  # force: checked above
            old = os.path.join(tmp, "old")
            os.replace(dest, old)  # the old model goes away with tmp
        os.replace(target, dest)
    except OSError as e:
        raise ExportError(f"cannot write {out!r} ({e.__class__.__name__}: {e}); "
                          "check the output folder and free space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _quiet_artifact_copies():
    """MLflow draws a progress bar per artifact copy; a local save needs none."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
