"""The job and deployment commands: ``batch``, ``eval``, ``azureml-kit``, ``mlflow``.

Each handler imports its library module when it runs, so ``gpt2onnx --help`` stays fast.
"""

from __future__ import annotations

import json
import os

from .common import add_param_flags, param_overrides


def add_parsers(sub) -> None:
    """Register ``batch``, ``eval``, ``azureml-kit`` and ``mlflow``."""
    _add_batch(sub)
    _add_eval(sub)
    _add_azureml_kit(sub)
    _add_mlflow(sub)


def _add_batch(subparsers) -> None:
    b = subparsers.add_parser("batch", help="generate for a JSONL file of prompts: in order, resumable, error rows",
                              description="Generate for every line of INPUT.jsonl into OUTPUT.jsonl. Rerun the same "
                                          "command after a crash to finish the job.")
    b.add_argument("model_dir")
    b.add_argument("input", metavar="INPUT.jsonl")
    b.add_argument("output", metavar="OUTPUT.jsonl")
    b.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="prompts per model call")
    add_param_flags(b)
    b.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_batch)


def _batch(a) -> int:
    from ..batch import run_batch

    s = run_batch(a.model_dir, a.input, a.output, batch_size=a.batch_size, params=param_overrides(a),
                  progress=False if a.no_progress else None, threads=a.threads)
    done = f", {s.skipped_already_done} already done" if s.skipped_already_done else ""
    print(f"{a.output}: {s.ok} ok, {s.errors} errors{done}; {s.tokens} tokens in {s.seconds:.1f} s "
          f"({s.tokens / max(s.seconds, 1e-9):.1f} tokens/s)")
    return 0


def _eval(args) -> int:
    from ..eval import evaluate, format_result

    r = evaluate(args.model_dir, args.task, data=args.data, reference=args.reference, limit=args.limit,
                 progress=not args.json and not args.quiet, threads=args.threads)
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0


def _add_eval(subparsers) -> None:
    from ..eval import LAMBADA_FILE, TASKS, WIKITEXT2_FILE

    p = subparsers.add_parser("eval", help="measure a model folder: WikiText-2 perplexity, LAMBADA, or fidelity "
                                           "against an fp32 reference")
    p.add_argument("model_dir")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data", metavar="PATH", help=f"data file (default: {WIKITEXT2_FILE} or {LAMBADA_FILE} in "
                                                  "the folder $GPT2ONNX_DATA names, else .)")
    p.add_argument("--reference", metavar="SOURCE_OR_DIR",
                   help="fidelity: fp32 model folder, or hub id / save_pretrained folder (needs torch); "
                        "default: the model's recorded source")
    p.add_argument("--limit", type=int, metavar="N", help="first N windows (wikitext2, fidelity) or passages (lambada)")
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
