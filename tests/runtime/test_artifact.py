"""artifact: the typed Manifest of a model folder, its round trip through gpt2onnx.json, and summary().

Damaged folders (missing files, bad sizes and hashes, bad dims, ...) are the table of
tests/runtime/test_artifact_damaged.py; here the typed view itself and the io checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from gpt2onnx import artifact
from gpt2onnx.artifact import Dims, Manifest, Source
from gpt2onnx.errors import ArtifactError
from gpt2onnx.exporter import graph


@pytest.fixture
def folder(tiny_int8, tmp_path):
    """A copy of the tiny int8 folder whose manifest a test may edit."""
    d = tmp_path / "m"
    shutil.copytree(tiny_int8, d)
    return d


def edit(folder, change) -> None:
    path = folder / artifact.MANIFEST
    m = json.loads(path.read_text(encoding="utf-8"))
    change(m)
    path.write_text(json.dumps(m), encoding="utf-8")


def test_typed_fields_of_an_export(tiny_int8):
    m = artifact.read_manifest(tiny_int8)
    assert isinstance(m, Manifest) and m.format_version == artifact.FORMAT_VERSION
    assert m.precision == "int8" and m.name
    assert m.dims == Dims(n_layer=2, n_head=2, n_embd=32, head_dim=16, vocab_size=1000, n_positions=64)
    assert isinstance(m.source, Source) and m.source.random_weights is False and m.source.kind == "local"
    assert 0 <= m.eos_token_id < 1000 and m.bos_token_id == m.eos_token_id
    assert m.inputs == tuple(graph.io_names(2)["inputs"]) and m.outputs == tuple(graph.io_names(2)["outputs"])
    assert m.past_names == ["past_key_values.0.key", "past_key_values.0.value",
                            "past_key_values.1.key", "past_key_values.1.value"]
    assert m.present_names == ["present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    on_disk = {n: os.path.getsize(os.path.join(tiny_int8, n)) for n in os.listdir(tiny_int8) if n != artifact.MANIFEST}
    assert {n: f["bytes"] for n, f in m.files.items()} == on_disk and m.size_bytes == sum(on_disk.values())
    assert m.quantization["scheme"] == "qgemm" and m.fidelity and m.parity and m.tools
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.precision = "fp32"


def test_to_dict_is_a_copy_of_the_json_on_disk(tiny_int8):
    m = artifact.read_manifest(tiny_int8)
    with open(os.path.join(tiny_int8, artifact.MANIFEST), encoding="utf-8") as f:
        assert m.to_dict() == json.load(f)
    d = m.to_dict()
    d["dims"]["n_layer"] = 99
    d["files"].clear()
    assert m.to_dict()["dims"]["n_layer"] == 2 and m.files and m.dims.n_layer == 2


def test_round_trip_through_write_manifest(tiny_int8, folder):
    """What `to_dict` gives, written again (the file table recomputed), reads back as an equal Manifest."""
    m = artifact.read_manifest(tiny_int8)
    body = {k: v for k, v in m.to_dict().items() if k not in ("format", "format_version", "files")}
    artifact.write_manifest(str(folder), body)
    again = artifact.verify(str(folder))  # the recomputed sizes and sha256 match the files
    assert again == m and again.to_dict() == m.to_dict()
    assert again != dataclasses.replace(m, precision="fp32")  # equality compares the fields, not identity


def test_defaults_for_optional_fields(folder):
    def strip(m):
        for key in ("name", "source", "eos_token_id", "bos_token_id", "n_params", "quantization", "parity",
                    "fidelity", "tags", "tools", "opset", "created", "export_seconds"):
            m.pop(key, None)

    edit(folder, strip)
    m = artifact.read_manifest(str(folder))
    assert m.name == "gpt2" and m.source == Source(None, None, None, False, None)
    assert m.eos_token_id == m.bos_token_id == 999  # the last token of the vocabulary
    assert (m.n_params, m.quantization, m.parity, m.fidelity, m.tags, m.tools) == (0, None, {}, None, {}, {})
    edit(folder, lambda d: d.update(eos_token_id=5))
    assert artifact.read_manifest(str(folder)).bos_token_id == 5  # bos defaults to eos


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("io"), r"lacks 'io'"),
    (lambda m: m.update(io=["input_ids"]), r"lacks 'io'"),
    (lambda m: m["io"].update(inputs="input_ids"), r"io.inputs / io.outputs must be lists of names"),
    (lambda m: m["io"].pop("outputs"), r"io.inputs / io.outputs must be lists of names"),
    (lambda m: m["io"]["inputs"].append(7), r"io.inputs / io.outputs must be lists of names"),
    (lambda m: m["io"]["inputs"].remove("past_key_values.1.value"),
     r"io names 4 past/present per cache expected for 2 layers"),
    (lambda m: m["io"]["outputs"].append("present.2.key"), r"io names 4 past/present per cache expected for 2 layers"),
], ids=["missing", "a-list", "inputs-a-string", "no-outputs", "a-number", "past-missing", "present-extra"])
def test_damaged_io_is_refused_in_one_line(folder, change, message):
    edit(folder, change)
    with pytest.raises(ArtifactError, match=message) as e:
        artifact.read_manifest(str(folder))
    assert "\n" not in str(e.value) and ("re-export" in str(e.value))


def test_write_manifest_lists_every_file_but_itself(folder):
    (folder / "sub").mkdir()  # folders are not files of the model
    artifact.write_manifest(str(folder), {"note": "x"})
    written = json.loads((folder / artifact.MANIFEST).read_text(encoding="utf-8"))
    assert written["format"] == artifact.FORMAT and written["format_version"] == artifact.FORMAT_VERSION
    assert written["note"] == "x" and set(written["files"]) == set(os.listdir(folder)) - {artifact.MANIFEST, "sub"}
    assert written["files"]["config.json"]["sha256"] == artifact.sha256_file(str(folder / "config.json"))
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # written atomically: no temp file left


def test_summary_lines(tiny_int8, tiny_fp32, folder):
    lines = artifact.summary(artifact.read_manifest(tiny_int8)).splitlines()
    assert [ln.split()[0] for ln in lines] == ["model", "precision", "dims", "files", "parity", "fidelity", "made",
                                               "created"]
    assert lines[0].endswith("(pretrained)")
    assert lines[1] == "precision  int8 (qgemm), KV cache int8 (PER_CHANNEL)"  # the default for int8
    assert lines[2].startswith("dims       2 layers, 2 heads, 32 dims, vocab 1000, context 64, ")
    assert lines[2].endswith(" M parameters")
    n = len(os.listdir(tiny_int8)) - 1
    assert lines[3].startswith(f"files      {n} files, ")
    assert "onnxruntime " in lines[6]
    fp32 = artifact.summary(artifact.read_manifest(tiny_fp32))
    assert "precision  fp32\n" in fp32 and "fidelity" not in fp32
    edit(folder, lambda m: m["source"].update(random_weights=True, seed=7))
    assert "(RANDOM WEIGHTS (seed 7; text is meaningless))" in artifact.summary(artifact.read_manifest(str(folder)))


def test_the_manifest_hashes_its_own_content(tiny_int8, folder, capsys):
    """An export records the sha256 of its manifest's content; inspect says so, and a folder made before the
    field existed (none) still loads, with the graph checks only."""
    from gpt2onnx import cli

    raw = artifact.read_manifest(tiny_int8).raw
    assert raw[artifact.SELF_HASH] == artifact.content_sha256(raw)
    assert artifact.content_sha256({**raw, "name": "other"}) != raw[artifact.SELF_HASH]
    assert cli.main(["inspect", str(folder)]) == 0
    assert "manifest   agrees with config.json and model.onnx, its own sha256 verified" in capsys.readouterr().out
    edit(folder, lambda m: m.pop(artifact.SELF_HASH))
    assert cli.main(["inspect", str(folder)]) == 0
    assert "(no manifest_sha256: an older export)" in capsys.readouterr().out
    edit(folder, lambda m: m.update(precision="fp32"))  # no self-hash to catch it: the graph does
    with pytest.raises(ArtifactError, match="says precision 'fp32' but model.onnx has 'int8'"):
        artifact.verify(str(folder), check_hashes=False)


@pytest.mark.parametrize("fixture", ["tiny_fp32", "tiny_int8_kvfp32", "tiny_int4"])
def test_every_kind_of_export_agrees_with_its_graph(fixture, request):
    """fp32, int8 with an fp32 cache and int4 (tiny_int8 is the damaged folders' source) pass their own checks."""
    from gpt2onnx.graphcheck import read_graph

    folder = request.getfixturevalue(fixture)
    m = artifact.verify(folder)
    g = read_graph(os.path.join(folder, "model.onnx"))
    assert g.precision == m.precision and len(g.attention) == m.dims.n_layer


@pytest.mark.slow
def test_124m_exports_agree_with_their_graphs_and_an_edited_precision_is_refused(gpt2_124m, tmp_path):
    """At real scale (outlier channels split off in fp32 MatMuls, block-128 int8, the int4 table ladder) every
    export passes its own checks, and the issue's edit (int8 -> fp32, which broke batch invariance) is refused."""
    from gpt2onnx.graphcheck import read_graph

    for precision, folder in gpt2_124m.items():
        m = artifact.verify(folder, check_hashes=False)
        assert read_graph(os.path.join(folder, "model.onnx")).precision == m.precision == precision
    src, d = gpt2_124m["int8"], tmp_path / "edited"
    d.mkdir()
    for name in os.listdir(src):  # the weights by link: only the manifest changes
        (d / name).symlink_to(os.path.join(src, name)) if name == "model.onnx.data" else shutil.copy(
            os.path.join(src, name), d / name)
    edit(d, lambda m: (m.update(precision="fp32", quantization=None),
                       m.update({artifact.SELF_HASH: artifact.content_sha256(m)})))
    with pytest.raises(ArtifactError, match="says precision 'fp32' but model.onnx has 'int8'"):
        artifact.verify(str(d), check_hashes=False)
