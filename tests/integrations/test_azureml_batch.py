"""Azure ML batch entry: files of a mini-batch in, one JSON row per prompt out, errors as rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import gpt2onnx
from gpt2onnx.errors import ArtifactError, InvalidRequestError
from gpt2onnx.integrations import azureml_batch as ab

from helpers.azureml import deployment_root

PARAMS = {"max_new_tokens": 6}


@pytest.fixture
def azureml_env(tiny_int8, tmp_path, monkeypatch):
    """AZUREML_MODEL_DIR as Azure mounts a model registered from a folder: $AZUREML_MODEL_DIR/<folder>/."""
    root = Path(deployment_root(tmp_path, tiny_int8))
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(root))
    monkeypatch.setenv("GPT2ONNX_THREADS", "1")
    monkeypatch.setenv("GPT2ONNX_PARAMS", json.dumps(PARAMS))
    monkeypatch.setenv("GPT2ONNX_BATCH_SIZE", "3")
    for name in ("GPT2ONNX_MODEL_DIR", "GPT2ONNX_OUTPUT", "AZUREML_BI_OUTPUT_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ab, "_state", {})
    return root


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _rows(lines: list[str]) -> list[dict]:
    return [json.loads(s) for s in lines]


def test_jsonl_and_csv_files_give_one_row_per_prompt(azureml_env, tmp_path, gen):
    jsonl = _write(tmp_path / "part-1.jsonl", "\n".join([
        json.dumps({"id": "a", "prompt": "The tower is"}),
        "{not json",
        json.dumps({"id": "b", "prompt": "In 1998 the", "do_sample": True, "seed": 5}),
        "",
        json.dumps({"input_data": ["A", "It was"], "params": {"max_new_tokens": 3}}),
        json.dumps({"id": "c", "prompt": "The", "top_p": 7}),
    ]) + "\n")
    csv_path = _write(tmp_path / "part-2.csv",
                      'id,prompt,max_new_tokens,note\n'
                      'x,"The tower is",,ignored\n'
                      ',"Valkyria Chronicles, III",4,\n'
                      'y,"It was",many,\n')
    ab.init()
    rows = _rows(ab.run([jsonl, csv_path]))

    assert [(r["file"], r["line"], r["index"]) for r in rows] == [
        ("part-1.jsonl", 1, 0), ("part-1.jsonl", 2, 0), ("part-1.jsonl", 3, 0), ("part-1.jsonl", 5, 0),
        ("part-1.jsonl", 5, 1), ("part-1.jsonl", 6, 0),
        ("part-2.csv", 1, 0), ("part-2.csv", 2, 0), ("part-2.csv", 3, 0),
    ]
    ok = {(r["file"], r["id"]): r["text"] for r in rows if "text" in r}
    want = {
        ("part-1.jsonl", "a"): gen.generate("The tower is", **PARAMS)[0].text,
        ("part-1.jsonl", "b"): gen.generate("In 1998 the", **PARAMS, do_sample=True, seed=5)[0].text,
        ("part-1.jsonl", "5:0"): gen.generate("A", max_new_tokens=3)[0].text,
        ("part-1.jsonl", "5:1"): gen.generate("It was", max_new_tokens=3)[0].text,
        ("part-2.csv", "x"): gen.generate("The tower is", **PARAMS)[0].text,
        ("part-2.csv", "line-2"): gen.generate("Valkyria Chronicles, III", max_new_tokens=4)[0].text,
    }
    assert ok == want
    errors = {(r["file"], r["line"]): r["error"] for r in rows if "error" in r}
    assert set(errors) == {("part-1.jsonl", 2), ("part-1.jsonl", 6), ("part-2.csv", 3)}
    assert "not valid JSON" in errors["part-1.jsonl", 2]
    assert "top_p" in errors["part-1.jsonl", 6]
    assert "max_new_tokens" in errors["part-2.csv", 3]


def test_rows_run_in_memory_without_temp_file_hash_lock_or_fsync(azureml_env, tmp_path, monkeypatch, gen):
    import fcntl
    import hashlib
    import tempfile

    from gpt2onnx import batch

    jsonl = _write(tmp_path / "p.jsonl", json.dumps({"id": "a", "prompt": "The tower is"}) + "\n"
                   + json.dumps({"id": "t", "prompt": "x", "tempreature": 1}) + "\n")
    csv_path = _write(tmp_path / "p.csv", "id,prompt,tempreature,note\nc,It was,,\nd,The,0.5,x\n")
    ab.init()

    def refuse(*args, **kwargs):
        raise AssertionError("the Azure ML batch entry must run in memory: no temp file, sha256, flock, fsync")

    for owner, name in ((tempfile, "mkstemp"), (tempfile, "mkdtemp"), (tempfile, "TemporaryDirectory"),
                        (tempfile, "NamedTemporaryFile"), (hashlib, "sha256"), (fcntl, "flock"), (os, "fsync"),
                        (batch, "run_batch"), (batch.job, "run_batch")):
        monkeypatch.setattr(owner, name, refuse)
    rows = _rows(ab.run([jsonl, csv_path]))
    assert [(r["file"], r["id"], "text" in r) for r in rows] == [
        ("p.jsonl", "a", True), ("p.jsonl", "t", False), ("p.csv", "c", True), ("p.csv", "d", False)]
    assert rows[0]["text"] == gen.generate("The tower is", **PARAMS)[0].text
    assert rows[2]["text"] == gen.generate("It was", **PARAMS)[0].text
    for r in (rows[1], rows[3]):  # a misspelt parameter, as a JSONL key or a CSV column
        assert r["error"].startswith("unknown generation parameter 'tempreature'; did you mean 'temperature'?")


def test_bad_files_become_error_rows_and_the_rest_goes_on(azureml_env, tmp_path):
    good = _write(tmp_path / "ok.jsonl", json.dumps({"id": "g", "prompt": "The"}) + "\n")
    no_prompt = _write(tmp_path / "cols.csv", "id,text\n1,hello\n")
    (tmp_path / "bin.csv").write_bytes(b"prompt\n\xff\xfe\x00bad\n")
    other = _write(tmp_path / "notes.txt", "hello\n")
    (tmp_path / "folder.jsonl").mkdir()
    missing = str(tmp_path / "gone.jsonl")
    ab.init()
    rows = _rows(ab.run([missing, no_prompt, str(tmp_path / "bin.csv"), other, str(tmp_path / "folder.jsonl"), good]))
    by_file = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r)
    assert list(by_file) == ["gone.jsonl", "cols.csv", "bin.csv", "notes.txt", "folder.jsonl", "ok.jsonl"]
    assert "does not exist" in by_file["gone.jsonl"][0]["error"]
    assert "no 'prompt' column" in by_file["cols.csv"][0]["error"]
    assert "error" in by_file["bin.csv"][0]
    assert "unsupported file type '.txt'" in by_file["notes.txt"][0]["error"]
    assert "is a directory" in by_file["folder.jsonl"][0]["error"]
    assert by_file["ok.jsonl"][0]["id"] == "g" and by_file["ok.jsonl"][0]["text"].startswith("The")


def test_model_folder_is_found_under_azureml_model_dir(azureml_env, tiny_int8, tmp_path, monkeypatch):
    assert os.path.samefile(ab.find_model_dir(), tiny_int8)
    os.symlink(tiny_int8, azureml_env / "second")
    with pytest.raises(ArtifactError, match="2 model folders"):
        ab.find_model_dir()
    monkeypatch.setenv("GPT2ONNX_MODEL_DIR", "second")  # relative to AZUREML_MODEL_DIR
    assert os.path.samefile(ab.find_model_dir(), tiny_int8)
    monkeypatch.delenv("GPT2ONNX_MODEL_DIR")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(empty))
    with pytest.raises(ArtifactError, match="no gpt2onnx model folder"):
        ab.init()
    monkeypatch.delenv("AZUREML_MODEL_DIR")
    with pytest.raises(ArtifactError, match="AZUREML_MODEL_DIR is not set"):
        ab.init()


def test_bad_configuration_fails_init_not_rows(azureml_env, monkeypatch):
    monkeypatch.setenv("GPT2ONNX_PARAMS", '{"top_p": 2}')
    with pytest.raises(InvalidRequestError, match="top_p"):
        ab.init()
    monkeypatch.setenv("GPT2ONNX_PARAMS", "{oops")
    with pytest.raises(InvalidRequestError, match="GPT2ONNX_PARAMS is not valid JSON"):
        ab.init()
    monkeypatch.setenv("GPT2ONNX_PARAMS", "{}")
    monkeypatch.setenv("GPT2ONNX_THREADS", "lots")
    with pytest.raises(InvalidRequestError, match="GPT2ONNX_THREADS"):
        ab.init()
    monkeypatch.setenv("GPT2ONNX_THREADS", "1")
    monkeypatch.setenv("GPT2ONNX_BATCH_SIZE", "0")
    with pytest.raises(InvalidRequestError, match="GPT2ONNX_BATCH_SIZE"):
        ab.init()
    with pytest.raises(gpt2onnx.Gpt2OnnxError, match="init"):
        ab.run(["x.jsonl"])


def test_files_output_writes_one_jsonl_per_input(azureml_env, tmp_path, monkeypatch):
    out_dir = tmp_path / "bi-out"
    out_dir.mkdir()
    monkeypatch.setenv("GPT2ONNX_OUTPUT", "files")
    monkeypatch.setenv("AZUREML_BI_OUTPUT_PATH", str(out_dir))
    a = _write(tmp_path / "a.jsonl", json.dumps({"id": 1, "prompt": "The"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    ab.init()
    assert ab.run([a]) == [a]
    assert ab.run([a]) == [a]  # a retried mini-batch replaces the file
    rows = [json.loads(line) for line in (out_dir / "a.jsonl.out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], "text" in r, "error" in r) for r in rows] == [(1, True, False), ("line-2", False, True)]
    assert sorted(os.listdir(out_dir)) == ["a.jsonl.out.jsonl"]
    monkeypatch.delenv("AZUREML_BI_OUTPUT_PATH")
    with pytest.raises(InvalidRequestError, match="AZUREML_BI_OUTPUT_PATH"):
        ab.init()
