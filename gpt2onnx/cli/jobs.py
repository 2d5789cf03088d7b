"""The job and deployment commands: ``batch``, ``eval``, ``azureml-kit``, ``azureml-bench-kit``, ``mlflow``.

Each handler imports its library module when it runs, so ``gpt2onnx --help`` stays fast.
"""

from __future__ import annotations

import json
import os

from .._prefix import DEFAULT_MB as PREFIX_CACHE_MB
from .common import add_param_flags, param_overrides


def add_parsers(sub) -> None:
    """Register ``batch``, ``eval``, ``azureml-kit``, ``azureml-bench-kit`` and ``mlflow``."""
    _add_batch(sub)
    _add_eval(sub)
    _add_azureml_kit(sub)
    _add_azureml_bench_kit(sub)
    _add_mlflow(sub)


def _add_batch(subparsers) -> None:
    from ..batch.core import BATCHING

    b = subparsers.add_parser("batch", help="generate for a JSONL file of prompts: in order, resumable, error rows",
                              description="Generate for every line of INPUT.jsonl into OUTPUT.jsonl. Rerun the same "
                                          "command after a crash to finish the job.")
    b.add_argument("model_dir")
    b.add_argument("input", metavar="INPUT.jsonl")
    b.add_argument("output", metavar="OUTPUT.jsonl")
    b.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="rows decoding together")
    b.add_argument("--batching", choices=BATCHING, default=BATCHING[0],
                   help="continuous: a finished row's slot takes the next prompt at once; static: batches run to "
                        "their end (same output)")
    add_param_flags(b, help={"seed": "job seed: each row without a seed of its own gets one derived from it and "
                                     "its place in the input, the same on a resume (default: drawn at random and "
                                     "kept in OUTPUT.state)"})
    b.add_argument("--threads", type=int, help="intra-op threads per worker (default: physical cores // workers)")
    b.add_argument("--workers", type=int, default=1,
                   help="processes generating, each with its own copy of the model; this one writes OUTPUT in order")
    b.add_argument("--prefix-cache-mb", dest="prefix_cache_mb", type=float, default=PREFIX_CACHE_MB,
                   help="MiB per process for the keys and values of full prompt blocks (64 tokens), reused by later "
                        "prompts that start with them (shared instructions, few-shot heads; least recently used "
                        "out first; same output); 0 turns it off")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_batch)


def _batch(a) -> int:
    from .._prefix import PrefixStats
    from ..batch import run_batch
    from ..batch.job import prefix_line

    s = run_batch(a.model_dir, a.input, a.output, batch_size=a.batch_size, params=param_overrides(a),
                  progress=not a.no_progress, threads=a.threads, batching=a.batching, workers=a.workers,
                  prefix_cache_mb=a.prefix_cache_mb)
    done = f", {s.skipped_already_done} already done" if s.skipped_already_done else ""
    prefix = PrefixStats(s.prefix_cache_hits, s.prefix_cache_misses, s.prefix_cache_saved_tokens)
    print(f"{a.output}: {s.ok} ok, {s.errors} errors{done}; {s.tokens} tokens in {s.seconds:.1f} s "
          f"({s.tokens / max(s.seconds, 1e-9):.1f} tokens/s)" + (f"; {prefix_line(prefix)}" if a.prefix_cache_mb else ""))
    return 0


def _eval(args) -> int:
    import sys

    from ..errors import InvalidRequestError
    from ..eval import DEFAULT_LIMITS, evaluate, format_result

    unit = "passages" if args.task == "lambada" else "windows"
    limit = DEFAULT_LIMITS[args.task] if args.limit is None else args.limit or None  # 0: all
    if args.limit is not None and args.limit < 0:
        raise InvalidRequestError(f"--limit must be 0 (all) or a positive number of {unit}, got {args.limit}")
    if args.limit is None and not args.quiet:
        print(f"gpt2onnx eval: the first {limit} {unit} (the default --limit; --limit 0 scores all, which takes "
              "longer: see docs/quality.md)", file=sys.stderr)
    r = evaluate(args.model_dir, args.task, data=args.data, reference=args.reference, limit=limit,
                 progress=not args.json and not args.quiet, threads=args.threads)
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0


def _add_eval(subparsers) -> None:
    from ..eval import DEFAULT_LIMITS, LAMBADA_FILE, TASKS, WIKITEXT2_FILE

    p = subparsers.add_parser("eval", help="measure a model folder: WikiText-2 perplexity, LAMBADA, or fidelity "
                                           "against an fp32 reference")
    p.add_argument("model_dir")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data", metavar="PATH", help=f"data file (default: {WIKITEXT2_FILE} or {LAMBADA_FILE} in "
                                                  "the folder $GPT2ONNX_DATA names, else .; fidelity: the exporter's "
                                                  "gate text, shipped)")
    p.add_argument("--reference", metavar="SOURCE_OR_DIR",
                   help="fidelity: fp32 model folder, or hub id / save_pretrained folder (needs torch); "
                        "default: the model's recorded source")
    p.add_argument("--limit", type=int, metavar="N",
                   help="first N windows (wikitext2, fidelity) or passages (lambada); 0: all (default: "
                        + ", ".join(f"{t} {n}" for t, n in DEFAULT_LIMITS.items()) + ")")
    p.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


