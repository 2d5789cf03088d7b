"""A bench record as a plain-text table for the terminal (what ``gpt2onnx bench`` prints).

For example::

    from gpt2onnx.bench import record
    from gpt2onnx.bench.table import format_table
    print(format_table(record.load("results/20240501T120000Z-Standard_F4s_v2-gpt2-int8.json")))

One row per runtime and configuration, plus the machine the figures are valid on, the
``vs X`` speed-ups of gpt2onnx over each baseline, why any run failed, and warnings when
the machine does not match the record's SKU.
"""

from __future__ import annotations

from . import record
from . import skus as _skus
from ..errors import InvalidRequestError


def _f(x, fmt: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def format_table(rec: dict, *, sku_warnings: bool = True) -> str:
    """A bench record as a plain-text table (plus the machine it is valid on, and warnings).

    Speed-up columns are baseline decode p50 / gpt2onnx decode p50 and, after the
    slash, gpt2onnx tokens/s / baseline tokens/s (> 1: gpt2onnx is faster).

    Args:
        record: a bench record.
        sku_warnings: list where the machine does not match the record's SKU (pass
            False when they were already shown, as ``gpt2onnx bench`` does at the start).
    """
    env, model = rec["environment"], rec["model"]
    mismatch: list[str] = []
    if rec["sku"]:
        try:
            mismatch = _skus.check_cpu(rec["sku"], env)
        except InvalidRequestError as e:
            mismatch = [str(e)]
    sku = rec["sku"] or "not given (--sku)"
    if mismatch:
        sku += " (the machine does NOT match it" + (", see the warnings below)" if sku_warnings else ")")
    isa = " ".join(k for k, v in env["isa"].items() if v) or "no AVX2"
    bw = env.get("memory_bandwidth_gbs")
    lines = [
        f"{model['name']} {model['precision']}" + (" (RANDOM WEIGHTS)" if model["random_weights"] else "")
        + f", {model['n_params'] / 1e6:.1f}M params, "
        f"{model['weight_bytes_per_token'] / 1e6:.1f} MB weights read per step",
        f"valid on: {env['cpu_model']}, {env['logical_cores']} logical / {env['physical_cores']} physical cores, "
        f"{isa}, {env['memory_gib']:.1f} GiB, SKU {sku}",
        f"memory bandwidth {_f(bw, '.1f', ' GB/s')}; new tokens {rec['settings']['new_tokens']}, "
        f"repeats {rec['settings']['repeats']}, warmup {rec['settings']['warmup']}; "
        f"gpt2onnx {env['versions']['gpt2onnx']} (git {(env['git_revision'] or 'n/a')[:12]}), "
        f"onnxruntime {env['versions']['onnxruntime']}",
    ]
    if record.amx_off(rec):
        lines.append("AMX OFF in this run (the request for AMX was refused, e.g. by the noamx preload): figures are "
                     "as on a CPU without AMX (Cascade Lake), with this machine's memory, not this machine's")
    lines.append("")
    bases = []
    for r in rec["results"]:
        if r["runtime"] != "gpt2onnx" and (r["runtime"], r["precision"]) not in bases:
            bases.append((r["runtime"], r["precision"]))
    ratios = {}
    for q in record.ratios(rec):
        ratios[(q["batch_size"], q["prompt_tokens"], q["threads"], q["baseline"], q["baseline_precision"])] = q
    head = ["runtime", "batch", "prompt", "threads", "first ms p50", "token ms p50", "p90", "p99", "tok/s",
            "RSS MB", "floor x"] + [f"vs {b} {p}" for b, p in bases]
    body = []
    for r in rec["results"]:
        cells = [f"{r['runtime']} {r['precision']}", str(r["batch_size"]), str(r["prompt_tokens"]), str(r["threads"])]
        if r.get("error"):
            body.append(cells + ["failed, see below"])
            continue
        cells += [_f(r["first_token_ms"]["p50"], ".2f"), *(_f(r["token_ms"][q], ".2f") for q in ("p50", "p90", "p99")),
                  _f(r["tokens_per_s"]), _f(r["peak_rss_mb"], ".0f"), _f(r["floor_ratio"], ".2f")]
        for b, p in bases:
            q = ratios.get((r["batch_size"], r["prompt_tokens"], r["threads"], b, p)) if r["runtime"] == "gpt2onnx" \
                else None
            if q is None:
                cells.append("")
            elif q["baseline_error"]:
                cells.append("n/a")
            else:
                cells.append(f"{_f(q['decode_speedup'], '.2f', 'x')} / {_f(q['tokens_per_s_ratio'], '.2f', 'x')}")
        body.append(cells)
    widths = [max([len(head[i])] + [len(c[i]) for c in body if len(c) == len(head)]) for i in range(len(head))]
    for cells in [head] + body:  # a failed row's note spans the figure columns
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     + ("  " + cells[-1] if len(cells) < len(head) else ""))
    if bases:
        lines.append("vs X: decode p50 speed-up / tokens/s ratio of gpt2onnx over baseline X (> 1: gpt2onnx faster)")
    lines.append("floor x: decode p50 / (weight bytes read per step / memory bandwidth)")
    if any(b == "openvino-capped" for b, _ in bases):
        lines.append("openvino-capped: OpenVINO GenAI as on Cascade Lake (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, "
                     "INFERENCE_PRECISION_HINT=f32)" + ("" if record.amx_off(rec) or not env["isa"].get("amx") else
                     "; gpt2onnx ran WITH AMX here: for a like-for-like ratio run the bench under the noamx "
                     "preload (bench/README.md)"))
    failed = {}
    for r in rec["results"]:
        if r.get("error"):
            failed.setdefault(f"{r['runtime']} {r['precision']}", []).append(r["error"])
    for name, errs in failed.items():
        lines.append(f"{name}: {'; '.join(sorted(set(errs)))}")
    if sku_warnings:
        lines += [f"warning: {w}" for w in mismatch]
    return "\n".join(lines)
