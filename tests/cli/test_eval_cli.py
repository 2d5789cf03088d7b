"""`gpt2onnx eval` as the README shows it: fidelity needs no downloaded data, and every task has a
default --limit that is printed (0 scores all)."""

from __future__ import annotations

import json

import pytest

from gpt2onnx.cli import main
from gpt2onnx.eval import DEFAULT_LIMITS, GATE_TEXT, fidelity
from gpt2onnx.exporter import policy

from helpers.paths import WIKI_SLICE


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No eval data anywhere: an empty $GPT2ONNX_DATA and an empty working folder."""
    monkeypatch.setenv("GPT2ONNX_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def wiki_raw(tmp_path_factory) -> str:
    """The first ~12 KB of the WikiText-2 slice as a raw file: 5 windows of the tiny model (64/32)."""
    with open(WIKI_SLICE, encoding="utf-8") as f:
        raw = f.read()
    path = tmp_path_factory.mktemp("wiki") / "wiki.test.raw"
    path.write_text(raw[:raw.index("\n", 12000) + 1], encoding="utf-8")
    return str(path)


def test_fidelity_runs_on_the_shipped_gate_text_without_data(tiny_int8, no_data, capsys):
    assert main(["eval", tiny_int8, "--task", "fidelity", "--json", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert (r["data"], r["data_shipped"], r["windows"]) == (GATE_TEXT, True, DEFAULT_LIMITS["fidelity"])
    assert not r["gate_missed"]  # the exporter passed this model on the same text
    assert f"the first {DEFAULT_LIMITS['fidelity']} windows (the default --limit; --limit 0 scores all" in cap.err
    assert main(["eval", tiny_int8, "--task", "fidelity", "--threads", "1", "--quiet"]) == 0
    assert "shipped with gpt2onnx: the WikiText-2 test tail the exporter gates on" in capsys.readouterr().out


def test_the_fidelity_default_is_the_exporters_gate_windows():
    assert DEFAULT_LIMITS["fidelity"] == policy.GATE_WINDOWS


def test_default_limit_and_limit_0_for_all(tiny_fp32, wiki_raw, capsys, monkeypatch):
    monkeypatch.setitem(DEFAULT_LIMITS, "wikitext2", 2)  # the tiny model's windows are short: 5 in wiki_raw
    args = ["eval", tiny_fp32, "--task", "wikitext2", "--data", wiki_raw, "--json", "--threads", "1"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["windows"] == 2 and "the first 2 windows (the default --limit" in cap.err
    assert main([*args, "--limit", "0"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert r["windows"] == len(list(fidelity.windows(r["tokens_total"], r["max_length"], r["stride"]))) > 2
    assert "default --limit" not in cap.err
    assert main([*args, "--limit", "-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--limit must be 0 (all) or a positive number of windows, got -1" in err
