"""The quantization policy: which recipe, gated on real text, and the retry.

The exporter quantizes with the first recipe of `quantize.recipes_to_try`, measures the
quantized graph against the fp32 one on the gate text (`gpt2onnx.eval.fidelity.measure`)
and judges the figures by `gpt2onnx.eval.gate` (the rule ``gpt2onnx eval --task fidelity``
applies too). A miss retries with the next recipe (finer block, then another algorithm;
with ``--kv-cache auto``, the same recipes again with an fp32 cache); the last miss
raises `FidelityError` unless the user accepted it.
"""

from __future__ import annotations

from .. import graphio
from ..errors import FidelityError
from ..eval.gate import DECISIVE_MARGIN, GATE_WINDOWS, check, gate_for


def cpu_session(path: str):
    """A CPU session with onnxruntime's default threads (the exporter's parity and gate runs)."""
    return graphio.open_session(path)


def gated_path(tmp: str, fp32_path: str, precision: str) -> str:
    """Where `quantize_gated` leaves the graph it gated: the weight-quantized one in `tmp`; with fp32
    weights (an int8 KV cache only) beside the fp32 graph, whose weights file it shares."""
    import os

    return os.path.join(tmp, "model.onnx") if precision != "fp32" else fp32_path[:-len(".onnx")] + ".kv.onnx"


def quantize_gated(cfg, tmp: str, fp32_path: str, steps, dims, outliers: dict, gate_ids, window: int,
                   random_weights: bool, bar, kv_scales: dict | None = None,
                   kv_fallback: bool = False) -> tuple[dict | None, dict, dict]:
    """Quantize the weights to `cfg.precision` and / or the KV cache to int8 (`kv_scales`), then gate on
    real text; a miss retries with the next weight recipe. With `kv_fallback` (``--kv-cache auto``),
    when every recipe misses with the int8 cache the ladder runs again with an fp32 cache.

    Returns the quantization record (None for fp32 weights), the parity figures and the
    fidelity record; raises FidelityError when the last recipe misses too (unless accepted).
    The gated graph is at `gated_path`.
    """
    from ..eval import fidelity
    from . import kvcache, parity, quantize

    precision = cfg.precision
    what_gated = precision + (" + int8 KV cache" if kv_scales is not None else "")
    ref = None  # made after the first quantization: the quantizer and an fp32 session at once would double the peak
    stride = window // 2
    tried = []
    recipes = quantize.recipes_to_try(n_embd=dims.n_embd, precision=precision) if precision != "fp32" else [None]
    caches = [kv_scales] + ([None] if kv_scales is not None and kv_fallback and precision != "fp32" else [])
    rungs = [(kv, recipe) for kv in caches for recipe in recipes]  # every recipe with the int8 cache, then fp32
    for n, (kv_scales, recipe) in enumerate(rungs):
        if n and kv_scales is None and rungs[n - 1][0] is not None:
            what_gated = precision
            bar.note("the int8 KV cache misses the fidelity gate with every recipe: again with an fp32 KV cache")
        table: dict = {}
        path = fp32_path  # fp32 weights: only the cache is quantized
        if recipe is not None:
            what = f"block {recipe.block_size}" + (f", {recipe.lm_head} table" if precision == "int4" else "")
            if n == 0:
                bar.step(f"quantize {precision}")
            else:
                bar.note(f"quantize {precision} again with {what} ({tried[-1]['what']} missed the fidelity gate)")
            path = quantize.quantize_model(fp32_path, tmp, recipe, outliers, report=table)
        if kv_scales is not None:
            path = kvcache.quantize_cache(path, gated_path(tmp, fp32_path, precision), kv_scales)
        session = cpu_session(path)
        if ref is None:
            ref = cpu_session(fp32_path)
        if n == 0:
            bar.step(f"{what_gated} fidelity gate on real text")
        figures = fidelity.measure(ref, session, gate_ids, window=window, stride=stride, limit=GATE_WINDOWS,
                                   margin=DECISIVE_MARGIN)
        gate, why = gate_for(figures, dims.vocab_size, random_weights, precision)
        missed = check(figures, gate)
        if recipe is not None:
            tried.append({"what": what, "algorithm": recipe.algorithm, "block_size": recipe.block_size,
                          "symmetric": recipe.symmetric, "lm_head": recipe.lm_head,
                          "kv_cache": "fp32" if kv_scales is None else "int8",
                          "top1_agreement": figures["top1_agreement"],
                          "decisive_top1_agreement": figures["decisive_top1_agreement"],
                          "decisive_share": figures["decisive_share"], "mean_kl": figures["mean_kl"],
                          "ppl_ratio": figures["ppl_ratio"], "missed": missed})
        if not missed:
            break
    if missed and not cfg.accept_fidelity_miss:
        instead = {"fp32": [], "int8": ["fp32"], "int4": ["int8 or fp32"]}[precision]
        instead = [f"--precision {p}" for p in instead] + (["--kv-cache fp32"] if kv_scales is not None else [])
        raise FidelityError(f"the {what_gated} graph misses the fidelity gate on real text ({'; '.join(missed)}); "
                            f"export with {' or '.join(instead)} instead, "
                            "or pass --accept-fidelity-miss to keep it "
                            "(recorded in the manifest)")
    q = parity.compare(steps, parity.run_onnx(session, steps))
    par = {"max_abs_diff": q["max_abs_diff"], "top1_agreement": q["top1_agreement"],
           "mean_kl": q["mean_kl"], "max_kl": q["max_kl"]}
    quant = None if recipe is None else dict(recipe.to_json(), **table, tried=tried,
                                             outlier_channels={k: v for k, v in sorted(outliers.items())})
    fid = dict(figures, text="gpt2onnx/data/gate_text.txt (WikiText-2 test tail)", window=window, stride=stride,
               gate=gate, gated=why, missed=missed, kv_cache="fp32" if kv_scales is None else "int8",
               status="missed, accepted with --accept-fidelity-miss" if missed else "passed")
    return quant, par, fid

