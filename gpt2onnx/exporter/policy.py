"""The quantization policy: which recipe, the fidelity gates on real text, and the retry.

>>> check({"top1_agreement": 0.995, "mean_kl": 0.002, "ppl_ratio": 1.003})
[]

The exporter quantizes with the first recipe of `quantize.recipes_to_try`, measures the
quantized graph against the fp32 one on `gate_text` (`gpt2onnx.eval.fidelity.measure`),
and judges the figures with `gate_for` + `check` (int8 and int4 have their own
thresholds, `GATES`). A miss retries with the next recipe (finer block, then another
algorithm); the last miss raises `FidelityError` unless the user accepted it. ``gpt2onnx
eval --task fidelity`` applies the same `gate_for` + `check`, so one model gets one verdict.

`gate_text` is the real text shipped for the gate: the last 30,238 bytes of the
WikiText-2 raw test set (``wiki.test.raw``, from the Nerva article), by Stephen Merity
et al. (Salesforce), from Wikipedia articles, licensed CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); unchanged.
"""

from __future__ import annotations

from importlib import resources

from ..errors import FidelityError

# Thresholds of the int8 gate (fp32 reference vs int8 model, on `gate_text`).
GATE = {
    "top1_agreement": 0.99,  # at least: the same next token at 99 % of positions
    "mean_kl": 0.01,  # at most, nats
    "ppl_ratio": 1.01,  # at most 1 % apart, either way (see `check`)
}

# Thresholds of the int4 gate (issue #16). 4-bit blocks round weights on 16 levels
# instead of 256, so int4 cannot meet int8's gate and is not meant to: it buys size (and,
# where the kernels favour 4 bits, speed) with a bounded, measured loss. The bounds say
# what "bounded" means:
GATE_INT4 = {
    # At least, on decisive positions only (below). Plain top-1 counts near-ties, where
    # fp32 itself barely prefers its favourite and any rounding flips it; that punishes
    # weak or uncertain models for noise. Where fp32 has a clear favourite, int4 must keep it.
    "decisive_top1_agreement": 0.95,
    "mean_kl": 0.05,  # at most, nats: 5x int8's bound; the distribution may blur, not change
    "ppl_ratio": 1.05,  # at most 5 % apart, either way (see `check`): a user-visible cost, capped
}
DECISIVE_MARGIN = 0.05  # nats of log-prob by which fp32's favourite must beat its runner-up to count as decisive
DECISIVE_MIN_SHARE = 0.5  # decisive top-1 is gated only when at least half the positions are decisive
GATES = {"int8": GATE, "int4": GATE_INT4}  # by precision; other folders (fp32 vs fp32) get int8's


def gate_text() -> str:
    """The real text of the exporter's int8 and int4 gates (WikiText-2 test, CC BY-SA 3.0).

    >>> len(gate_text().encode("utf-8"))
    30238
    """
    return (resources.files("gpt2onnx") / "data" / "gate_text.txt").read_text(encoding="utf-8")


GATE_WINDOWS = 4  # windows of the gate text the exporter measures (4 x 1024/512 -> 2,559 positions)
CALIBRATION_TOKENS = 512  # first tokens of the gate text that `quantize.calibrate` sees
KV_CALIBRATION_TOKENS = 2048  # tokens after the gate's last window that calibrate an int8 KV cache


