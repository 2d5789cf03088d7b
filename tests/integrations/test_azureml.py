"""Azure ML scoring entry: model discovery, request checks (400s), and the real azmlinfsrv server."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from gpt2onnx import runtime
from gpt2onnx.integrations import azureml, azureml_kit
from gpt2onnx.errors import ArtifactError, Gpt2OnnxError

from helpers.azureml import azmlinfsrv, deployment_root
from helpers.threads import in_threads
from helpers.damaged_folders import SURFACE_CASES

WAIT_S = 120  # bound on a thread's wait; nothing here comes close


@pytest.fixture
def scoring(tmp_path, tiny_int8, monkeypatch):
    """azureml.init() done on the tiny int8 model; the module's state restored afterwards."""
    monkeypatch.setenv("AZUREML_MODEL_DIR", deployment_root(tmp_path, tiny_int8))
    monkeypatch.setenv("GPT2ONNX_THREADS", "1")
    monkeypatch.setattr(azureml, "_generator", None)
    azureml.init()
    return azureml


def error_of(response) -> str:
    assert response.status_code == 400, response
    body = json.loads(response.get_data())
    assert list(body) == ["error"] and "\n" not in body["error"] and 0 < len(body["error"]) <= 500
    return body["error"]


# -- model discovery ------------------------------------------------------------------


def test_find_model_dir_at_depth_0_1_2(tmp_path, tiny_int8):
    assert azureml.find_model_dir(tiny_int8) == tiny_int8
    root = deployment_root(tmp_path, tiny_int8)
    assert azureml.find_model_dir(root) == os.path.join(root, "tiny-int8")
    deeper = tmp_path / "d2" / "a"
    deeper.mkdir(parents=True)
    os.symlink(tiny_int8, deeper / "m")
    assert azureml.find_model_dir(str(tmp_path / "d2")) == str(deeper / "m")


def test_find_model_dir_none_too_deep_or_several(tmp_path, tiny_int8):
    with pytest.raises(ArtifactError, match="does not exist"):
        azureml.find_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no gpt2onnx model folder"):
        azureml.find_model_dir(str(tmp_path / "empty"))
    deep = tmp_path / "deep" / "a" / "b"
    deep.mkdir(parents=True)
    os.symlink(tiny_int8, deep / "m")
    with pytest.raises(ArtifactError, match="no gpt2onnx model folder"):
        azureml.find_model_dir(str(tmp_path / "deep"))
    two = tmp_path / "two"
    two.mkdir()
    os.symlink(tiny_int8, two / "a")
    os.symlink(tiny_int8, two / "b")
    with pytest.raises(ArtifactError, match="2 model folders .*deploy exactly one"):
        azureml.find_model_dir(str(two))


def test_init_errors(tmp_path, tiny_int8, monkeypatch):
    monkeypatch.setattr(azureml, "_generator", None)
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    with pytest.raises(ArtifactError, match="AZUREML_MODEL_DIR is not set"):
        azureml.init()
    monkeypatch.setenv("AZUREML_MODEL_DIR", deployment_root(tmp_path, tiny_int8))
    monkeypatch.setenv("GPT2ONNX_THREADS", "two")
    with pytest.raises(Gpt2OnnxError, match="GPT2ONNX_THREADS=.two. is not a positive integer"):
        azureml.init()
    assert azureml._generator is None


@pytest.mark.parametrize("name", SURFACE_CASES)
def test_azureml_init_refuses(damaged, probed, tmp_path, monkeypatch, name):
    """The deployment fails to start (its log shows the line) instead of answering with a broken model."""
    root = tmp_path / "azureml-models" / "m" / "1"
    root.mkdir(parents=True)
    os.symlink(damaged[name], root / "model")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(root))
    monkeypatch.setenv("GPT2ONNX_THREADS", "1")
    monkeypatch.setattr(azureml, "_generator", None)
    if name == "optimum-folder":  # no manifest: not found as a model folder at all
        with pytest.raises(ArtifactError, match="no gpt2onnx model folder"):
            azureml.init()
    else:
        with pytest.raises(ArtifactError, match=re.escape(probed[name]["load"][1][-40:])):
            azureml.init()
    assert azureml._generator is None

# -- run() in process -----------------------------------------------------------------


