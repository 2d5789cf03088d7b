"""The `gpt2onnx` command: the one argparse layer over the library functions.

>>> main(["inspect", "out/gpt2-int8"])     # doctest: +SKIP
0

Commands live in `model` (export, inspect, generate), `jobs` (batch, eval,
azureml-kit, mlflow) and `bench` (bench, skus, report); library modules never print
or parse arguments, this package does.

Every error is one line on stderr and a non-zero exit code; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from ..errors import Gpt2OnnxError


def build_parser() -> argparse.ArgumentParser:
    """The whole ``gpt2onnx`` argument parser."""
    from . import bench, jobs, model

    p = argparse.ArgumentParser(prog="gpt2onnx", description="GPT-2 on CPU with onnxruntime: export, run, measure.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    model.add_parsers(sub)
    jobs.add_parsers(sub)
    bench.add_parsers(sub)
    return p


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
        print(f"gpt2onnx: internal error: {e.__class__.__name__}: {str(e)[:200]} "
              "(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 3


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
