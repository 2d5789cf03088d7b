"""The Azure ML online-endpoint kit: score.py, a pinned environment and endpoint / deployment YAML.

For example::

    write_kit("out/gpt2-int8", "deploy", instance_type="Standard_F8s_v2")
    # -> 'deploy'

``gpt2onnx azureml-kit MODEL_DIR OUT`` calls `write_kit`; docs/azureml.md deploys it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from ..cpu import THREADS_ENV
from ..errors import Gpt2OnnxError, InvalidRequestError
from ..fsutil import new_folder
from .azureml import CARD_REQUEST


SCORE_PY = '''\
"""Azure ML scoring entry: gpt2onnx's init() and run() (written by 'gpt2onnx azureml-kit')."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the gpt2onnx copy next to this file

from gpt2onnx.integrations.azureml import init, run  # noqa: E402,F401
'''
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "tokenizers", "tqdm", "azureml-inference-server-http")
BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
# Endpoint and deployment names Azure ML accepts: begin with a letter, 3-32 characters,
# letters, digits and dashes (https://learn.microsoft.com/azure/machine-learning/how-to-manage-quotas,
# "Azure Machine Learning online endpoints and batch endpoints"), ending with a letter or digit
# (the azure-ai-ml SDK's EndpointConfigurations.NAME_REGEX_PATTERN, ^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$).
AZURE_NAME = re.compile(r"[A-Za-z][-A-Za-z0-9]{1,30}[A-Za-z0-9]")


def check_azure_name(name: str, what: str) -> str:
    """`name` if Azure ML takes it as an online endpoint or deployment name, else a one-line error.

    >>> check_azure_name("gpt2-int8", "endpoint")
    'gpt2-int8'
    >>> check_azure_name("gpt2_int8", "endpoint")
    Traceback (most recent call last):
    gpt2onnx.errors.InvalidRequestError: endpoint name 'gpt2_int8' is not one Azure ML accepts: 3-32 letters, digits and '-', starting with a letter and ending with a letter or digit (e.g. 'gpt2-int8')
    """
    if not isinstance(name, str) or AZURE_NAME.fullmatch(name) is None:
        hint = re.sub(r"[^A-Za-z0-9-]+", "-", str(name)).strip("-")[:32].rstrip("-")
        hint = hint if AZURE_NAME.fullmatch(hint or "") else f"{what[:3]}-{hint}"[:32].rstrip("-")
        raise InvalidRequestError(f"{what} name {name!r} is not one Azure ML accepts: 3-32 letters, digits and '-', "
                                  f"starting with a letter and ending with a letter or digit (e.g. {hint!r})")
    return name


def write_kit(model_dir: str, outdir: str, *, instance_type: str = "Standard_F4s_v2", endpoint: str = "gpt2onnx",
              deployment: str = "blue", model_name: str | None = None, force: bool = False) -> str:
    """Write a managed-online-endpoint kit for `model_dir` into `outdir`; returns `outdir`.

    The kit: ``code/score.py`` + a copy of the gpt2onnx package, ``environment/conda.yaml``
    (runtime dependencies pinned to this environment's versions), ``model.yml``,
    ``endpoint.yml``, ``deployment.yml`` (threads = the SKU's physical cores) and
    ``sample-request.json`` (the model card's request). See docs/azureml.md.

    For example::

        write_kit("out/gpt2-int8", "deploy", instance_type="Standard_F8s_v2")
        # -> 'deploy'
    """
    from importlib import metadata

    from ..artifact import read_manifest
    from ..bench import skus

    endpoint, deployment = check_azure_name(endpoint, "endpoint"), check_azure_name(deployment, "deployment")
    manifest = read_manifest(model_dir)
    sku = skus.get(instance_type)
    random = manifest.source.random_weights
    if random:
        logging.getLogger("gpt2onnx").warning(
            "%s has RANDOM WEIGHTS: the endpoint will answer meaningless text (benchmarking only); the kit's "
            "model.yml says so in its description and tags", model_dir)
    model_name = model_name or _azure_name(f"{manifest.name}-{manifest.precision}-onnx")
    if os.path.exists(outdir) and not force:
        raise Gpt2OnnxError(f"{outdir!r} exists; pass --force to replace it")
    with new_folder(outdir, prefix=".kit-") as tmp:
        pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # gpt2onnx/
        shutil.copytree(pkg, os.path.join(tmp, "code", "gpt2onnx"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _write(tmp, "code/score.py", SCORE_PY)
        pins = []
        for name in RUNTIME_PACKAGES:
            try:
                pins.append(f"{name}=={metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pins.append(name)
        pip = "".join(f"      - {p}\n" for p in pins)
        _write(tmp, "environment/conda.yaml",
               f"name: gpt2onnx\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n{pip}")
        model_path = os.path.relpath(os.path.abspath(model_dir), os.path.abspath(outdir))
        warn = "RANDOM WEIGHTS (benchmarking only; the text is meaningless). " if random else ""
        _write(tmp, "model.yml",
               "$schema: https://azuremlschemas.azureedge.net/latest/model.schema.json\n"
               f"name: {model_name}\ntype: custom_model\npath: {model_path}\n"
               f"description: \"{warn}GPT-2 ({manifest.precision}) exported to ONNX by gpt2onnx\"\n"
               f"tags:\n  weights: \"{'random' if random else 'pretrained'}\"\n  precision: \"{manifest.precision}\"\n")
        _write(tmp, "endpoint.yml",
               "$schema: https://azuremlschemas.azureedge.net/latest/managedOnlineEndpoint.schema.json\n"
               f"name: {endpoint}\nauth_mode: key\n")
        _write(tmp, "deployment.yml",
               "$schema: https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json\n"
               f"name: {deployment}\nendpoint_name: {endpoint}\nmodel: azureml:{model_name}@latest\n"
               "code_configuration:\n  code: ./code\n  scoring_script: score.py\n"
               f"environment:\n  image: {BASE_IMAGE}\n  conda_file: ./environment/conda.yaml\n"
               f"instance_type: {sku.name}\ninstance_count: 1\n"
               "environment_variables:\n"
               f"  {THREADS_ENV}: \"{sku.physical_cores}\"  # physical cores: {sku.vcpus} vCPUs, "
               f"{sku.vcpus_per_core} per core ({sku.family})\n"
               "  WORKER_COUNT: \"1\"  # one process; its onnxruntime threads use every core\n"
               "request_settings:\n  request_timeout_ms: 90000\n  max_concurrent_requests_per_instance: 1\n")
        _write(tmp, "sample-request.json", json.dumps(CARD_REQUEST, indent=2) + "\n")
    return outdir


def _azure_name(text: str) -> str:
    """A name Azure ML accepts: letters, digits, '-' and '_', starting with a letter."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-_")
    return name if name[:1].isalpha() else f"m-{name}"


def _write(root: str, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
