"""cli.main: exit codes and what reaches stderr, whatever the command.

0 ok, 1 a `Gpt2OnnxError` (one line "gpt2onnx: error: ..."), 2 usage (argparse), 3 a bug
(one line "internal error", unless --debug), 130 Ctrl-C; --debug shows the traceback.
Each command's own errors are tested next to it; here the rule, through `inspect`.
"""

from __future__ import annotations

import logging
import sys

import pytest

from gpt2onnx import artifact, cli
from gpt2onnx.cli import main
from gpt2onnx.errors import ArtifactError


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr()
    assert out.out.startswith("usage: gpt2onnx") and "export" in out.out and "inspect" in out.out
    assert out.err == ""


@pytest.mark.parametrize("argv,message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["inspect"], "the following arguments are required: model_dir"),
    (["exprot", "gpt2", "out"], "invalid choice: 'exprot'"),
    (["generate", "m", "hi", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
])
def test_usage_errors_exit_2_with_argparse_usage(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gpt2onnx") and message in err and "Traceback" not in err, err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert main(["inspect", "--help"]) == 0
    assert "model_dir" in capsys.readouterr().out


def test_library_error_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("gpt2onnx: error: model folder ") and "does not exist" in out.err


def test_debug_shows_the_traceback_then_the_line(tmp_path, capsys):
    assert main(["--debug", "inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ArtifactError" in err
    assert err.splitlines()[-1].startswith("gpt2onnx: error: model folder ")


@pytest.mark.parametrize("exc,rc,line", [
    (KeyboardInterrupt(), 130, "gpt2onnx: interrupted\n"),
    (RuntimeError("boom\n  second line"), 3, "gpt2onnx: internal error: RuntimeError: boom second line (rerun "
                                             "with --debug for the traceback and please report it)\n"),  # one line
    (BrokenPipeError(), 0, ""),  # `gpt2onnx inspect m | head -1`
    (ArtifactError("bad folder; re-export it"), 1, "gpt2onnx: error: bad folder; re-export it\n"),
])
def test_exit_code_of_each_kind_of_failure(monkeypatch, capsys, exc, rc, line):
    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(artifact, "verify", fail)  # what `inspect` calls first
    assert main(["inspect", "m"]) == rc
    assert capsys.readouterr().err == line


def test_a_bug_with_debug_shows_the_traceback(monkeypatch, capsys):
    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(artifact, "verify", fail)
    assert main(["--debug", "inspect", "m"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and 'raise RuntimeError("boom")' in err
    assert err.splitlines()[-1].startswith("gpt2onnx: internal error: RuntimeError: boom")


def test_console_script_exits_with_mains_code(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpt2onnx", "--no-such-flag"])
    with pytest.raises(SystemExit) as e:
        cli.main_exit()
    assert e.value.code == 2


def test_library_log_records_are_one_line_each_once(capsys):
    log = logging.getLogger(cli.LOGGER)
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    try:
        cli.configure_logging()
        cli.configure_logging()  # idempotent: still one handler
        log.warning("two\n  lines")
        log.debug("hidden without --debug")
        assert capsys.readouterr().err == "gpt2onnx: warning: two lines\n"
        cli.configure_logging(debug=True)
        log.debug("shown")
        assert capsys.readouterr().err == "gpt2onnx: debug: shown\n"
    finally:
        log.handlers[:], log.propagate = handlers, propagate
        log.setLevel(level)