def _add_azureml_kit(subparsers) -> None:
    k = subparsers.add_parser("azureml-kit", help="write an Azure ML online-endpoint kit (score.py, env, YAML)",
                              description="Write score.py, a conda environment and endpoint/deployment YAML for a "
                                          "model folder; deploy with 'az ml' (see docs/azureml.md).")
    k.add_argument("model_dir")
    k.add_argument("outdir")
    k.add_argument("--instance-type", dest="instance_type", default="Standard_F4s_v2",
                   help="Azure VM size; sets GPT2ONNX_THREADS to its physical cores")
    k.add_argument("--endpoint", default="gpt2onnx", help="endpoint name")
    k.add_argument("--deployment", default="blue", help="deployment name")
    k.add_argument("--model-name", dest="model_name", help="registered model name (default from the manifest)")
    k.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    k.set_defaults(func=_azureml_kit)


def _azureml_kit(a) -> int:
    from ..integrations.azureml_kit import write_kit

    out = write_kit(a.model_dir, a.outdir, instance_type=a.instance_type, endpoint=a.endpoint,
                    deployment=a.deployment, model_name=a.model_name, force=a.force)
    print(f"wrote {out}; next: cd {out} && az ml model create -f model.yml && "
          "az ml online-endpoint create -f endpoint.yml && "
          "az ml online-deployment create -f deployment.yml --all-traffic")
    return 0


def _add_azureml_bench_kit(subparsers) -> None:
    k = subparsers.add_parser(
        "azureml-bench-kit", help="write Azure ML command jobs that benchmark one VM size each (+ submit/collect)",
        description="Write one Azure ML command job per VM size (YAML and azure-ai-ml Python) on a cluster of that "
                    "size, submit.sh and collect.sh; see docs/azureml_bench.md.")
    k.add_argument("outdir", help="kit folder to create")
    k.add_argument("--skus", required=True, metavar="SIZE[,SIZE]", help="Azure VM sizes (see 'gpt2onnx skus')")
    k.add_argument("--model", default="gpt2", help="hub id or folder each node exports")
    k.add_argument("--precision", default="int8,fp32", help="comma list of precisions to export and bench")
    k.add_argument("--random-weights", action="store_true", help="export seeded random weights (no Hub needed)")
    k.add_argument("--batch-sizes", default="1,8", metavar="N[,M]", help="bench grid: batch sizes")
    k.add_argument("--prompt-tokens", default="32,128", metavar="N[,M]", help="bench grid: prompt lengths")
    k.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    k.add_argument("--baselines", default="pytorch,optimum", help="comma list of pytorch, optimum; or none")
    k.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    k.add_argument("--prices", metavar="TOML", help="VM prices per hour: writes COST.md, the estimated cost per run")
    k.add_argument("--experiment", default="gpt2onnx-bench", help="Azure ML experiment name")
    k.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    k.set_defaults(func=_azureml_bench_kit)


def _azureml_bench_kit(a) -> int:
    from ..bench import parse_int_list
    from ..integrations.azureml_bench_kit import write_bench_kit

    def words(text: str) -> list[str]:
        return [w.strip() for w in text.split(",") if w.strip()]

    out = write_bench_kit(a.outdir, skus=words(a.skus), model=a.model, precisions=words(a.precision),
                          random_weights=a.random_weights, batch_sizes=parse_int_list(a.batch_sizes, "--batch-sizes"),
                          prompt_tokens=parse_int_list(a.prompt_tokens, "--prompt-tokens"), new_tokens=a.new_tokens,
                          baselines=[b for b in words(a.baselines) if b != "none"], repeats=a.repeats,
                          prices_path=a.prices, experiment=a.experiment, force=a.force)
    print(f"wrote {out}; next: bash {os.path.join(out, 'submit.sh')} && bash {os.path.join(out, 'collect.sh')} "
          "PRICES.toml (see docs/azureml_bench.md)")
    if a.prices:
        print(f"estimated cost per run: {os.path.join(out, 'COST.md')}")
    return 0


def _add_mlflow(subparsers) -> None:
    from ..integrations.mlflow import BATCH_SIZE

    p = subparsers.add_parser("mlflow", help="package a model folder as an MLflow pyfunc model (+ Azure ML model.yml)")
    p.add_argument("model_dir", help="model folder written by 'gpt2onnx export'")
    p.add_argument("out", help="MLflow model folder to create")
    p.add_argument("--name", help="Azure ML model name in model.yml (default: NAME-onnx-PRECISION)")
    p.add_argument("--version", default="1", help="Azure ML model version in model.yml")
    p.add_argument("--description", help="model description (default: from the manifest)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=BATCH_SIZE,
                   help="prompts per generate call in predict")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_mlflow)


def _mlflow(args) -> int:
    from ..integrations.mlflow import PARAM_DEFAULTS, package_mlflow

    out = package_mlflow(args.model_dir, args.out, name=args.name, version=args.version,
                         description=args.description, batch_size=args.batch_size, force=args.force)
    print(f"wrote MLflow model {out} (pyfunc; params {', '.join(PARAM_DEFAULTS)})")
    print(f"register: az ml model create -f {os.path.join(out, 'model.yml')} -g RESOURCE_GROUP -w WORKSPACE")
    return 0
