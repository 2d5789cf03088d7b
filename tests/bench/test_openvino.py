"""The OpenVINO GenAI baseline of the bench: reported as not run without its packages; a row when installed."""

from __future__ import annotations

import copy
import importlib.util
import os
import stat
import sys

import pytest

from gpt2onnx import bench
from gpt2onnx.bench import record as results, runs as benchruns

SMALL = dict(batch_sizes=[1], prompt_tokens=[4], new_tokens=2, repeats=1, warmup=0, progress=False, bandwidth_mib=32)
HINT = "(bash scripts/install_openvino.sh)"


def _ov_python() -> str:
    return os.environ.get(benchruns.OPENVINO_PYTHON_ENV) or sys.executable


def _has_openvino() -> bool:
    return not benchruns.missing_packages("openvino")


@pytest.fixture
def no_openvino_genai(monkeypatch):
    """This interpreter, with openvino_genai hidden (whether or not it is installed)."""
    monkeypatch.delenv(benchruns.OPENVINO_PYTHON_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "openvino_genai" else real(name, *a, **k))


@pytest.fixture
def not_run(no_openvino_genai, tiny_int8, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2ONNX_CACHE", str(tmp_path / "cache"))
    return bench.run_bench(tiny_int8, baselines=["openvino"], out_dir=str(tmp_path), **SMALL)


def test_not_run_without_openvino_genai(not_run, tmp_path):
    rows = {(r["runtime"], r["precision"]): r for r in not_run["results"]}
    assert set(rows) == {("gpt2onnx", "int8"), ("openvino", "int8")}
    assert rows[("gpt2onnx", "int8")]["error"] is None
    ov = rows[("openvino", "int8")]
    missing = ", ".join(benchruns.missing_packages("openvino"))  # openvino-genai, and whatever else is absent
    assert ov["error"] == f"not run: needs {missing} {HINT}" and missing.startswith("openvino-genai")
    assert ov["tokens_per_s"] is None and ov["token_ms"] is None
    assert not os.path.exists(os.path.join(tmp_path, "cache"))  # no export attempted
    [ratio] = results.ratios(not_run)
    assert ratio["baseline"] == "openvino" and ratio["baseline_error"] == ov["error"]
    table = bench.format_table(not_run)
    assert "vs openvino int8" in table and "openvino int8: not run: needs openvino-genai" in table


def test_openvino_is_opt_in():
    assert "openvino" in bench.BASELINES
    assert bench.run.DEFAULT_BASELINES == ("pytorch", "optimum")


def test_another_interpreter_is_asked(tmp_path, monkeypatch):
    """$GPT2ONNX_OPENVINO_PYTHON: that interpreter's packages count; a broken one is named."""
    fake = tmp_path / "python"  # this Python without site-packages: none of the baseline's packages
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(benchruns.OPENVINO_PYTHON_ENV, str(fake))
    assert benchruns.baseline_python("openvino") == str(fake)
    assert benchruns.baseline_python("pytorch") == sys.executable
    missing = benchruns.missing_packages("openvino")
    assert missing[:2] == ["openvino-genai", "openvino"] and "optimum-intel" in missing
    monkeypatch.setenv(benchruns.OPENVINO_PYTHON_ENV, str(tmp_path / "no-such-python"))
    assert benchruns.missing_packages("openvino") == [
        f"a working Python at ${benchruns.OPENVINO_PYTHON_ENV}={tmp_path / 'no-such-python'}"]


def test_report_shows_the_openvino_baseline(not_run, tmp_path):
    from gpt2onnx.bench.report import build_report

    rec = copy.deepcopy(not_run)
    ours = next(r for r in rec["results"] if r["runtime"] == "gpt2onnx")
    ov = next(r for r in rec["results"] if r["runtime"] == "openvino")
    ov.update({k: copy.deepcopy(v) for k, v in ours.items() if k not in ("runtime", "precision")})
    ov["token_ms"] = {q: 2 * v for q, v in ours["token_ms"].items()}  # a baseline twice as slow per step
    path = str(tmp_path / "rec.json")
    results.dump(rec, path)
    rep = build_report([path], str(tmp_path / "report"))
    md = open(rep.markdown_path, encoding="utf-8").read()
    assert "| openvino | int8 |" in md and "openvino int8 | 2.00x |" in md


@pytest.mark.skipif(not _has_openvino(), reason=f"OpenVINO GenAI is not installed for {_ov_python()} "
                                                 "(bash scripts/install_openvino.sh)")
def test_openvino_run_makes_a_row(tiny_int8, tmp_path, monkeypatch):
    """Needs the OpenVINO packages: optimum-intel's int8 export of the tiny model, then LLMPipeline at b1 and b8,
    plain and capped (one export for both).

    8 x 40 prompt tokens pass the scheduler's default budget of 256 per step: the run
    must still prefill the batch in one step (every step a batch of 8).
    """
    monkeypatch.setenv("GPT2ONNX_CACHE", str(tmp_path / "cache"))
    rec = bench.run_bench(tiny_int8, baselines=["openvino", "openvino-capped"], out_dir=str(tmp_path / "results"),
                          **{**SMALL, "batch_sizes": [1, 8], "prompt_tokens": [40], "new_tokens": 3})
    ov = [r for r in rec["results"] if r["runtime"].startswith("openvino")]
    assert [(r["runtime"], r["precision"], r["batch_size"]) for r in ov] == [
        ("openvino", "int8", 1), ("openvino-capped", "int8", 1), ("openvino", "int8", 8),
        ("openvino-capped", "int8", 8)]  # the capped one: ONEDNN_MAX_CPU_ISA and f32 accepted
    for r in ov:
        assert r["error"] is None, r["error"]
        assert 0 < r["token_ms"]["p50"] <= r["token_ms"]["p90"] <= r["token_ms"]["p99"]
        assert r["first_token_ms"]["p50"] > 0 and r["tokens_per_s"] > 0 and r["floor_ratio"] > 0
        assert r["load_s"] > 0 and r["peak_rss_mb"] > 0
    assert "openvino-genai" in rec["environment"]["versions"]
    [entry] = os.listdir(os.path.join(tmp_path, "cache", "openvino"))  # $GPT2ONNX_CACHE, not --out
    [ir] = os.listdir(os.path.join(tmp_path, "cache", "openvino", entry))
    assert len(os.listdir(os.path.join(tmp_path, "results"))) == 1  # the record alone
    assert ir.startswith("int8-")
    assert {r["baseline"] for r in results.ratios(rec)} == {"openvino", "openvino-capped"}
    assert all(r["decode_speedup"] > 0 for r in results.ratios(rec))
