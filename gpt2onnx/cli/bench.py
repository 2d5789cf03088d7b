"""The measurement commands: ``bench``, ``skus``, ``report``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import InvalidRequestError


def _bench_cmd(a) -> int:
    from ..bench import BANDWIDTH_MIB, format_table, parse_int_list
    from ..bench.run import run_with_path

    if a.scenario == "job":
        return _job_cmd(a)
    record, path = run_with_path(
        a.model_dir, sku=a.sku, batch_sizes=parse_int_list(a.batch_sizes, "--batch-sizes"),
        prompt_tokens=parse_int_list(a.prompt_tokens, "--prompt-tokens"), new_tokens=a.new_tokens,
        threads=parse_int_list(a.threads, "--threads") if a.threads else None, baselines=a.baselines,
        repeats=a.repeats, warmup=a.warmup, out_dir=a.out, progress=not a.quiet, bandwidth_mib=BANDWIDTH_MIB)
    print(format_table(record, sku_warnings=a.quiet))  # with progress, run_bench showed them at the start
    print(f"wrote {path}")
    return 0


def _job_cmd(a) -> int:
    import json

    from ..bench import parse_int_list
    from ..bench.jobbench import format_job_table, run_job_bench

    batch = parse_int_list(a.batch_sizes, "--batch-sizes")
    threads = parse_int_list(a.threads, "--threads")[0] if a.threads else None
    modes = [m.strip() for m in a.job_modes.split(",") if m.strip()]
    rec = run_job_bench(os.path.abspath(a.model_dir), prompts=a.job_prompts, batch_size=max(batch), threads=threads,
                        repeats=a.repeats, progress=not a.quiet, workers=parse_int_list(a.workers, "--workers"),
                        modes=modes, cache_dir=os.path.join(a.out, ".cache"))
    print(format_job_table(rec))
    os.makedirs(a.out, exist_ok=True)
    layouts = "" if rec["settings"]["layouts"] == [f"1x{rec['runs'][0]['threads']}"] else \
        "-" + "_".join(rec["settings"]["layouts"])
    path = os.path.join(a.out, f"job-{os.path.basename(os.path.abspath(a.model_dir))}-{a.job_prompts}{layouts}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2)
    print(f"wrote {path}")
    return 0


def _skus_cmd(a) -> int:
    from .. import artifact
    from ..bench import skus as _skus
    from ..bench.runs import model_bytes

    size = model_bytes(artifact.read_manifest(a.model_dir)) if a.model_dir else None
    print(_skus.format_catalog(model_bytes=size))
    return 0


def _expand_records(paths: Sequence[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".json") and not n.startswith("."))
            if not found:
                raise InvalidRequestError(f"{p!r} holds no *.json bench records; run 'gpt2onnx bench' first")
            out += found
        else:
            out.append(p)
    return out


def _report_cmd(a) -> int:
    from ..bench.report import build_report

    rep = build_report(_expand_records(a.results), a.out, prices_path=a.prices,
                       slo_first_token_ms=a.slo_first_token_ms, slo_token_ms=a.slo_token_ms)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for r in rep.recommendations:
        print(f"{r.group}: {r.sku or 'NONE'} — {r.note}")
    print(f"wrote {rep.markdown_path}, {rep.html_path} and {len(rep.plot_paths)} plot(s)")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``bench``, ``skus`` and ``report``."""
    from ..bench import BANDWIDTH_MIB  # noqa: F401

    b = subparsers.add_parser("bench",
                              help="measure a model folder (and PyTorch/Optimum/OpenVINO baselines) on this machine")
    b.add_argument("model_dir", help="model folder written by 'gpt2onnx export'")
    b.add_argument("--sku", help="the Azure VM size this machine is (default: $GPT2ONNX_SKU; never guessed)")
    b.add_argument("--batch-sizes", default="1,8", metavar="N[,M]", help="batch sizes to measure")
    b.add_argument("--prompt-tokens", default="32,128", metavar="N[,M]",
                   help="prompt lengths in tokens")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row, EOS ignored")
    b.add_argument("--threads", metavar="N[,M]", help="intra-op thread counts (default: physical cores)")
    b.add_argument("--baselines", default="pytorch,optimum",
                   help="comma list of pytorch, optimum, openvino (OpenVINO GenAI: bash scripts/install_openvino.sh, "
                        "or a venv named by $GPT2ONNX_OPENVINO_PYTHON); or none")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    b.add_argument("--out", default="results", help="folder for the result JSON (cwd-relative)")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--scenario", choices=("grid", "job"), default="grid",
                   help="grid: latency per batch size x prompt length; job: a whole batch job of mixed prompts, "
                        "static vs continuous batching (uses the largest --batch-sizes)")
    b.add_argument("--job-prompts", dest="job_prompts", type=int, default=256, help="prompts in the job scenario")
    b.add_argument("--workers", default="1", metavar="P[,Q]",
                   help="job scenario: worker process counts to compare, each with --threads or physical cores // P "
                        "threads (e.g. 1,2 on 2 cores: layouts 1x2 and 2x1)")
    b.add_argument("--job-modes", dest="job_modes", default="uniform,static,continuous,shared,shared-nocache",
                   help="job scenario: which of uniform, static, continuous (mixed prompts), shared, shared-nocache "
                        "(384-token heads of 4 templates, prefix cache on/off), shared-openvino (the shared job "
                        "through OpenVINO GenAI with prefix caching; needs scripts/install_openvino.sh) to run")
    b.set_defaults(func=_bench_cmd)

    s = subparsers.add_parser("skus", help="list the Azure CPU VM sizes of the catalog")
    s.add_argument("--model-dir", help="flag which sizes have the memory for this model folder")
    s.set_defaults(func=_skus_cmd)

    r = subparsers.add_parser("report", help="merge bench results into report.md/report.html with plots")
    r.add_argument("results", nargs="+", help="result JSON files or folders of them")
    r.add_argument("--out", default="report", help="report folder, rewritten whole (cwd-relative)")
    r.add_argument("--prices", metavar="TOML", help="VM prices per hour (see bench/prices.example.toml)")
    r.add_argument("--slo-first-token-ms", type=float, help="batch-1 first-token p50 limit for recommendations")
    r.add_argument("--slo-token-ms", type=float, help="batch-1 per-token p50 limit for recommendations")
    r.set_defaults(func=_report_cmd)