def kv_calibration_slice(n_tokens: int, window: int) -> tuple[int, int]:
    """The tokens [begin, end) of the gate text that calibrate an int8 KV cache's scales.

    They start after the last token the gate scores, so the gate judges the scales on
    text they were not fitted to.

    >>> kv_calibration_slice(6000, 1024)
    (2560, 4608)
    """
    from ..eval.fidelity import windows

    begin = list(windows(n_tokens, window, window // 2))[:GATE_WINDOWS][-1].end
    end = min(n_tokens, begin + KV_CALIBRATION_TOKENS)
    if end - begin < 2:
        raise FidelityError(f"the gate text has no tokens left after the gate's windows ({n_tokens} tokens) to "
                            "calibrate the int8 KV cache; export with --kv-cache fp32")
    return begin, end


def gate_for(figures: dict, vocab_size: int, random_weights: bool, precision: str = "int8") -> tuple[dict, str]:
    """The thresholds that mean something for this model at this precision, and why.

    Top-1 agreement and the perplexity ratio judge a model that predicts something. A
    random or untrained GPT-2 predicts an almost uniform distribution (perplexity near
    or above its vocabulary size): its argmax is noise that int8 flips at 5 % of
    positions while the KL stays ~1e-4. Such models are gated on ``mean_kl`` alone.
    The int4 gate's decisive top-1 applies only when at least `DECISIVE_MIN_SHARE` of
    the positions are decisive (a model that is mostly unsure has too few of them).

    >>> gate_for({"ppl_ref": 57800.0}, 50257, True)[1]
    'random weights: mean_kl only'
    >>> gate_for({"ppl_ref": 29.4}, 50257, False)[0] == GATE
    True
    >>> gate_for({"ppl_ref": 29.4, "decisive_share": 0.7}, 50257, False, "int4")[0] == GATE_INT4
    True
    >>> gate_for({"ppl_ref": 900.0, "decisive_share": 0.3}, 50257, False, "int4")
    ({'mean_kl': 0.05, 'ppl_ratio': 1.05}, 'full gate but top-1: decisive positions 30 % < 50 %')
    """
    base = GATES.get(precision, GATE)
    if random_weights:
        return {"mean_kl": base["mean_kl"]}, "random weights: mean_kl only"
    if figures["ppl_ref"] > vocab_size / 4:
        return ({"mean_kl": base["mean_kl"]},
                f"untrained-looking reference (perplexity {figures['ppl_ref']:.0f} > vocabulary / 4): mean_kl only")
    gate = dict(base)
    share = figures.get("decisive_share")
    if "decisive_top1_agreement" in gate and (share is None or share < DECISIVE_MIN_SHARE):
        del gate["decisive_top1_agreement"]
        return gate, (f"full gate but top-1: decisive positions {100 * (share or 0):.0f} % "
                      f"< {100 * DECISIVE_MIN_SHARE:.0f} %")
    return gate, "full gate"


def check(figures: dict, gate: dict | None = None) -> list[str]:
    """What in `figures` missed the gate, one readable line each ([] = passed).

    ``ppl_ratio`` must lie within [1 / limit, limit]: an int8 model that is much *better*
    than its fp32 reference on the gate text is as suspect as one that is worse.

    >>> check({"top1_agreement": 0.995, "mean_kl": 0.002, "ppl_ratio": 1.003})
    []
    >>> check({"top1_agreement": 0.9, "mean_kl": 0.002, "ppl_ratio": 1.003})
    ['top1_agreement 0.9 < 0.99']
    """
    gate = GATE if gate is None else gate
    missed = []
    for key in ("top1_agreement", "decisive_top1_agreement"):
        if key in gate and not (figures[key] is not None and figures[key] >= gate[key]):
            missed.append(f"{key} {figures[key] if figures[key] is None else format(figures[key], '.4g')} "
                          f"< {gate[key]}")
    if "mean_kl" in gate and not figures["mean_kl"] <= gate["mean_kl"]:
        missed.append(f"mean_kl {figures['mean_kl']:.4g} > {gate['mean_kl']}")
    if "ppl_ratio" in gate:
        r, lim = figures["ppl_ratio"], gate["ppl_ratio"]
        if not 1.0 / lim <= r <= lim:
            missed.append(f"ppl_ratio {r:.4g} outside [{1 / lim:.4g}, {lim}]")
    return missed




def cpu_session(path: str):
    """A plain onnxruntime CPU session (the exporter's parity and gate runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


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
            what = recipe.label + (f", {recipe.lm_head} table" if precision == "int4" else "")
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
    q = parity.compare(steps, parity.run_onnx(session, steps, dims))
    par = {"max_abs_diff": q["max_abs_diff"], "top1_agreement": q["top1_agreement"],
           "mean_kl": q["mean_kl"], "max_kl": q["max_kl"]}
    quant = None if recipe is None else dict(recipe.to_json(), **table, tried=tried,
                                             outlier_channels={k: v for k, v in sorted(outliers.items())})
    fid = dict(figures, text="gpt2onnx/data/gate_text.txt (WikiText-2 test tail)", window=window, stride=stride,
               gate=gate, gated=why, missed=missed, kv_cache="fp32" if kv_scales is None else "int8",
               status="missed, accepted with --accept-fidelity-miss" if missed else "passed")
    return quant, par, fid

