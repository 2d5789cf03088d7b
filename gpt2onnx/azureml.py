"""Azure ML online-endpoint scoring entry: `init()` and `run(raw_data)` over the runtime.

The entry script of a deployment is two lines (``gpt2onnx azureml-kit`` writes it)::

    from gpt2onnx.azureml import init, run  # noqa: F401

A request is the one of the Azure ML gpt2 model card; the answer is one string per
prompt:

    >>> run('{"input_data": ["I believe the meaning of life is"], '
    ...     '"params": {"max_new_tokens": 20, "do_sample": true, "top_p": 1.0}}')   # doctest: +SKIP
    ['I believe the meaning of life is ...']

A bad request (not JSON, wrong shape or types, unknown or out-of-range parameter,
too many prompts, too big, prompt too long for the context) is answered with HTTP 400
and ``{"error": "<one line>"}``, never with a 500.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from typing import Any

from .artifact import MANIFEST
from .errors import ArtifactError, Gpt2OnnxError, InvalidRequestError
from .params import GenerationParams

MAX_PROMPTS = 64  # prompts per request; larger jobs belong in `gpt2onnx batch`
MAX_BODY_BYTES = 1 << 20  # 1 MiB request body
SEARCH_DEPTH = 2  # a registered folder is mounted one level below AZUREML_MODEL_DIR
REQUEST_KEYS = ("input_data", "params")
ENV_THREADS = "GPT2ONNX_THREADS"
CARD_REQUEST = {  # the request of the Azure ML gpt2 model card
    "input_data": ["I believe the meaning of life is"],
    "params": {"top_p": 1.0, "temperature": 0.8, "max_new_tokens": 100, "do_sample": True, "return_full_text": True},
}

_generator = None
_lock = threading.Lock()


def find_model_dir(root: str) -> str:
    """The one gpt2onnx model folder at or below `root` (at most 2 levels down).

    Raises:
        ArtifactError: none, or more than one, is found.

    >>> find_model_dir(os.environ["AZUREML_MODEL_DIR"])   # doctest: +SKIP
    '/var/azureml-app/azureml-models/gpt2-int8-onnx/1/gpt2-int8'
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ArtifactError(f"model directory {root!r} does not exist; set AZUREML_MODEL_DIR to the folder that "
                            "holds the registered model")
    found = []
    level = [root]
    for _ in range(SEARCH_DEPTH + 1):
        nxt = []
        for d in level:
            if os.path.isfile(os.path.join(d, MANIFEST)):
                found.append(d)
                continue  # a model folder's own subfolders are not searched
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            nxt += [os.path.join(d, n) for n in names if not n.startswith(".") and os.path.isdir(os.path.join(d, n))]
        level = nxt
    if not found:
        raise ArtifactError(f"no gpt2onnx model folder ({MANIFEST}) at or up to {SEARCH_DEPTH} levels below {root!r}; "
                            "register the folder written by 'gpt2onnx export' as the deployment's model")
    if len(found) > 1:
        shown = ", ".join(os.path.relpath(f, root) for f in found[:4])
        raise ArtifactError(f"{len(found)} model folders below {root!r} ({shown}); deploy exactly one model folder")
    return found[0]


def init() -> None:
    """Load the model folder found below ``AZUREML_MODEL_DIR`` (called once per worker).

    Threads: ``GPT2ONNX_THREADS`` if set, else the physical cores the container may use.
    """
    global _generator
    with _lock:
        if _generator is not None:
            return
        from .runtime import load

        root = os.environ.get("AZUREML_MODEL_DIR")
        if not root:
            raise ArtifactError("AZUREML_MODEL_DIR is not set; it must point at the deployment's model folder")
        threads = _env_threads()
        model_dir = find_model_dir(root)
        _generator = load(model_dir, threads=threads)
        m = _generator.manifest
        weights = "RANDOM weights" if m.get("source", {}).get("random_weights") else "trained weights"
        # stdout is what 'az ml online-deployment get-logs' shows
        print(f"gpt2onnx: loaded {m.get('name')} ({m.get('precision')}, {weights}) from {model_dir} "
              f"with {_generator.threads} threads", flush=True)


