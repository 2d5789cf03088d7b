"""The `gpt2onnx` command: the one argparse layer over the library functions.

For example::

    main(["inspect", "out/gpt2-int8"])
    # -> 0

Commands live in `model` (export, inspect, generate), `jobs` (batch, eval,
azureml-kit, mlflow) and `bench` (bench, skus, report); library modules never print
or parse arguments, this package does.

Every error is one line on stderr and a non-zero exit code; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from ..errors import Gpt2OnnxError

LOGGER = "gpt2onnx"  # library modules log warnings here (e.g. cpu.warn_oversubscribed)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every real default, as "(default: X)"; None / False / a help text
    that states its own default (e.g. "default: physical cores") are left as they are."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:  # 0 == False
            return text
        return super()._get_help_string(action)

    def _split_lines(self, text, width):
        import textwrap

        # never inside a hyphenated word: "shared-nocache" stays one word
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``gpt2onnx`` argument parser."""
    from . import bench, jobs, model

    p = argparse.ArgumentParser(prog="gpt2onnx", description="GPT-2 on CPU with onnxruntime: export, run, measure.",
                                formatter_class=DefaultsFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    model.add_parsers(sub)
    jobs.add_parsers(sub)
    bench.add_parsers(sub)
    for command in sub.choices.values():
        command.formatter_class = DefaultsFormatter
    return p


class _StderrHandler(logging.Handler):
    """One line per record on the current sys.stderr: 'gpt2onnx: warning: ...'."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = " ".join(record.getMessage().split())  # one line, whatever the message holds
            print(f"gpt2onnx: {record.levelname.lower()}: {msg}", file=sys.stderr, flush=True)
        except Exception:  # logging must never break the command
            self.handleError(record)


def configure_logging(debug: bool = False) -> None:
    """Show the library's log records on stderr, each once and on one line (idempotent)."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.propagate = False  # not again through a root handler
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.debug)
    try:
        return int(args.func(args) or 0)
    except Gpt2OnnxError as e:
        if args.debug:
            traceback.print_exc()
        print(f"gpt2onnx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpt2onnx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"gpt2onnx: internal error: {e.__class__.__name__}: {' '.join(str(e).split())[:200]} "
              "(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 3


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
