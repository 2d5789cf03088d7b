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
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from . import record as _results
from . import skus as _skus
from ..errors import Gpt2OnnxError, InvalidRequestError
from .skus import Prices, load_prices

PROJECTION_LABEL = "projection (not measured)"
RANDOM_LABEL = "random weights"
NO_SKU = "(no SKU)"


@dataclass(frozen=True)
class Recommendation:
    """The SKU to pick for one group of results, or None with the reason."""

    group: str  # the group's label, incl. "random weights" / "projection (not measured)"
    model: str
    precision: str
    random_weights: bool
    projection: bool
    sku: str | None  # None: no SKU meets the SLOs (or nothing to rank)
    measured_on: tuple[str, ...]  # CPU model(s) the SKU's figures come from
    threads: int | None
    first_token_ms: float | None  # b1 p50, worst over prompt lengths and hosts
    token_ms: float | None  # b1 p50, worst over prompt lengths and hosts
    tokens_per_s: float | None  # b1, lowest over prompt lengths and hosts
    cost_per_1m_tokens: float | None
    currency: str | None
    basis: str  # "cheapest" (prices given) or "fastest"
    note: str  # one line for humans


@dataclass(frozen=True)
class Report:
    """What `build_report` wrote and recommends."""

    markdown_path: str
    html_path: str
    plot_paths: tuple[str, ...]
    recommendations: tuple[Recommendation, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Row:  # one SKU + CPU + config, median over its records
    sku: str
    cpu: str
    runtime: str
    precision: str
    batch: int
    prompt: int
    new_tokens: int
    threads: int
    n: int  # successful records
    first_p50: float | None
    tok: tuple[float, float, float] | None  # p50, p90, p99
    tps: float | None
    rss: float | None
    errors: tuple[str, ...]


def _cost(price: float | None, tps: float | None) -> float | None:
    """Cost of 1 M generated tokens: price_per_hour / (tokens_per_s * 3600) * 1e6."""
    return None if price is None or not tps else price / (tps * 3600) * 1e6


def _group_key(rec: dict) -> tuple:
    m, v = rec["model"], rec["environment"]["versions"]
    return (rec["projection"], m["name"], m["n_params"], m["precision"], m["random_weights"],
            v["gpt2onnx"], v["onnxruntime"])


def _group_label(key: tuple) -> str:
    projection, name, n_params, precision, random_weights, g2o, ort = key
    label = f"{name} ({n_params / 1e6:.0f}M params) {precision}, gpt2onnx {g2o}, onnxruntime {ort}"
    return label + (f", {RANDOM_LABEL}" if random_weights else "") + (f", {PROJECTION_LABEL}" if projection else "")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _aggregate(records: list[tuple[str, dict]]) -> list[_Row]:
    buckets: dict[tuple, list[dict]] = {}
    for _, rec in records:
        for row in rec["results"]:
            buckets.setdefault((rec["sku"] or NO_SKU, rec["environment"]["cpu_model"], *(row[k] for k in (
                "runtime", "precision", "batch_size", "prompt_tokens", "new_tokens", "threads"))), []).append(row)
    out = []
    for key, rows in buckets.items():
        ok = [r for r in rows if r.get("error") is None]
        tok = None if not ok else tuple(statistics.median(r["token_ms"][q] for r in ok) for q in ("p50", "p90", "p99"))
        out.append(_Row(*key, n=len(ok), first_p50=_median([r["first_token_ms"]["p50"] for r in ok]), tok=tok,
                        tps=_median([r["tokens_per_s"] for r in ok]), rss=_median([r["peak_rss_mb"] for r in ok]),
                        errors=tuple(sorted({r["error"] for r in rows if r.get("error") is not None}))))
    return sorted(out, key=lambda r: (r.sku, r.cpu, r.batch, r.prompt, r.threads,
                                      _results.RUNTIMES.index(r.runtime), r.precision))


def _aggregate_ratios(records: list[tuple[str, dict]]) -> list[tuple]:
    buckets: dict[tuple, list[dict]] = {}
    for _, rec in records:
        for r in _results.ratios(rec):
            key = (rec["sku"] or NO_SKU, rec["environment"]["cpu_model"], r["batch_size"], r["prompt_tokens"],
                   r["threads"], r["precision"], r["baseline"], r["baseline_precision"])
            buckets.setdefault(key, []).append(r)
    out = []
    for key, rs in sorted(buckets.items()):
        ok = [r for r in rs if r["baseline_error"] is None and r["decode_speedup"] is not None]
        meds = [_median([r[k] for r in ok if r[k] is not None])
                for k in ("decode_speedup", "first_token_speedup", "tokens_per_s_ratio")]
        errors = sorted({r["baseline_error"] for r in rs if r["baseline_error"]})
        out.append((*key, *meds, len(ok), errors))
    return out


def _slo_text(slo_first: float | None, slo_token: float | None) -> str:
    parts = [f"{n} p50 <= {v:g} ms" for n, v in (("first token", slo_first), ("token", slo_token)) if v is not None]
    return " and ".join(parts) or "no latency SLO"


def _recommend(key: tuple, rows: list[_Row], prices: Prices | None,
               slo_first: float | None, slo_token: float | None) -> Recommendation:
    label, slo = _group_label(key), _slo_text(slo_first, slo_token)
    # Per SKU and thread count, the worst batch-1 figures over prompt lengths and hosts.
    worst: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.runtime != "gpt2onnx" or r.batch != 1 or not r.n or r.sku == NO_SKU:
            continue
        w = worst.setdefault((r.sku, r.threads), [0.0, 0.0, float("inf")])
        w[:] = [max(w[0], r.first_p50), max(w[1], r.tok[0]), min(w[2], r.tps)]
    meets = [(s, t, *w) for (s, t), w in worst.items()
             if (slo_first is None or w[0] <= slo_first) and (slo_token is None or w[1] <= slo_token)]
    per_hour = prices.per_hour if prices else {}
    priced = sorted([(*m, _cost(per_hour[m[0]], m[4])) for m in meets if m[0] in per_hour], key=lambda m: (m[5], m[3]))
    ranked = priced or sorted([(*m, None) for m in meets], key=lambda m: (m[3], m[2]))
    basis, tag = "cheapest" if priced else "fastest", "".join(
        f" [{x}]" for x, on in ((PROJECTION_LABEL, key[0]), (RANDOM_LABEL, key[4])) if on)
    sku = threads = first = tok = tps = cost = None
    if ranked:
        sku, threads, first, tok, tps, cost = ranked[0]
        note = f"{sku} ({threads} threads) is the {basis} SKU meeting {slo} at batch size 1"
        note += " (none of the SKUs meeting it has a price, so ranked by speed)" * bool(prices and not priced)
        if cost is not None:
            note += f": {cost:.3f} {prices.currency} per 1M tokens" + " (EXAMPLE prices)" * prices.example
    elif worst:
        (s, t), w = min(worst.items(), key=lambda kv: (kv[1][1], kv[1][0]))
        note = f"NO SKU meets {slo}; closest: {s} ({t} threads) first token {w[0]:.1f} ms, token {w[1]:.1f} ms"
    else:
        note = "no batch-size-1 gpt2onnx results with a SKU in this group; nothing to recommend"
    return Recommendation(
        group=label, model=key[1], precision=key[3], random_weights=key[4], projection=key[0], sku=sku,
        measured_on=tuple(sorted({r.cpu for r in rows if r.sku == sku})), threads=threads, first_token_ms=first,
        token_ms=tok, tokens_per_s=tps, cost_per_1m_tokens=cost, currency=prices.currency if prices else None,
        basis=basis, note=note + tag)


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


def _plots(tag: str, rows: list[_Row], ratio_rows: list[tuple], prices: Prices | None) -> dict[str, bytes]:
    multi = {r.sku for r in rows if any(o.sku == r.sku and o.cpu != r.cpu for o in rows)}

    def lab(sku: str, cpu: str, b: int, p: int, t: int) -> str:  # CPU named when one SKU ran on several
        return sku.removeprefix("Standard_") + (f" [{cpu[:16]}]" if sku in multi else "") + f"\nb{b} p{p} t{t}"

    ours = [r for r in rows if r.runtime == "gpt2onnx" and r.n]
    charts: dict[str, tuple] = {
        "latency": (f"Per-token decode latency, gpt2onnx\n{tag}", "ms", {
            lab(r.sku, r.cpu, r.batch, r.prompt, r.threads): dict(zip(("p50", "p90", "p99"), r.tok)) for r in ours}),
        "tokens_per_s": (f"Tokens/s\n{tag}", "tokens/s", {}),
        "speedup": (f"Decode speed-up of gpt2onnx (p50 ratio)\n{tag}", "x", {}, 1.0)}
    for r in rows:
        if r.n:
            charts["tokens_per_s"][2].setdefault(lab(r.sku, r.cpu, r.batch, r.prompt, r.threads), {})[
                f"{r.runtime} {r.precision}"] = r.tps
    for t in ratio_rows:
        if t[8] is not None:
            charts["speedup"][2].setdefault(lab(*t[:5]), {})[f"vs {t[6]} {t[7]}"] = t[8]
    if prices:
        ex = " (EXAMPLE prices)" if prices.example else ""
        charts["cost"] = (f"Cost per 1M generated tokens{ex}\n{tag}", prices.currency, {
            lab(r.sku, r.cpu, r.batch, r.prompt, r.threads): {"gpt2onnx": _cost(prices.per_hour[r.sku], r.tps)}
            for r in ours if r.sku in prices.per_hour})
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


def _group_blocks(gi: int, key: tuple, members: list[tuple[str, dict]], rows: list[_Row],
                  ratio_rows: list[tuple], prices: Prices | None, cur: str) -> list[tuple]:
    label = _group_label(key)
    body: list[tuple] = [("h", 2, f"Group {gi}: {label}")]
    if key[0]:
        body.append(("p", f"{PROJECTION_LABEL.upper()}: these figures are estimates, not measurements; "
                          "do not compare them with measured groups."))
    if key[4]:
        body.append(("p", f"{RANDOM_LABEL.upper()}: the model had random weights; speed figures hold, "
                          "quality figures are meaningless."))
    body += [("h", 3, f"Machines — {label}"), ("table", [
        "file", "SKU", "CPU model", "vCPUs", "ISA", "memory GiB", "onnxruntime", "created"],
        [[os.path.basename(p), r["sku"] or NO_SKU, r["environment"]["cpu_model"],
          r["environment"]["logical_cores"], " ".join(k for k, v in r["environment"]["isa"].items() if v) or "-",
          _f(r["environment"]["memory_gib"]), r["environment"]["versions"]["onnxruntime"], r["created"]]
         for p, r in members])]
    body += [("h", 3, f"Latency and throughput — {label}"), ("table", [
        "SKU", "measured on (CPU)", "runtime", "precision", "batch", "prompt", "new", "threads",
        "first token p50 ms", "token p50 ms", "token p90 ms", "token p99 ms", "tokens/s", "peak RSS MB",
        f"cost / 1M tokens{cur}", "n"],
        [[r.sku, r.cpu, r.runtime, r.precision, r.batch, r.prompt, r.new_tokens, r.threads, _f(r.first_p50),
          *(_f(t) for t in (r.tok or (None,) * 3)), _f(r.tps), _f(r.rss, ".0f"),
          _f(_cost(prices.per_hour.get(r.sku), r.tps), ".3f") if prices else "-",
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


def build_report(paths: Sequence[str], out_dir: str, *, prices_path: str | None = None,
                 slo_first_token_ms: float | None = None, slo_token_ms: float | None = None) -> Report:
    """Merge bench records into report.md, report.html and PNG plots in `out_dir`.

    Args:
        paths: bench record files (schema gpt2onnx.bench/1), from any number of machines.
        out_dir: created if missing; existing report files are replaced atomically.
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
    records = [(os.fspath(p), _results.load(p)) for p in paths]
    prices = load_prices(prices_path) if prices_path else None
    _figure_api()  # fail before writing anything
    warnings: list[str] = []
    for path, rec in records:
        if rec["sku"] is None:
            warnings.append(f"{path}: no SKU recorded; shown as {NO_SKU} and never recommended")
            continue
        try:
            warnings += [f"{path}: {w}" for w in _skus.check_cpu(rec["sku"], rec["environment"])]
        except InvalidRequestError as e:
            warnings.append(f"{path}: {e}")
    if prices:
        known = {s.name for s in _skus.load_catalog()}
        warnings += [f"{prices_path}: {s} is not in the SKU catalog (typo?)" for s in prices.per_hour if s not in known]
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for path, rec in records:
        groups.setdefault(_group_key(rec), []).append((path, rec))
    order = sorted(groups, key=lambda k: (k[0], [str(x) for x in k[1:]]))  # measurements first

    cur = f" ({prices.currency}{', EXAMPLE prices' if prices.example else ''})" if prices else ""
    slo = _slo_text(slo_first_token_ms, slo_token_ms)
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
        rows, ratio_rows = _aggregate(groups[key]), _aggregate_ratios(groups[key])
        recs.append(_recommend(key, rows, prices, slo_first_token_ms, slo_token_ms))
        body += _group_blocks(gi, key, groups[key], rows, ratio_rows, prices, cur)
        for kind, png in _plots(_group_label(key), rows, ratio_rows, prices).items():
            images[f"group{gi}_{kind}.png"] = png
            body.append(("img", f"group{gi}_{kind}.png", f"{kind} — {_group_label(key)}"))
    blocks += [("h", 2, f"Recommendations ({slo})"), ("table", [
        "group", "recommended SKU", "measured on (CPU)", "threads", "first token p50 ms", "token p50 ms",
        "tokens/s", f"cost / 1M tokens{cur}", "why"],
        [[r.group, r.sku or "NONE", "; ".join(r.measured_on) or "-", r.threads or "-", _f(r.first_token_ms),
          _f(r.token_ms), _f(r.tokens_per_s), _f(r.cost_per_1m_tokens, ".3f"), r.note] for r in recs])]
    if warnings:
        blocks += [("h", 2, "Warnings"), ("ul", warnings)]
    markdown, page = _render(blocks + body, images)
    os.makedirs(out_dir, exist_ok=True)
    for name, png in images.items():
        _results.atomic_write(os.path.join(out_dir, name), png)
    md_path, html_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    for path, text in ((md_path, markdown), (html_path, page)):
        _results.atomic_write(path, text.encode("utf-8"))
    return Report(markdown_path=md_path, html_path=html_path,
                  plot_paths=tuple(os.path.join(out_dir, name) for name in images),
                  recommendations=tuple(recs), warnings=tuple(warnings))
