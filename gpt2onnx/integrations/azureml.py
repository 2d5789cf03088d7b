"""Azure ML online-endpoint scoring entry: `init()` and `run(raw_data)` over the runtime.

The entry script of a deployment is two lines (``gpt2onnx azureml-kit`` writes it)::

    from gpt2onnx.integrations.azureml import init, run  # noqa: F401

A request is the one of the Azure ML gpt2 model card; the answer is one string per
prompt::

    run('{"input_data": ["I believe the meaning of life is"], '
        '"params": {"max_new_tokens": 20, "do_sample": true, "top_p": 1.0}}')
    # -> ['I believe the meaning of life is ...']

A bad request (not JSON, wrong shape or types, unknown or out-of-range parameter,
too many prompts, too big, prompt too long for the context) is answered with HTTP 400
and ``{"error": "<one line>"}``, never with a 500.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from ..artifact import MANIFEST
from ..cpu import threads_from_env
from . import deployment_log
from ..errors import ArtifactError, InvalidRequestError
from ..params import GenerationParams

MAX_PROMPTS = 64  # prompts per request; larger jobs belong in `gpt2onnx batch`
MAX_BODY_BYTES = 1 << 20  # 1 MiB request body
SEARCH_DEPTH = 2  # a registered folder is mounted one level below AZUREML_MODEL_DIR
REQUEST_KEYS = ("input_data", "params")
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

    Where Azure ML mounts the registered folder one level below ``$AZUREML_MODEL_DIR``:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(root, "gpt2-int8"))
    >>> open(os.path.join(root, "gpt2-int8", "gpt2onnx.json"), "w").close()
    >>> find_model_dir(root) == os.path.join(root, "gpt2-int8")
    True
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
        from ..runtime import load

        root = os.environ.get("AZUREML_MODEL_DIR")
        if not root:
            raise ArtifactError("AZUREML_MODEL_DIR is not set; it must point at the deployment's model folder")
        threads = threads_from_env()
        model_dir = find_model_dir(root)
        _generator = load(model_dir, threads=threads)
        m = _generator.manifest
        weights = "RANDOM weights" if m.source.random_weights else "trained weights"
        deployment_log().info("gpt2onnx: loaded %s (%s, %s) from %s with %d threads", m.name, m.precision, weights,
                              model_dir, _generator.threads)


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