def test_card_request(scoring):
    request = json.loads(json.dumps(azureml.CARD_REQUEST))
    request["input_data"] = ["I believe the meaning of life is", "The sky"]
    request["params"]["max_new_tokens"] = 20  # the tiny model's context is 64 tokens
    out = scoring.run(json.dumps(request))
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)
    assert out[0].startswith("I believe the meaning of life is") and out[1].startswith("The sky")
    greedy = scoring.run(json.dumps({"input_data": ["The sky"], "params": {"max_new_tokens": 5,
                                                                            "return_full_text": False}}))
    assert greedy == [scoring._generator.generate("The sky", max_new_tokens=5, return_full_text=False)[0].text]
    assert scoring.run(b'{"input_data": ["a"]}') == scoring.run({"input_data": ["a"]})  # bytes and dicts too


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("not json", "not valid JSON"),
    ('{"input_data": ["a"]', "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
    (b"\xff\xfe\x00\x01 random bytes", "not UTF-8"),
    ('["a"]', "must be a JSON object"),
    ("null", "must be a JSON object"),
    ('"hello"', "must be a JSON object"),
    ("{}", 'no "input_data"'),
    ('{"input_data": "a prompt"}', "must be a list"),
    ('{"input_data": {"input_string": ["a"]}}', "must be a list"),
    ('{"input_data": []}', "empty"),
    ('{"input_data": [1]}', r"input_data\[0\] must be a string"),
    ('{"input_data": ["a", null]}', r"input_data\[1\] must be a string"),
    ('{"input_data": [["a"]]}', r"input_data\[0\] must be a string"),
    ('{"input_data": ["a"], "parameters": {}}', "unknown request key 'parameters'"),
    ('{"input_data": ["a"], "params": []}', "must be a JSON object"),
    ('{"input_data": ["a"], "params": "fast"}', "must be a JSON object"),
    ('{"input_data": ["a"], "params": {"top_p": 1.5}}', r"top_p must be in \(0, 1\]"),
    ('{"input_data": ["a"], "params": {"temperature": -0.1}}', "temperature"),
    ('{"input_data": ["a"], "params": {"temperature": NaN}}', "finite"),
    ('{"input_data": ["a"], "params": {"max_new_tokens": 1e400}}', "max_new_tokens"),
    ('{"input_data": ["a"], "params": {"max_new_tokens": 0}}', "max_new_tokens"),
    ('{"input_data": ["a"], "params": {"max_new_tokens": "10"}}', "max_new_tokens"),
    ('{"input_data": ["a"], "params": {"max_new_tokens": 10.5}}', "max_new_tokens"),
    ('{"input_data": ["a"], "params": {"do_sample": "yes"}}', "do_sample"),
    ('{"input_data": ["a"], "params": {"top_k": true}}', "top_k"),
    ('{"input_data": ["a"], "params": {"seed": -1}}', "seed"),
    ('{"input_data": ["a"], "params": {"num_beams": 4}}', "unknown generation parameter 'num_beams'"),
    ('{"input_data": ["a"], "params": {"max_new_tokens": 100}}', "context of 64 tokens"),
    ('{"input_data": ["' + "the " * 100 + '"], "params": {"max_new_tokens": 5}}', "exceeds the context"),
    ('{"input_data": ["ok", "\\ud800"]}', "not valid Unicode"),
    (json.dumps({"input_data": ["a"] * 65}), "at most 64"),
    (json.dumps({"input_data": ["x" * (1 << 20)]}), "at most 1_048_576"),
    (b"x" * ((1 << 20) + 1), "at most 1_048_576"),
    (12, "must be a JSON object"),
]


