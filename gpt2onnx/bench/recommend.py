"""Which VM size to pick: the bench records' figures per SKU, merged, and the recommendation.

    For example::

        rows = aggregate(records, mismatched=set())
        recommend(group_key(records[0][1]), rows, prices, None, 13.0).note
        # -> 'Standard_E4s_v3 (4 threads) is the cheapest SKU meeting token p50 <= 13 ms at batch size 1: ...'

Per SKU and thread count, a SKU is judged by its worst batch-1 gpt2onnx figures over
prompt lengths and hosts. Among the SKUs meeting the latency SLOs, the cheapest per 1M
tokens wins when prices are given, else the fastest (token p50, then first-token p50).
A record whose machine does not match its SKU (`skus.check_cpu`) is shown as such and
never recommended; nor is a record with no SKU. `Recommendation.note` says which
figure decided.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import record
from .skus import Prices

PROJECTION_LABEL = "projection (not measured)"
RANDOM_LABEL = "random weights"
NO_SKU = "(no SKU)"
MISMATCH_LABEL = "machine does not match"
AMX_OFF_LABEL = "AMX off (as on a CPU without AMX)"


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
    note: str  # one line for humans: the verdict and the figure that decided it


@dataclass(frozen=True)
class Row:
    """One SKU + CPU + config, median over its records."""

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
    matches_sku: bool = True  # False: the machine measured does not match the record's SKU

    @property
    def sku_label(self) -> str:
        """The SKU as tables show it: flagged when the machine did not match it."""
        return self.sku if self.matches_sku else f"{self.sku} ({MISMATCH_LABEL})"


def cost(price: float | None, tps: float | None) -> float | None:
    """Cost of 1 M generated tokens: price_per_hour / (tokens_per_s * 3600) * 1e6.

    >>> round(cost(0.5, 100.0), 3)
    1.389
    """
    return None if price is None or not tps else price / (tps * 3600) * 1e6


def group_key(rec: dict) -> tuple:
    """What a record is grouped by: projection, model, size, precision (+ KV cache), random weights, versions,
    AMX switched off (`record.amx_off`: such figures never merge with the machine's own)."""
    m, v = rec["model"], rec["environment"]["versions"]
    precision = m["precision"] + (" + int8 KV" if m.get("kv_cache", "fp32") != "fp32" else "")
    return (rec["projection"], m["name"], m["n_params"], precision, m["random_weights"],
            v["gpt2onnx"], v["onnxruntime"], record.amx_off(rec))


def group_label(key: tuple) -> str:
    projection, name, n_params, precision, random_weights, g2o, ort, amx_off = key
    label = f"{name} ({n_params / 1e6:.0f}M params) {precision}, gpt2onnx {g2o}, onnxruntime {ort}"
    return label + (f", {RANDOM_LABEL}" if random_weights else "") + (f", {PROJECTION_LABEL}" if projection else "") \
        + (f", {AMX_OFF_LABEL}" if amx_off else "")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aggregate(records: list[tuple[str, dict]], *, mismatched: set[str]) -> list[Row]:
    """Rows of (SKU, CPU, config) with the median of their records' figures.

    Records whose path is in `mismatched` are kept apart (``matches_sku=False``).
    """
    buckets: dict[tuple, list[dict]] = {}
    for path, rec in records:
        for row in rec["results"]:
            key = (rec["sku"] or NO_SKU, rec["environment"]["cpu_model"], *(row[k] for k in (
                "runtime", "precision", "batch_size", "prompt_tokens", "new_tokens", "threads")), path not in mismatched)
            buckets.setdefault(key, []).append(row)
    out = []
    for key, rows in buckets.items():
        ok = [r for r in rows if r.get("error") is None]
        tok = None if not ok else tuple(statistics.median(r["token_ms"][q] for r in ok) for q in ("p50", "p90", "p99"))
        out.append(Row(*key[:-1], n=len(ok), first_p50=median([r["first_token_ms"]["p50"] for r in ok]), tok=tok,
                       tps=median([r["tokens_per_s"] for r in ok]), rss=median([r["peak_rss_mb"] for r in ok]),
                       errors=tuple(sorted({r["error"] for r in rows if r.get("error") is not None})),
                       matches_sku=key[-1]))
    return sorted(out, key=lambda r: (r.sku, not r.matches_sku, r.cpu, r.batch, r.prompt, r.threads,
                                      record.RUNTIMES.index(r.runtime), r.precision))


def slo_text(slo_first: float | None, slo_token: float | None) -> str:
    parts = [f"{n} p50 <= {v:g} ms" for n, v in (("first token", slo_first), ("token", slo_token)) if v is not None]
    return " and ".join(parts) or "no latency SLO"


def _decided(basis: str, ranked: list[tuple], currency: str | None) -> str:
    """Which figure put the first of `ranked` first, against the runner-up."""
    sku, threads, first, tok, tps, c = ranked[0]
    if len(ranked) == 1:
        return "the only one meeting it"
    nxt = ranked[1]
    if basis == "cheapest":
        return (f"decided by cost per 1M tokens: {c:.3f} {currency} vs {nxt[5]:.3f} for {nxt[0]} ({nxt[1]} threads)")
    if tok != nxt[3]:
        return f"decided by token p50: {tok:.1f} ms vs {nxt[3]:.1f} ms for {nxt[0]} ({nxt[1]} threads)"
    return f"decided by first-token p50 (token p50 tied): {first:.1f} ms vs {nxt[2]:.1f} ms for {nxt[0]}"


def recommend(key: tuple, rows: list[Row], prices: Prices | None,
              slo_first: float | None, slo_token: float | None) -> Recommendation:
    """The recommendation of one group (see the module docstring)."""
    label, slo = group_label(key), slo_text(slo_first, slo_token)
    # Per SKU and thread count, the worst batch-1 figures over prompt lengths and hosts.
    worst: dict[tuple[str, int], list[float]] = {}
    excluded = sorted({r.sku for r in rows if not r.matches_sku})
    for r in rows:
        if r.runtime != "gpt2onnx" or r.batch != 1 or not r.n or r.sku == NO_SKU or not r.matches_sku:
            continue
        w = worst.setdefault((r.sku, r.threads), [0.0, 0.0, float("inf")])
        w[:] = [max(w[0], r.first_p50), max(w[1], r.tok[0]), min(w[2], r.tps)]
    meets = [(s, t, *w) for (s, t), w in worst.items()
             if (slo_first is None or w[0] <= slo_first) and (slo_token is None or w[1] <= slo_token)]
    per_hour = prices.per_hour if prices else {}
    priced = sorted([(*m, cost(per_hour[m[0]], m[4])) for m in meets if m[0] in per_hour], key=lambda m: (m[5], m[3]))
    ranked = priced or sorted([(*m, None) for m in meets], key=lambda m: (m[3], m[2]))
    basis, tag = "cheapest" if priced else "fastest", "".join(
        f" [{x}]" for x, on in ((PROJECTION_LABEL, key[0]), (RANDOM_LABEL, key[4]), (AMX_OFF_LABEL, key[7])) if on)
    sku = threads = first = tok = tps = c = None
    if ranked:
        sku, threads, first, tok, tps, c = ranked[0]
        note = f"{sku} ({threads} threads) is the {basis} SKU meeting {slo} at batch size 1"
        note += " (none of the SKUs meeting it has a price, so ranked by speed)" * bool(prices and not priced)
        if c is not None:
            note += f": {c:.3f} {prices.currency} per 1M tokens" + " (EXAMPLE prices)" * prices.example
        note += "; " + _decided(basis, ranked, prices.currency if prices else None)
    elif worst:
        (s, t), w = min(worst.items(), key=lambda kv: (kv[1][1], kv[1][0]))
        note = f"NO SKU meets {slo}; closest: {s} ({t} threads) first token {w[0]:.1f} ms, token {w[1]:.1f} ms"
    else:
        note = ("no batch-size-1 gpt2onnx results with a SKU (on a machine that matches it) in this group; "
                "nothing to recommend")
    if excluded:
        note += (f"; not counted: records of {', '.join(excluded)} measured on a machine that does not match "
                 "the SKU (see Warnings)")
    return Recommendation(
        group=label, model=key[1], precision=key[3], random_weights=key[4], projection=key[0], sku=sku,
        measured_on=tuple(sorted({r.cpu for r in rows if r.sku == sku and r.matches_sku})), threads=threads,
        first_token_ms=first, token_ms=tok, tokens_per_s=tps, cost_per_1m_tokens=c,
        currency=prices.currency if prices else None, basis=basis, note=note + tag)
