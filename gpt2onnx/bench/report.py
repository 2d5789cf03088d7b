"""Merge bench records from many machines into the report users pick a VM size from.

Writes `report.md`, a self-contained `report.html` (plots as data URIs) and PNG plots.
Groups (model name/size/precision/random weights, gpt2onnx and onnxruntime version,
measured vs projection) are never mixed; repeated records of one SKU + CPU + config
become a median with a count; speed-ups are per-record ratios (same run, same
machine), then the median. Needs matplotlib: pip install 'gpt2onnx[report]'.

    >>> build_report([], "out")
    Traceback (most recent call last):
    gpt2onnx.errors.InvalidRequestError: no bench records given; pass one or more result JSON files
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from . import record
from . import skus as _skus
from ..errors import Gpt2OnnxError, InvalidRequestError
from .recommend import (AMX_OFF_LABEL, MISMATCH_LABEL, NO_SKU, PROJECTION_LABEL, RANDOM_LABEL, Recommendation, Row, aggregate,
                        cost, group_key, group_label, median, recommend, slo_text)
from .skus import Prices, load_prices

@dataclass(frozen=True)
class Report:
    """What `build_report` wrote and recommends."""

    markdown_path: str
    html_path: str
    plot_paths: tuple[str, ...]
    recommendations: tuple[Recommendation, ...]
    warnings: tuple[str, ...]


def _aggregate_ratios(records: list[tuple[str, dict]], mismatched: set[str]) -> list[tuple]:
    buckets: dict[tuple, list[dict]] = {}
    for path, rec in records:
        sku = rec["sku"] or NO_SKU
        sku = sku if path not in mismatched else f"{sku} ({MISMATCH_LABEL})"
        for r in record.ratios(rec):
            key = (sku, rec["environment"]["cpu_model"], r["batch_size"], r["prompt_tokens"],
                   r["threads"], r["precision"], r["baseline"], r["baseline_precision"])
            buckets.setdefault(key, []).append(r)
    out = []
    for key, rs in sorted(buckets.items()):
        ok = [r for r in rs if r["baseline_error"] is None and r["decode_speedup"] is not None]
        meds = [median([r[k] for r in ok if r[k] is not None])
                for k in ("decode_speedup", "first_token_speedup", "tokens_per_s_ratio")]
        errors = sorted({r["baseline_error"] for r in rs if r["baseline_error"]})
        out.append((*key, *meds, len(ok), errors))
    return out


def _f(x: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "-" if x is None else format(x, fmt) + unit


def _figure_api():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise Gpt2OnnxError("the report needs matplotlib: pip install 'gpt2onnx[report]'") from e
    return Figure, FigureCanvasAgg


def _chart(title: str, unit: str, points: dict[str, dict[str, float | None]], hline: float | None = None) -> bytes:
    """A grouped bar chart (x label -> {series: value}) as PNG bytes; no pyplot, no global backend."""
    figure_cls, canvas_cls = _figure_api()
    labels = list(points)
    series = list(dict.fromkeys(s for p in points.values() for s in p))
    fig = figure_cls(figsize=(max(6.0, 0.9 * len(labels) * len(series) ** 0.5 + 2), 4.2))
    canvas_cls(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [(j + i * width, points[lab][name]) for j, lab in enumerate(labels)
              if points[lab].get(name) is not None]
        ax.bar([x for x, _ in xs], [v for _, v in xs], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, fontsize=7)
    if hline is not None:
        ax.axhline(hline, color="grey", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _plots(tag: str, rows: list[Row], ratio_rows: list[tuple], prices: Prices | None) -> dict[str, bytes]:
    multi = {r.sku_label for r in rows if any(o.sku_label == r.sku_label and o.cpu != r.cpu for o in rows)}

    def lab(sku: str, cpu: str, b: int, p: int, t: int) -> str:  # CPU named when one SKU ran on several
        return sku.removeprefix("Standard_") + (f" [{cpu[:16]}]" if sku in multi else "") + f"\nb{b} p{p} t{t}"

    ours = [r for r in rows if r.runtime == "gpt2onnx" and r.n]
    charts: dict[str, tuple] = {
        "latency": (f"Per-token decode latency, gpt2onnx\n{tag}", "ms", {
            lab(r.sku_label, r.cpu, r.batch, r.prompt, r.threads): dict(zip(("p50", "p90", "p99"), r.tok)) for r in ours}),
        "tokens_per_s": (f"Tokens/s\n{tag}", "tokens/s", {}),
        "speedup": (f"Decode speed-up of gpt2onnx (p50 ratio)\n{tag}", "x", {}, 1.0)}
    for r in rows:
        if r.n:
            charts["tokens_per_s"][2].setdefault(lab(r.sku_label, r.cpu, r.batch, r.prompt, r.threads), {})[
                f"{r.runtime} {r.precision}"] = r.tps
    for t in ratio_rows:
        if t[8] is not None:
            charts["speedup"][2].setdefault(lab(*t[:5]), {})[f"vs {t[6]} {t[7]}"] = t[8]
    if prices:
        ex = " (EXAMPLE prices)" if prices.example else ""
        charts["cost"] = (f"Cost per 1M generated tokens{ex}\n{tag}", prices.currency, {
            lab(r.sku_label, r.cpu, r.batch, r.prompt, r.threads): {"gpt2onnx": cost(prices.per_hour[r.sku], r.tps)}
            for r in ours if r.sku in prices.per_hour and r.matches_sku})
    return {kind: _chart(*args) for kind, args in charts.items() if args[2]}


def _render(blocks: list[tuple], images: dict[str, bytes]) -> tuple[str, str]:
    md, ht = [], []
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for b in blocks:
        if b[0] == "h":
            md.append("#" * b[1] + " " + b[2])
            ht.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            md.append(b[1])
            ht.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "ul":
            md.extend(f"- {item}" for item in b[1])
            ht.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            md += ["| " + " | ".join(map(cell, row)) + " |" for row in [b[1], ["---"] * len(b[1]), *b[2]]]
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in b[2])
            ht.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b[0] == "img":
            md.append(f"![{b[2]}]({b[1]})")
            data = base64.b64encode(images[b[1]]).decode("ascii")
            ht.append(f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>')
        md.append("")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>gpt2onnx benchmark report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(ht) + "\n</body></html>\n")
    return "\n".join(md), page


def _group_blocks(gi: int, key: tuple, members: list[tuple[str, dict]], rows: list[Row],
                  ratio_rows: list[tuple], prices: Prices | None, cur: str, mismatched: set[str]) -> list[tuple]:
    label = group_label(key)
    body: list[tuple] = [("h", 2, f"Group {gi}: {label}")]
    if key[0]:
        body.append(("p", f"{PROJECTION_LABEL.upper()}: these figures are estimates, not measurements; "
                          "do not compare them with measured groups."))
    if key[4]:
        body.append(("p", f"{RANDOM_LABEL.upper()}: the model had random weights; speed figures hold, "
                          "quality figures are meaningless."))
    if key[7]:
        body.append(("p", f"{AMX_OFF_LABEL.upper()}: the CPU has AMX but these runs could not use it (the no-AMX "
                          "preload): they say what a CPU without AMX would do with this machine's memory, not what "
                          "the machine measured does."))
    body += [("h", 3, f"Machines — {label}"), ("table", [
        "file", "SKU", "CPU model", "vCPUs", "ISA", "memory GiB", "onnxruntime", "created"],
        [[os.path.basename(p), (r["sku"] or NO_SKU) + f" ({MISMATCH_LABEL})" * (p in mismatched),
          r["environment"]["cpu_model"],
          r["environment"]["logical_cores"], " ".join(k for k, v in r["environment"]["isa"].items() if v) or "-",
          _f(r["environment"]["memory_gib"]), r["environment"]["versions"]["onnxruntime"], r["created"]]
         for p, r in members])]
    body += [("h", 3, f"Latency and throughput — {label}"), ("table", [
        "SKU", "measured on (CPU)", "runtime", "precision", "batch", "prompt", "new", "threads",
        "first token p50 ms", "token p50 ms", "token p90 ms", "token p99 ms", "tokens/s", "peak RSS MB",
        f"cost / 1M tokens{cur}", "n"],
        [[r.sku_label, r.cpu, r.runtime, r.precision, r.batch, r.prompt, r.new_tokens, r.threads, _f(r.first_p50),
          *(_f(t) for t in (r.tok or (None,) * 3)), _f(r.tps), _f(r.rss, ".0f"),
          _f(cost(prices.per_hour.get(r.sku), r.tps), ".3f") if prices and r.matches_sku else "-",
          r.n if not r.errors else f"{r.n}, failed: {'; '.join(r.errors)}"] for r in rows])]
    if ratio_rows:
        body += [("h", 3, f"Speed-up over baselines — {label}"), ("table", [
            "SKU", "measured on (CPU)", "batch", "prompt", "threads", "gpt2onnx", "baseline",
            "decode speed-up (p50)", "first-token speed-up (p50)", "tokens/s ratio", "n"],
            [[*t[:6], f"{t[6]} {t[7]}", *(_f(x, ".2f", "x") for x in t[8:11]),
              t[11] if not t[12] else f"{t[11]}, baseline failed: {'; '.join(t[12])}"] for t in ratio_rows])]
    quality = [(p, r) for p, r in members if r.get("quality")]
    if quality:
        body += [("h", 3, f"Quality — {label}"), ("table", ["file", "SKU", "metrics"], [
            [os.path.basename(p), r["sku"] or NO_SKU, ", ".join(f"{k}={v}" for k, v in r["quality"].items())]
            for p, r in quality])]
    return body


_REPORT_FILE = re.compile(r"report\.(md|html)|group\d+_[a-z_]+\.png")


def _check_report_dir(out_dir: str) -> None:
    """A report folder is rewritten whole: refuse one that holds anything but an earlier report."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise InvalidRequestError(f"report folder {out_dir!r} is a file; pass --out a folder")
    foreign = sorted(n for n in os.listdir(out_dir) if not _REPORT_FILE.fullmatch(n))
    if foreign:
        raise InvalidRequestError(
            f"{out_dir!r} holds files that are not a gpt2onnx report ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); a report folder is rewritten whole, so pass --out a new, "
            "empty or report folder")


