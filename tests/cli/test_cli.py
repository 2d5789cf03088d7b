"""The command line as a newcomer meets it: help with defaults, one-line warnings and notices,
messages that name the option of the interface in use, progress that reads well in a log."""

from __future__ import annotations

import argparse
import io
import logging

import huggingface_hub
import pytest

import gpt2onnx
from gpt2onnx import artifact, cpu
from gpt2onnx.cli import build_parser, main
from gpt2onnx.errors import ModelDownloadError, UnsupportedModelError
from gpt2onnx import sources
from gpt2onnx.progress import Progress

FAKE_HUB_ID = "gpt2onnx-test-tiny"  # a "known" GPT-2 that no cache holds


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# -- --help shows the defaults -----------------------------------------------------------

@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_of_every_command_shows_each_default_once(command):
    parser = _subparsers()[command]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has a default but no help"
        assert f"(default: {action.default})" in text, (command, action.option_strings[0])
    for action in parser._actions:  # a default stated in the help text and by the formatter: twice
        assert (action.help or "").count("default") <= 1, (command, action.option_strings)


def test_generation_flags_show_the_generation_params_defaults():
    text = " ".join(_subparsers()["generate"].format_help().split())
    d = gpt2onnx.GenerationParams()
    assert f"tokens to generate (default: {d.max_new_tokens})" in text
    assert f"(default: {d.top_k})" in text and "(default: fresh entropy)" in text


# -- one warning line, once -----------------------------------------------------------

def test_oversubscribed_threads_warn_once_on_one_line(tiny_int8, monkeypatch, capsys):
    monkeypatch.setattr(cpu, "physical_cores", lambda: 2)
    monkeypatch.setattr(cpu, "allowed_cpus", lambda: [0, 1])
    argv = ["generate", tiny_int8, "Hello", "--max-new-tokens", "2", "--threads", "13"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "13 threads" in ln]
    assert lines == [lines[0]] and lines[0].startswith("gpt2onnx: warning: 13 threads on 2 physical cores")
    assert main(argv) == 0  # the same count again in this process: not repeated
    assert "13 threads" not in capsys.readouterr().err
    assert not logging.getLogger("gpt2onnx").propagate  # not a second time through the root logger


# -- the download error names the option of the interface in use ------------------------

@pytest.fixture
def offline_tiny_hub_id(monkeypatch):
    """A known hub id that no cache holds, with the Hub unreachable (a refused local port)."""
    monkeypatch.setitem(sources.KNOWN, FAKE_HUB_ID, dict(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    return FAKE_HUB_ID


def test_python_export_without_the_hub_raises_model_download_error(offline_tiny_hub_id, tmp_path):
    with pytest.raises(ModelDownloadError) as e:
        gpt2onnx.export(offline_tiny_hub_id, str(tmp_path / "m"), progress=False)
    assert isinstance(e.value, UnsupportedModelError)
    assert "random_weights=True" in str(e.value) and "--random-weights" not in str(e.value)
    assert not (tmp_path / "m").exists()


def test_cli_export_without_the_hub_names_the_flag(offline_tiny_hub_id, tmp_path, capsys):
    assert main(["export", offline_tiny_hub_id, str(tmp_path / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpt2onnx: error: ")
    assert "--random-weights" in err and "random_weights=True" not in err


def test_random_weights_fallback_is_a_notice_not_an_error(offline_tiny_hub_id, tmp_path, capsys):
    """What the quickstart runs where the Hub is out of reach."""
    out = str(tmp_path / "m")
    assert main(["export", offline_tiny_hub_id, out, "--random-weights-fallback"]) == 0
    err = capsys.readouterr().err
    assert "error" not in err.lower()
    assert f"gpt2onnx: notice: the weights of '{FAKE_HUB_ID}' cannot be downloaded here" in err
    assert "RANDOM WEIGHTS (seed 0)" in err
    assert artifact.read_manifest(out).source.random_weights


# -- progress in a log: plain lines -------------------------------------------------------

def test_export_progress_in_a_log_is_plain_lines(tiny_src, tmp_path, capsys):
    gpt2onnx.export(tiny_src, str(tmp_path / "m"))  # capsys' stderr is not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = [ln for ln in err.splitlines() if ln.startswith("gpt2onnx export: ")]
    assert steps[0].startswith("gpt2onnx export: load model (step 1/6)")
    assert any("verify fp32 parity (step 4/6)" in ln for ln in steps) and steps[-1].startswith("gpt2onnx export: done")


def test_counted_progress_prints_periodic_lines_with_rate_and_eta(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("gpt2onnx.progress.time.monotonic", lambda: now[0])
    out = io.StringIO()
    p = Progress("gpt2onnx batch", total=100, unit="rows", file=out, every=10)
    for _ in range(10):
        now[0] += 2.0
        p.update(5)  # 2.5 rows/s
    p.set_postfix("12.3 tok/s")
    p.total += 10  # an input_data line with more prompts than lines
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "gpt2onnx batch: 25/100 rows (25%), 2.5 rows/s, ETA 00:30"
    assert lines[1] == "gpt2onnx batch: 50/100 rows (50%), 2.5 rows/s, ETA 00:20"
    assert lines[-1] == "gpt2onnx batch: 50/110 rows (45%), 2.5 rows/s, ETA 00:24; 12.3 tok/s"
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_is_a_bar_and_disabled_is_silent():
    out = io.StringIO()
    with Progress("gpt2onnx eval", total=3, unit="windows", file=out, terminal=True) as p:
        p.update(3)
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()
    quiet = io.StringIO()
    with Progress("gpt2onnx eval", total=3, file=quiet, enabled=False) as p:
        p.update(3)
        p.step("x")
    assert quiet.getvalue() == ""
