"""MLflow packaging: the pyfunc model predicts what the Generator generates, with the card's signature."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

mlflow = pytest.importorskip("mlflow")
pd = pytest.importorskip("pandas")

import gpt2onnx  # noqa: E402
from gpt2onnx.errors import ArtifactError, ExportError  # noqa: E402
from gpt2onnx.integrations import mlflow as g2m  # noqa: E402

PROMPTS = ["The tower is", "In 1998 the", "A", "Valkyria Chronicles III is a tactical role @-@ playing game",
           "The", "It was"]


@pytest.fixture(scope="module")
def packaged(tiny_int8, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("mlflow") / "tiny-int8-mlflow")
    assert g2m.package_mlflow(tiny_int8, out, batch_size=4) == out  # 4 < len(PROMPTS): predict() chunks
    return out


@pytest.fixture(scope="module")
def pyfunc(packaged):
    path = list(sys.path)
    try:
        yield mlflow.pyfunc.load_model(packaged)
    finally:
        sys.path[:] = path  # load_model prepends the model's code/ folder


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8)


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 8, "seed": 3},  # the card's defaults: sampling at temperature 0.8
    {"max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "top_p": 0.9, "top_k": 20, "seed": 7,
     "repetition_penalty": 1.2},
    {"max_new_tokens": 6, "do_sample": False, "return_full_text": False},
    {"max_new_tokens": 10, "do_sample": False, "stop": ["the"], "ignore_eos": True},
])
def test_predict_matches_generator(pyfunc, gen, params):
    want = [r.text for r in gen.generate(PROMPTS, {**g2m.PARAM_DEFAULTS, **params})]
    assert pyfunc.predict(pd.DataFrame(PROMPTS), params=params) == want
    assert pyfunc.predict(PROMPTS, params=params) == want  # a list, as Azure ML's input_data


def test_signature_is_the_azureml_gpt2_card(packaged):
    sig = mlflow.models.Model.load(packaged).signature
    assert [(c.name, c.type.name) for c in sig.inputs.inputs] == [(None, "string")]
    assert [(c.name, c.type.name) for c in sig.outputs.inputs] == [(None, "string")]
    params = {p.name: (p.dtype.name, p.default) for p in sig.params.params}
    # The Azure ML registry's gpt2 MLmodel, name for name, type for type, default for default.
    assert list(params)[:5] == ["top_p", "temperature", "max_new_tokens", "do_sample", "return_full_text"]
    assert params["top_p"] == ("float", 1.0)
    assert params["temperature"] == ("float", 0.8)
    assert params["max_new_tokens"] == ("integer", 50)
    assert params["do_sample"] == ("boolean", True)
    assert params["return_full_text"] == ("boolean", True)
    assert set(params) == set(gpt2onnx.params.FIELDS)  # every GenerationParams field reaches predict()
    assert params["seed"] == ("long", None)


def test_unset_params_take_the_card_defaults(pyfunc, gen):
    # do_sample=True at temperature 0.8 unless the request says otherwise; a seed makes it comparable.
    want = gen.generate(PROMPTS[:2], max_new_tokens=50, do_sample=True, temperature=0.8, top_p=1.0, seed=11)
    assert pyfunc.predict(PROMPTS[:2], params={"seed": 11}) == [r.text for r in want]


def test_requirements_metadata_tags_and_card(packaged, tiny_int8):
    with open(os.path.join(packaged, "requirements.txt")) as f:
        reqs = [line.strip() for line in f if line.strip()]
    names = {r.split("==")[0].lower() for r in reqs}
    assert {"onnxruntime", "numpy", "tokenizers", "tqdm"} <= names
    assert not {n for n in names if "torch" in n or n in ("transformers", "optimum", "optimum-onnx")}
    assert not any("torch" in line for line in open(os.path.join(packaged, "conda.yaml")))
    # gpt2onnx travels as code, without bytecode
    assert os.path.isfile(os.path.join(packaged, "code", "gpt2onnx", "runtime.py"))
    assert not [d for d, _, _ in os.walk(os.path.join(packaged, "code")) if d.endswith("__pycache__")]

    manifest = gpt2onnx.artifact.read_manifest(tiny_int8)
    model = mlflow.models.Model.load(packaged)
    assert model.metadata["tags"] == {k: str(v) for k, v in manifest.tags.items()}
    assert model.metadata["base_model_task"] == "text-generation"
    assert model.metadata["gpt2onnx"]["precision"] == "int8"
    card = open(os.path.join(tiny_int8, "MODEL_CARD.md"), encoding="utf-8").read()
    assert open(os.path.join(packaged, "MODEL_CARD.md"), encoding="utf-8").read() == card
    assert open(os.path.join(packaged, "artifacts", "MODEL_CARD.md"), encoding="utf-8").read() == card


def test_model_yml_registers_the_folder(packaged, tiny_int8):
    import yaml

    with open(os.path.join(packaged, "model.yml"), encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    manifest = gpt2onnx.artifact.read_manifest(tiny_int8)
    assert spec["type"] == "mlflow_model"
    assert spec["path"] == "."
    assert spec["name"] == g2m.default_name(manifest)
    assert spec["version"] == "1"
    assert spec["tags"] == {k: str(v) for k, v in manifest.tags.items()}
    assert spec["tags"]["task"] == "text-generation"
    assert spec["description"]


def test_loads_where_gpt2onnx_is_not_installed(packaged, tmp_path):
    # The model's code/ folder comes first on sys.path, so the serving side needs no gpt2onnx install.
    script = (
        "import json, sys, mlflow\n"
        f"m = mlflow.pyfunc.load_model({packaged!r})\n"
        "texts = m.predict(['The tower is'], params={'max_new_tokens': 4, 'do_sample': False})\n"
        "print(json.dumps({'file': sys.modules['gpt2onnx'].__file__, 'texts': texts, "
        "'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, "GPT2ONNX_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(os.path.join(packaged, "code", "gpt2onnx"))
    assert result["texts"][0].startswith("The tower is")
    assert result["torch"] is False


def test_bad_requests_are_invalid_parameter_errors(pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="top_p must be in"):
        pyfunc.predict(PROMPTS, params={"top_p": 1.5})
    with pytest.raises(MlflowException, match="max_new_tokens"):
        pyfunc.predict(PROMPTS, params={"max_new_tokens": "many"})
    with pytest.raises(MlflowException, match="input row 1: prompt must be a string"):
        pyfunc.predict(pd.DataFrame({"p": ["ok", None]}), params={"max_new_tokens": 2})
    with pytest.raises(MlflowException, match=r"input row 1: prompt has \d+ tokens.*exceeds the context"):
        pyfunc.predict(["ok", "the " * 80], params={"max_new_tokens": 2})
    assert pyfunc.predict(pd.DataFrame({"p": []}, dtype=object)) == []


def test_a_table_of_several_columns_is_refused_not_cut_to_its_first(pyfunc, gen):
    """MLflow alone passes the first column on (here the ids) and drops the prompts without a word."""
    from mlflow.exceptions import MlflowException

    table = pd.DataFrame({"id": ["a1", "a2"], "prompt": PROMPTS[:2]})
    with pytest.raises(MlflowException) as e:
        pyfunc.predict(table, params={"max_new_tokens": 2})
    msg = str(e.value)
    assert msg == ("the input has 2 columns ['id', 'prompt']; send one string column of prompts "
                   "(or a list of strings), e.g. df[['prompt']]")
    want = [r.text for r in gen.generate(PROMPTS[:2], {**g2m.PARAM_DEFAULTS, "max_new_tokens": 2, "seed": 1})]
    assert pyfunc.predict(table[["prompt"]], params={"max_new_tokens": 2, "seed": 1}) == want


def test_misspelt_param_is_refused_with_a_did_you_mean(pyfunc, gen):
    """MLflow drops params its signature does not list (with a warning); predict() refuses them instead."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="unknown generation parameter 'tempreature'; did you mean 'temperature'"):
        pyfunc.predict(PROMPTS[:1], params={"tempreature": 0.5, "max_new_tokens": 2})
    # the next request is not refused for the last one's typo
    want = [r.text for r in gen.generate(PROMPTS[:1], {**g2m.PARAM_DEFAULTS, "max_new_tokens": 2, "seed": 1})]
    assert pyfunc.predict(PROMPTS[:1], params={"max_new_tokens": 2, "seed": 1}) == want


def test_bad_model_folder_and_existing_output(tmp_path, packaged, tiny_int8):
    with pytest.raises(ArtifactError, match="does not exist"):
        g2m.package_mlflow(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not a gpt2onnx model folder"):
        g2m.package_mlflow(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--force"):
        g2m.package_mlflow(tiny_int8, packaged)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_cli_writes_the_model_and_force_replaces_it(tiny_int8, tmp_path, capsys):
    from gpt2onnx.cli import build_parser

    parser = build_parser()
    out = str(tmp_path / "m")
    args = parser.parse_args(["mlflow", tiny_int8, out, "--name", "gpt2-test", "--version", "3"])
    assert args.func(args) == 0
    assert "az ml model create -f" in capsys.readouterr().out
    args = parser.parse_args(["mlflow", tiny_int8, out, "--force", "--name", "gpt2-test", "--version", "4"])
    assert args.func(args) == 0
    text = open(os.path.join(out, "model.yml"), encoding="utf-8").read()
    assert "name: gpt2-test" in text and "version: '4'" in text
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp folder left behind
