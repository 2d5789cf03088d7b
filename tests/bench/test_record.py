"""The bench result record: validation, atomic writes, clear errors, speed-up ratios."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2onnx.bench import record as results
from gpt2onnx.errors import ArtifactError

from helpers.paths import BENCH_FIXTURES as FIXTURES



def fixture(name: str = "f4s_v2.json") -> dict:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return json.load(f)


def one_line_error(record: dict, match: str) -> str:
    with pytest.raises(ArtifactError) as e:
        results.validate(record, source="run.json")
    msg = str(e.value)
    assert msg.startswith("run.json: ") and "\n" not in msg
    assert match in msg, msg
    return msg


@pytest.mark.parametrize("name", ["f4s_v2.json", "d4as_v4.json", "e4s_v3.json"])
def test_fixtures_are_valid(name):
    rec = results.load(os.path.join(FIXTURES, name))
    assert rec["schema"] == results.SCHEMA == "gpt2onnx.bench/1"


def test_dump_load_round_trip_is_atomic(tmp_path):
    rec = fixture()
    path = tmp_path / "run.json"
    path.write_text("old")
    results.dump(rec, str(path))
    assert results.load(str(path)) == rec
    assert os.listdir(tmp_path) == ["run.json"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode


def test_dump_rejects_invalid_record_and_leaves_old_file(tmp_path):
    path = tmp_path / "run.json"
    results.dump(fixture(), str(path))
    before = path.read_text()
    bad = fixture()
    del bad["model"]
    with pytest.raises(ArtifactError, match="missing field model"):
        results.dump(bad, str(path))
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["run.json"]


def test_load_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ArtifactError, match="nope.json: cannot read bench record"):
        results.load(path)


@pytest.mark.parametrize("content, match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not a text file"),
    (b"[1, 2]", "not a gpt2onnx bench record"),
])
def test_load_corrupt_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as e:
        results.load(str(path))
    assert str(e.value).startswith(str(path)) and match in str(e.value)


def test_schema_newer_older_missing_unknown():
    rec = fixture()
    rec["schema"] = "gpt2onnx.bench/2"
    msg = one_line_error(rec, "newer than this gpt2onnx")
    assert "upgrade gpt2onnx" in msg
    rec["schema"] = "gpt2onnx.bench/0"
    msg = one_line_error(rec, "older than this gpt2onnx")
    assert "re-run the benchmark" in msg
    del rec["schema"]
    one_line_error(rec, "no 'schema' field")
    rec["schema"] = "other.thing/1"
    one_line_error(rec, "unknown schema")


def _set(path: str, value):
    def mutate(rec):
        *parents, last = path.split(".")
        obj = rec
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        if value is KeyError:
            del obj[last]
        else:
            obj[int(last) if last.isdigit() else last] = value
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (_set("environment.cpu_model", KeyError), "missing field environment.cpu_model"),
    (_set("environment.isa.amx", KeyError), "missing field environment.isa.amx"),
    (_set("environment.versions.onnxruntime", KeyError), "missing field environment.versions.onnxruntime"),
    (_set("environment.logical_cores", "4"), "environment.logical_cores must be a non-negative integer"),
    (_set("environment.physical_cores", True), "environment.physical_cores must be a non-negative integer"),
    (_set("environment.affinity", [0, "1"]), "environment.affinity must be a list of integers"),
    (_set("model.precision", "fp16"), "model.precision is 'fp16', expected one of fp32, int8"),
    (_set("model.random_weights", 0), "model.random_weights must be a bool"),
    (_set("results.0.batch_size", "1"), "results[0].batch_size must be a non-negative integer"),
    (_set("results.0.batch_size", 0), "results[0].batch_size must be >= 1"),
    (_set("results.0.runtime", "tensorrt"), "results[0].runtime is 'tensorrt'"),
    (_set("results.0.token_ms.p99", KeyError), "missing field results[0].token_ms.p99"),
    (_set("results.0.token_ms.p50", float("nan")), "results[0].token_ms.p50 must be a finite non-negative"),
    (_set("results.1.tokens_per_s", None), "results[1].tokens_per_s must be a finite non-negative number"),
    (_set("results.0.tokens_per_s", 0), "tokens_per_s must be > 0"),
    (_set("results.0.speed", 1.0), "unknown field results[0].speed"),
    (_set("sku", 4), "sku must be a str"),
    (_set("projection", "no"), "projection must be a bool"),
    (_set("created", "yesterday"), "not an ISO-8601 time"),
    (_set("results", []), "results is empty"),
    (_set("extra", 1), "unknown field extra"),
])
def test_field_errors(mutate, match):
    rec = fixture()
    mutate(rec)
    one_line_error(rec, match)


def test_failed_row_may_have_null_or_missing_figures_and_quality_is_optional():
    rec = fixture("d4as_v4.json")
    failed = rec["results"][2]
    assert failed["error"] and failed["token_ms"] is None
    del failed["load_s"]
    del rec["quality"]
    assert results.validate(rec, source="x") is rec
    del rec["results"][0]["error"]  # absent error = success
    results.validate(rec, source="x")


def test_ratios_of_fixture():
    by = {(r["baseline"], r["batch_size"]): r for r in results.ratios(fixture())}
    assert set(by) == {("pytorch", 1), ("optimum", 1), ("pytorch", 4)}
    r = by[("pytorch", 1)]
    assert r["precision"] == "int8" and r["baseline_precision"] == "fp32"
    assert r["decode_speedup"] == pytest.approx(4.0)  # 40 ms / 10 ms
    assert r["first_token_speedup"] == pytest.approx(3.0)  # 60 / 20
    assert r["tokens_per_s_ratio"] == pytest.approx(4.0)  # 100 / 25
    assert by[("optimum", 1)]["decode_speedup"] == pytest.approx(2.5)
    assert by[("pytorch", 4)]["decode_speedup"] == pytest.approx(4.0)  # 56 / 14


def test_ratios_failed_baseline_and_unmatched_rows():
    rec = fixture("d4as_v4.json")
    out = {r["baseline"]: r for r in results.ratios(rec)}
    assert out["optimum"]["decode_speedup"] is None
    assert out["optimum"]["baseline_error"] == "optimum not installed"
    assert out["pytorch"]["decode_speedup"] == pytest.approx(3.0)
    rec["results"][1]["threads"] = 2  # a pytorch row with other threads is not compared
    assert [r["baseline"] for r in results.ratios(rec)] == ["optimum"]
    rec["results"][0]["error"] = "crashed"  # failed gpt2onnx rows give no ratios
    assert results.ratios(rec) == []


figure = st.floats(min_value=0.01, max_value=1e4, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(ours=st.tuples(figure, figure, figure), base=st.tuples(figure, figure, figure))
def test_ratios_are_baseline_over_ours(ours, base):
    rec = fixture("e4s_v3.json")
    for row, (tok, first, tps) in zip(rec["results"], (ours, base)):
        row["token_ms"]["p50"], row["first_token_ms"]["p50"], row["tokens_per_s"] = tok, first, tps
    (r,) = results.ratios(results.validate(rec, source="x"))
    assert r["decode_speedup"] == pytest.approx(base[0] / ours[0])
    assert r["first_token_speedup"] == pytest.approx(base[1] / ours[1])
    assert r["tokens_per_s_ratio"] == pytest.approx(ours[2] / base[2])

