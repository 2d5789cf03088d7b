"""The `gpt2onnx` command: a thin argparse layer over the library functions.

Every error is one line on stderr and a non-zero exit code; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .errors import Gpt2OnnxError


def _export(a) -> int:
    from .artifact import summary
    from .export import export

    m = export(a.source, a.outdir, precision=a.precision, force=a.force, random_weights=a.random_weights,
               seed=a.seed, tokenizer=a.tokenizer, progress=not a.quiet,
               accept_fidelity_miss=a.accept_fidelity_miss)
    print(summary(m))
    print(f"wrote {a.outdir} in {m['export_seconds']:.1f} s")
    return 0


def _inspect(a) -> int:
    from .artifact import summary, verify

    m = verify(a.model_dir, check_hashes=not a.no_hash)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        print(summary(m))
        print("files      all present" + (", sizes and sha256 verified" if not a.no_hash else ", sizes verified"))
    return 0


def _param_overrides(a) -> dict:
    """CLI flags and --params JSON -> GenerationParams keys (flags win)."""
    from .errors import InvalidRequestError

    out = {}
    if getattr(a, "params", None):
        try:
            out = json.loads(a.params)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"--params is not valid JSON ({e.msg}); pass e.g. '{{\"top_p\": 0.9}}'") from None
        if not isinstance(out, dict):
            raise InvalidRequestError("--params must be a JSON object, e.g. '{\"top_p\": 0.9}'")
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if getattr(a, key, None) is not None:
            out[key] = getattr(a, key)
    if getattr(a, "do_sample", False):
        out["do_sample"] = True
    if getattr(a, "stop", None):
        out["stop"] = a.stop
    if getattr(a, "ignore_eos", False):
        out["ignore_eos"] = True
    if getattr(a, "truncation", False):
        out["truncation"] = True
    return out


def _add_param_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_new_tokens")
    p.add_argument("--truncation", action="store_true", help="drop prompt tokens from the left to fit the context")
    p.add_argument("--params", metavar="JSON", help="generation parameters as JSON (Hugging Face names)")


def _generate(a) -> int:
    import time

    from .params import GenerationParams
    from .runtime import load

    t0 = time.perf_counter()
    gen = load(a.model_dir, threads=a.threads)
    load_s = time.perf_counter() - t0
    params = GenerationParams.from_dict(_param_overrides(a))
    random = gen.manifest.get("source", {}).get("random_weights")
    if random and not a.json:
        print("note: this model has RANDOM WEIGHTS; the text is meaningless (benchmarking only)", file=sys.stderr)
    t1 = time.perf_counter()
    first = None
    if a.stream and not a.json:
        steps = gen.generate_tokens(a.prompt, params)  # a bad prompt fails here, before anything is printed
        if params.return_full_text:
            print(a.prompt, end="", flush=True)
        n, reason = 0, None
        for step in steps:
            first = first or time.perf_counter()
            n += 1
            reason = step.finish_reason
            print(step.text, end="", flush=True)
        print()
    else:
        r = gen.generate(a.prompt, params)[0]
        n, reason = r.generated_tokens, r.finish_reason
        if a.json:
            print(json.dumps({"text": r.text, "token_ids": list(r.token_ids), "prompt_tokens": r.prompt_tokens,
                              "generated_tokens": n, "finish_reason": reason, "random_weights": bool(random)}))
        else:
            print(r.text)
    total = time.perf_counter() - t1
    if a.timing:
        ttft = f"first token {1e3 * (first - t1):.0f} ms, " if first else ""
        print(f"[{gen.manifest['precision']} {gen.manifest['name']}, {gen.threads} threads] load {load_s:.2f} s, "
              f"{ttft}{n} tokens in {total:.2f} s = {n / total:.1f} tokens/s "
              f"({1e3 * total / max(n, 1):.1f} ms/token incl. prompt), finish: {reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2onnx", description="GPT-2 on CPU with onnxruntime: export, run, measure.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("export", help="export GPT-2 to an ONNX model folder (fp32 or int8), verified against PyTorch")
    e.add_argument("source", help="hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) or save_pretrained folder")
    e.add_argument("outdir", help="model folder to create")
    e.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    e.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    e.add_argument("--random-weights", action="store_true",
                   help="seeded random weights instead of loading them (benchmarks only: the text is meaningless)")
    e.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    e.add_argument("--tokenizer", metavar="DIR", help="folder with vocab.json + merges.txt or tokenizer.json")
    e.add_argument("--accept-fidelity-miss", action="store_true",
                   help="keep an int8 export that misses the fidelity gate (recorded in the manifest and card)")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.set_defaults(func=_export)

    i = sub.add_parser("inspect", help="print a model folder's manifest summary and verify its files")
    i.add_argument("model_dir")
    i.add_argument("--no-hash", action="store_true", help="check sizes only, skip sha256")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=_inspect)

    g = sub.add_parser("generate", help="generate text for a prompt")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    _add_param_flags(g)
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.add_argument("--timing", action="store_true", help="print a latency line on stderr")
    g.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    g.set_defaults(func=_generate)

    # Subcommands that live beside their code (each module's add_parser).
    from . import azureml, batch, bench, eval as evaluation
    from .integrations import mlflow

    batch.add_parser(sub)
    azureml.add_parser(sub)
    bench.add_parser(sub)
    evaluation.add_parser(sub)
    mlflow.add_parser(sub)
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