def _publish(out_dir: str, files: dict[str, bytes]) -> None:
    """Write `files` as the whole content of `out_dir`: a new folder swapped in, so no stale plot stays."""
    out = os.path.abspath(out_dir)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    _check_report_dir(out)  # again: it may have changed while the report was built
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        for fname, data in files.items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_report(paths: Sequence[str], out_dir: str, *, prices_path: str | None = None,
                 slo_first_token_ms: float | None = None, slo_token_ms: float | None = None) -> Report:
    """Merge bench records into report.md, report.html and PNG plots in `out_dir`.

    Args:
        paths: bench record files (schema gpt2onnx.bench/1), from any number of machines.
        out_dir: the report folder: created, or rewritten whole when it holds an earlier
            report (refused when it holds anything else).
        prices_path: VM prices per hour (see bench/prices.example.toml); enables cost
            per 1M tokens and "cheapest" recommendations.
        slo_first_token_ms: batch-1 first-token p50 limit for recommendations.
        slo_token_ms: batch-1 per-token decode p50 limit for recommendations.

    Returns:
        The files written and one recommendation per group.

    Raises:
        InvalidRequestError: no paths, a bad SLO, or a bad prices file.
        ArtifactError: a record is missing, not JSON, or of another schema version.
        Gpt2OnnxError: matplotlib is not installed.

    >>> build_report(["missing.json"], "out")
    Traceback (most recent call last):
    gpt2onnx.errors.ArtifactError: missing.json: cannot read bench record (No such file or directory); check the path
    """
    if isinstance(paths, (str, bytes)) or not paths:
        raise InvalidRequestError("no bench records given; pass one or more result JSON files")
    for name, slo in (("slo_first_token_ms", slo_first_token_ms), ("slo_token_ms", slo_token_ms)):
        if slo is not None and not (isinstance(slo, (int, float)) and slo > 0):
            raise InvalidRequestError(f"{name} must be a positive number of milliseconds, got {slo!r}")
    records = [(os.fspath(p), record.load(p)) for p in paths]
    prices = load_prices(prices_path) if prices_path else None
    _figure_api()  # fail before writing anything
    _check_report_dir(out_dir)
    warnings: list[str] = []
    mismatched: set[str] = set()  # records whose machine is not their SKU: shown as such, never recommended
    for path, rec in records:
        if rec["sku"] is None:
            warnings.append(f"{path}: no SKU recorded; shown as {NO_SKU} and never recommended")
            continue
        try:
            found = _skus.check_cpu(rec["sku"], rec["environment"])
        except InvalidRequestError as e:
            found = [str(e)]
        if found:
            mismatched.add(path)
            warnings.append(f"{path}: {MISMATCH_LABEL} {rec['sku']}, so it is never recommended: " + "; ".join(
                w.removeprefix(f"{rec['sku']}: ") for w in found))
    if prices:
        known = {s.name for s in _skus.load_catalog()}
        warnings += [f"{prices_path}: {s} is not in the SKU catalog (typo?)" for s in prices.per_hour if s not in known]
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for path, rec in records:
        groups.setdefault(group_key(rec), []).append((path, rec))
    order = sorted(groups, key=lambda k: (k[0], [str(x) for x in k[1:]]))  # measurements first

    cur = f" ({prices.currency}{', EXAMPLE prices' if prices.example else ''})" if prices else ""
    slo = slo_text(slo_first_token_ms, slo_token_ms)
    blocks: list[tuple] = [("h", 1, "gpt2onnx benchmark report"), ("p", (
        f"{len(records)} bench record(s) in {len(groups)} group(s). Groups differ in model, precision, "
        "random weights, gpt2onnx/onnxruntime version, or measured vs projection, and are never mixed. "
        "Figures are medians over n records of the same SKU, CPU and config; speed-ups are baseline / gpt2onnx "
        "from the same run on the same machine. Each table is valid only for the CPU it names."))]
    if prices:
        blocks.append(("p", f"Prices: {prices_path}{cur}; cost per 1M tokens = price_per_hour / (tokens_per_s * 3600)"
                            " * 1e6." + (" EXAMPLE placeholder prices, not real: use your own." * prices.example)))
    recs, images, body = [], {}, []
    for gi, key in enumerate(order, 1):
        rows, ratio_rows = aggregate(groups[key], mismatched=mismatched), _aggregate_ratios(groups[key], mismatched)
        recs.append(recommend(key, rows, prices, slo_first_token_ms, slo_token_ms))
        body += _group_blocks(gi, key, groups[key], rows, ratio_rows, prices, cur, mismatched)
        for kind, png in _plots(group_label(key), rows, ratio_rows, prices).items():
            images[f"group{gi}_{kind}.png"] = png
            body.append(("img", f"group{gi}_{kind}.png", f"{kind} — {group_label(key)}"))
    blocks += [("h", 2, f"Recommendations ({slo})"), ("table", [
        "group", "recommended SKU", "measured on (CPU)", "threads", "first token p50 ms", "token p50 ms",
        "tokens/s", f"cost / 1M tokens{cur}", "why"],
        [[r.group, r.sku or "NONE", "; ".join(r.measured_on) or "-", r.threads or "-", _f(r.first_token_ms),
          _f(r.token_ms), _f(r.tokens_per_s), _f(r.cost_per_1m_tokens, ".3f"), r.note] for r in recs])]
    if warnings:
        blocks += [("h", 2, "Warnings"), ("ul", warnings)]
    markdown, page = _render(blocks + body, images)
    _publish(out_dir, {**images, "report.md": markdown.encode("utf-8"), "report.html": page.encode("utf-8")})
    md_path, html_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    return Report(markdown_path=md_path, html_path=html_path,
                  plot_paths=tuple(os.path.join(out_dir, name) for name in images),
                  recommendations=tuple(recs), warnings=tuple(warnings))