@pytest.mark.parametrize("raw,reason", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_400_with_one_line(scoring, raw, reason):
    import re

    assert re.search(reason, error_of(scoring.run(raw)))


def test_parse_needs_no_model(monkeypatch):
    monkeypatch.setattr(azureml, "_generator", None)
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    assert "empty" in error_of(azureml.run('{"input_data": []}'))
    prompts, params = azureml.parse_request(azureml.CARD_REQUEST)
    assert prompts == azureml.CARD_REQUEST["input_data"] and params.temperature == 0.8 and params.do_sample


def test_concurrent_requests(scoring):
    body = json.dumps({"input_data": ["he was", "of the", "it is not"], "params": {"max_new_tokens": 12}})
    expected = scoring.run(body)
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(scoring.run(body))
                error_of(scoring.run('{"input_data": [1]}'))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 12 and all(r == expected for r in results)


def test_first_requests_race_init_and_load_once(tiny_int8, tmp_path, monkeypatch):
    """Eight scoring threads arrive before init(): the model is loaded exactly once."""
    monkeypatch.setenv("AZUREML_MODEL_DIR", deployment_root(tmp_path, tiny_int8))
    monkeypatch.setenv("GPT2ONNX_THREADS", "1")
    monkeypatch.setattr(azureml, "_generator", None)
    loads, real_load = [], runtime.load

    def counting_load(*a, **k):
        loads.append(a)
        time.sleep(0.2)  # widen the race
        return real_load(*a, **k)

    monkeypatch.setattr(runtime, "load", counting_load)
    body = json.dumps({"input_data": ["The tower is", "In 1998 the", ""],
                       "params": {"max_new_tokens": 6, "do_sample": True, "seed": 2}})
    results = []
    barrier = threading.Barrier(8)

    def worker(_):
        barrier.wait(WAIT_S)
        results.append(azureml.run(body))

    in_threads(worker, 8, wait_s=WAIT_S)
    assert len(loads) == 1
    assert len(results) == 8 and all(r == results[0] for r in results) and len(results[0]) == 3


# -- deployment kit -------------------------------------------------------------------


def test_write_kit(tmp_path, tiny_int8):
    out = str(tmp_path / "kit")
    assert azureml_kit.write_kit(tiny_int8, out, instance_type="standard_f8s_v2") == out
    dep = open(os.path.join(out, "deployment.yml")).read()
    assert "instance_type: Standard_F8s_v2\n" in dep and 'GPT2ONNX_THREADS: "4"' in dep
    assert "scoring_script: score.py" in dep and "model: azureml:" in dep
    env = open(os.path.join(out, "environment", "conda.yaml")).read()
    assert "- onnxruntime==" in env and "- azureml-inference-server-http==" in env and "torch" not in env
    model = open(os.path.join(out, "model.yml")).read()
    assert "type: custom_model" in model
    path = model.split("path: ")[1].splitlines()[0]
    assert os.path.samefile(os.path.join(out, path), tiny_int8)  # relative to the YAML, as az ml resolves it
    assert os.path.isfile(os.path.join(out, "code", "gpt2onnx", "integrations", "azureml.py"))
    assert json.load(open(os.path.join(out, "sample-request.json"))) == azureml.CARD_REQUEST
    with pytest.raises(Gpt2OnnxError, match="exists; pass --force"):
        azureml_kit.write_kit(tiny_int8, out)
    with pytest.raises(Gpt2OnnxError, match="Standard_F4s_v2|unknown|not"):
        azureml_kit.write_kit(tiny_int8, str(tmp_path / "k2"), instance_type="Standard_Q9")
    assert not (tmp_path / "k2").exists()


def test_kit_threads_are_the_skus_physical_cores(tmp_path, tiny_int8):
    """DSv2 has one vCPU per core: a DS3_v2 gets 4 threads, a hyper-threaded F4s_v2 2."""
    for sku, threads in (("Standard_DS3_v2", 4), ("Standard_F4s_v2", 2)):
        out = azureml_kit.write_kit(tiny_int8, str(tmp_path / sku), instance_type=sku)
        dep = open(os.path.join(out, "deployment.yml")).read()
        assert f'GPT2ONNX_THREADS: "{threads}"' in dep, dep


# -- the real server ------------------------------------------------------------------

def post(port: int, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_azmlinfsrv_scores_good_and_bad_requests(tmp_path, tiny_int8):
    kit = azureml_kit.write_kit(tiny_int8, str(tmp_path / "kit"))
    with azmlinfsrv(kit, deployment_root(tmp_path, tiny_int8), tmp_path, ready_s=45) as port:
        request = json.loads(json.dumps(azureml.CARD_REQUEST))
        request["input_data"] = ["I believe the meaning of life is", "Hello"]
        request["params"]["max_new_tokens"] = 10
        status, body = post(port, json.dumps(request).encode())
        assert status == 200, body
        texts = json.loads(body)
        assert len(texts) == 2 and texts[0].startswith(request["input_data"][0]) and texts[1].startswith("Hello")

        for raw in (b"not json", b"\xff\xfe random \x00 bytes", b'{"input_data": []}', b'{"input_data": [1]}',
                    b'{"input_data": ["a"], "params": {"top_p": 7}}', b'{"input_data": ["a"], "params": {"x": 1}}',
                    b'{"input_data": ["a"], "params": {"max_new_tokens": 100}}',
                    json.dumps({"input_data": ["a"] * 65}).encode(), b"x" * ((1 << 20) + 10)):
            status, body = post(port, raw)
            assert status == 400, (raw[:60], status, body[:300])
            message = json.loads(body)
            text = message.get("error") or message.get("message")  # non-UTF-8 bodies are refused by the server
            assert text and "\n" not in text and "Traceback" not in text, message


def test_cli_kit(tmp_path, tiny_int8, capsys):
    from gpt2onnx import cli

    out = str(tmp_path / "kit")
    assert cli.main(["azureml-kit", tiny_int8, out, "--instance-type", "Standard_E8s_v3", "--endpoint", "ep1"]) == 0
    assert "az ml online-deployment create" in capsys.readouterr().out
    dep = open(os.path.join(out, "deployment.yml")).read()
    assert "endpoint_name: ep1\n" in dep and 'GPT2ONNX_THREADS: "4"' in dep
    assert cli.main(["azureml-kit", tiny_int8, out]) == 1
    assert "pass --force" in capsys.readouterr().err


NAMES = {"gpt2onnx": True, "ep1": True, "my-endpoint-name": True, "a" * 32: True, "Gpt2-Int8": True,
         "ab": False, "a" * 33: False, "1gpt2": False, "gpt2-": False, "-gpt2": False, "gpt2_int8": False,
         "gpt2.int8": False, "gpt2 int8": False, "": False}


@pytest.mark.parametrize("name, ok", NAMES.items())
def test_endpoint_and_deployment_names_follow_azure_ml(name, ok, tiny_int8, tmp_path, capsys):
    """Azure ML's rule (begin with a letter, 3-32 letters/digits/'-', end alphanumeric), checked before writing."""
    from gpt2onnx import cli

    for flag in ("--endpoint", "--deployment"):
        out = tmp_path / f"kit{flag}"
        assert cli.main(["azureml-kit", tiny_int8, str(out), f"{flag}={name}"]) == (0 if ok else 1)
        err = capsys.readouterr().err.strip()
        if not ok:
            what = flag.removeprefix("--")
            assert len(err.splitlines()) == 1 and f"{what} name {name!r} is not one Azure ML accepts" in err
            assert not out.exists()
            suggested = re.search(r"e\.g\. '([^']*)'", err).group(1)
            azureml_kit.check_azure_name(suggested, what)  # the suggestion itself is accepted


def test_our_name_rule_is_the_azure_ml_sdks():
    """The same verdicts as azure-ai-ml's own endpoint name pattern plus the documented 3-32 length."""
    constants = pytest.importorskip("azure.ai.ml.constants._endpoint")
    pattern = re.compile(constants.EndpointConfigurations.NAME_REGEX_PATTERN)
    for name, ok in NAMES.items():
        assert (pattern.match(name) is not None and 3 <= len(name) <= 32) == ok, name


def test_kit_of_random_weights_says_so(tiny_src, tmp_path, capsys):
    import gpt2onnx
    from gpt2onnx import cli

    model = str(tmp_path / "random")
    gpt2onnx.export(tiny_src, model, random_weights=True, progress=False)
    out = str(tmp_path / "kit")
    assert cli.main(["azureml-kit", model, out]) == 0
    err = capsys.readouterr().err
    assert "gpt2onnx: warning: " in err and "has RANDOM WEIGHTS: the endpoint will answer meaningless text" in err
    import yaml

    spec = yaml.safe_load(open(os.path.join(out, "model.yml")))
    assert spec["description"].startswith("RANDOM WEIGHTS") and spec["tags"]["weights"] == "random"



def test_kit_of_pretrained_weights_is_not_flagged(tiny_int8, tmp_path, capsys):
    import yaml
    from gpt2onnx import cli

    assert cli.main(["azureml-kit", tiny_int8, str(tmp_path / "kit")]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().err
    spec = yaml.safe_load(open(tmp_path / "kit" / "model.yml"))
    assert not spec["description"].startswith("RANDOM") and spec["tags"]["weights"] == "pretrained"