def _env_threads() -> int | None:
    value = os.environ.get(ENV_THREADS, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise Gpt2OnnxError(f"{ENV_THREADS} must be a positive integer (physical cores), got {value!r}")
    return int(value)


def run(raw_data):
    """Score one request: a JSON list of strings, or a 400 `AMLResponse` with ``{"error": ...}``.

    Safe to call from several threads at once (one shared `Generator`).
    """
    try:
        prompts, params = parse_request(raw_data)
        if _generator is None:
            init()
        return [r.text for r in _generator.generate(prompts, params)]
    except InvalidRequestError as e:
        return _bad_request(str(e))


def parse_request(raw_data: Any) -> tuple[list[str], GenerationParams]:
    """Check a request body (JSON text, bytes, or an already-decoded dict) and return its prompts and params.

    Raises:
        InvalidRequestError: with a one-line reason.

    >>> parse_request('{"input_data": ["Hi"], "params": {"max_new_tokens": 5}}')[1].max_new_tokens
    5
    """
    body = raw_data
    if isinstance(body, (bytes, bytearray)):
        if len(body) > MAX_BODY_BYTES:
            raise _too_big(len(body))
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("request body is not UTF-8 text; send a JSON object") from None
    if isinstance(body, str):
        if len(body) > MAX_BODY_BYTES or len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise _too_big(len(body.encode("utf-8", "surrogatepass")))
        body = body.removeprefix("\ufeff")  # a UTF-8 BOM, as Windows tools write it, is not part of the JSON
        if not body.strip():
            # azmlinfsrv also passes "" when the body was not sent as Content-Type: application/json
            raise InvalidRequestError('request body is empty; send {"input_data": ["prompt"], "params": {...}} '
                                      "with Content-Type: application/json")
        try:
            body = json.loads(body)
        except RecursionError:
            raise InvalidRequestError('request body is not valid JSON (too deeply nested); '
                                      'send {"input_data": ["prompt"], "params": {...}}') from None
        except ValueError as e:  # JSONDecodeError has .msg and .pos; an over-long integer is a plain ValueError
            if isinstance(e, json.JSONDecodeError):
                reason = f"{e.msg.removesuffix(' at')} at character {e.pos}"
            else:
                reason = " ".join(str(e).split(":")[0].split())[:120]
            raise InvalidRequestError(f"request body is not valid JSON ({reason}); "
                                      'send {"input_data": ["prompt"], "params": {...}}') from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request must be a JSON object like {{\"input_data\": [\"prompt\"], \"params\": "
                                  f"{{...}}}}, got {_json_type(body)}")
    unknown = [k for k in body if k not in REQUEST_KEYS]
    if unknown:
        raise InvalidRequestError(f"unknown request key {_short(unknown[0])}; allowed: input_data, params")
    if "input_data" not in body:
        raise InvalidRequestError('request has no "input_data"; send {"input_data": ["prompt", ...]}')
    prompts = body["input_data"]
    if not isinstance(prompts, list):
        raise InvalidRequestError(f"input_data must be a list of prompt strings, got {_json_type(prompts)}")
    if not prompts:
        raise InvalidRequestError("input_data is empty; send at least one prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(f"input_data has {len(prompts)} prompts; at most {MAX_PROMPTS} per request "
                                  "(use 'gpt2onnx batch' for bulk jobs)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidRequestError(f"input_data[{i}] must be a string, got {_json_type(p)}")
    params = body.get("params")
    params = GenerationParams.from_dict({} if params is None else params)
    return prompts, params


def _too_big(n: int) -> InvalidRequestError:
    return InvalidRequestError(f"request body has {n:_} bytes; at most {MAX_BODY_BYTES:_} (1 MiB)")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad_request(message: str):
    """HTTP 400 with ``{"error": message}`` (message on one line)."""
    message = " ".join(message.split())[:500]
    try:
        from azureml.contrib.services.aml_response import AMLResponse  # what azmlinfsrv patches in
    except ImportError:
        try:
            from azureml_inference_server_http.api.aml_response import AMLResponse
        except ImportError:  # called outside a server without the package: a plain exception
            raise InvalidRequestError(message) from None
    return AMLResponse({"error": message}, 400, json_str=True)


# -- deployment kit -------------------------------------------------------------------

SCORE_PY = '''\
"""Azure ML scoring entry: gpt2onnx's init() and run() (written by 'gpt2onnx azureml-kit')."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the gpt2onnx copy next to this file

from gpt2onnx.azureml import init, run  # noqa: E402,F401
'''
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "tokenizers", "tqdm", "azureml-inference-server-http")
BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"


def write_kit(model_dir: str, outdir: str, *, instance_type: str = "Standard_F4s_v2", endpoint: str = "gpt2onnx",
              deployment: str = "blue", model_name: str | None = None, force: bool = False) -> str:
    """Write a managed-online-endpoint kit for `model_dir` into `outdir`; returns `outdir`.

    The kit: ``code/score.py`` + a copy of the gpt2onnx package, ``environment/conda.yaml``
    (runtime dependencies pinned to this environment's versions), ``model.yml``,
    ``endpoint.yml``, ``deployment.yml`` (threads = the SKU's physical cores) and
    ``sample-request.json`` (the model card's request). See docs/azureml.md.

    >>> write_kit("out/gpt2-int8", "deploy", instance_type="Standard_F8s_v2")   # doctest: +SKIP
    'deploy'
    """
    from importlib import metadata

    from . import skus
    from .artifact import read_manifest

    manifest = read_manifest(model_dir)
    sku = skus.get(instance_type)
    model_name = model_name or _azure_name(f"{manifest.get('name', 'gpt2')}-{manifest.get('precision', '')}-onnx")
    if os.path.exists(outdir) and not force:
        raise Gpt2OnnxError(f"{outdir!r} exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(outdir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kit-", dir=parent)
    try:
        pkg = os.path.dirname(os.path.abspath(__file__))
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
        _write(tmp, "model.yml",
               "$schema: https://azuremlschemas.azureedge.net/latest/model.schema.json\n"
               f"name: {model_name}\ntype: custom_model\npath: {model_path}\n"
               f"description: GPT-2 ({manifest.get('precision')}) exported to ONNX by gpt2onnx\n")
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
               f"  {ENV_THREADS}: \"{sku.physical_cores}\"  # physical cores: {sku.vcpus} vCPUs / 2\n"
               "  WORKER_COUNT: \"1\"  # one process; its onnxruntime threads use every core\n"
               "request_settings:\n  request_timeout_ms: 90000\n  max_concurrent_requests_per_instance: 1\n")
        _write(tmp, "sample-request.json", json.dumps(CARD_REQUEST, indent=2) + "\n")
        if os.path.exists(outdir):
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def add_parser(subparsers) -> None:
    """Register ``gpt2onnx azureml-kit`` on the CLI's subparsers."""
    k = subparsers.add_parser("azureml-kit", help="write an Azure ML online-endpoint kit (score.py, env, YAML)",
                              description="Write score.py, a conda environment and endpoint/deployment YAML for a "
                                          "model folder; deploy with 'az ml' (see docs/azureml.md).")
    k.add_argument("model_dir")
    k.add_argument("outdir")
    k.add_argument("--instance-type", dest="instance_type", default="Standard_F4s_v2",
                   help="Azure VM size (default Standard_F4s_v2); sets GPT2ONNX_THREADS to its physical cores")
    k.add_argument("--endpoint", default="gpt2onnx", help="endpoint name (default gpt2onnx)")
    k.add_argument("--deployment", default="blue", help="deployment name (default blue)")
    k.add_argument("--model-name", dest="model_name", help="registered model name (default from the manifest)")
    k.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    k.set_defaults(func=_cli)


def _cli(a) -> int:
    out = write_kit(a.model_dir, a.outdir, instance_type=a.instance_type, endpoint=a.endpoint,
                    deployment=a.deployment, model_name=a.model_name, force=a.force)
    print(f"wrote {out}; next: cd {out} && az ml model create -f model.yml && "
          "az ml online-endpoint create -f endpoint.yml && "
          "az ml online-deployment create -f deployment.yml --all-traffic")
    return 0
