"""The int8 policy: which recipe, the fidelity gate on real text, and the retry.

>>> check({"top1_agreement": 0.995, "mean_kl": 0.002, "ppl_ratio": 1.003})
[]

The exporter quantizes with the first recipe of `quantize.recipes_to_try`, measures the
int8 graph against the fp32 one on `gate_text` (`gpt2onnx.eval.fidelity.measure`), and
judges the figures with `gate_for` + `check`. A miss retries with the next (finer)
recipe; the last miss raises `FidelityError` unless the user accepted it. ``gpt2onnx
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


def gate_text() -> str:
    """The real text of the exporter's int8 gate (WikiText-2 test, CC BY-SA 3.0).

    >>> len(gate_text().encode("utf-8"))
    30238
    """
    return (resources.files("gpt2onnx") / "data" / "gate_text.txt").read_text(encoding="utf-8")


GATE_WINDOWS = 4  # windows of the gate text the exporter measures (4 x 1024/512 -> 2,559 positions)
CALIBRATION_TOKENS = 512  # first tokens of the gate text that `quantize.calibrate` sees


def gate_for(figures: dict, vocab_size: int, random_weights: bool) -> tuple[dict, str]:
    """The thresholds that mean something for this model, and why.

    Top-1 agreement and the perplexity ratio judge a model that predicts something. A
    random or untrained GPT-2 predicts an almost uniform distribution (perplexity near
    or above its vocabulary size): its argmax is noise that int8 flips at 5 % of
    positions while the KL stays ~1e-4. Such models are gated on ``mean_kl`` alone.

    >>> gate_for({"ppl_ref": 57800.0}, 50257, True)[1]
    'random weights: mean_kl only'
    >>> gate_for({"ppl_ref": 29.4}, 50257, False)[0] == GATE
    True
    """
    if random_weights:
        return {"mean_kl": GATE["mean_kl"]}, "random weights: mean_kl only"
    if figures["ppl_ref"] > vocab_size / 4:
        return ({"mean_kl": GATE["mean_kl"]},
                f"untrained-looking reference (perplexity {figures['ppl_ref']:.0f} > vocabulary / 4): mean_kl only")
    return dict(GATE), "full gate"


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
    if "top1_agreement" in gate and not figures["top1_agreement"] >= gate["top1_agreement"]:
        missed.append(f"top1_agreement {figures['top1_agreement']:.4g} < {gate['top1_agreement']}")
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


def quantize_gated(cfg, tmp: str, fp32_path: str, steps, dims, outliers: dict, gate_ids, window: int,
              random_weights: bool, bar) -> tuple[dict, dict, dict]:
    """Quantize, then gate on real text; a miss retries with the finer fallback recipe.

    Returns the quantization record, the int8 parity figures and the fidelity record;
    raises FidelityError when the last recipe misses too (unless accepted).
    """
    from ..eval import fidelity
    from . import parity
    from .quantize import INT8, quantize_int8, recipes_to_try

    ref = None  # made after the first quantization: the quantizer and an fp32 session at once would double the peak
    stride = window // 2
    tried = []
    for i, recipe in enumerate(recipes_to_try(INT8, dims.n_embd)):
        if i == 0:
            bar.step("quantize int8")
        else:
            bar.note(f"quantize int8 again with block {recipe.block_size} (block {tried[-1]['block_size']} "
                     "missed the fidelity gate)")
        session = cpu_session(quantize_int8(fp32_path, tmp, recipe, outliers))
        if ref is None:
            ref = cpu_session(fp32_path)
        if i == 0:
            bar.step("int8 fidelity gate on real text")
        figures = fidelity.measure(ref, session, gate_ids, window=window, stride=stride, limit=GATE_WINDOWS)
        gate, why = gate_for(figures, dims.vocab_size, random_weights)
        missed = check(figures, gate)
        tried.append({"block_size": recipe.block_size, "top1_agreement": figures["top1_agreement"],
                      "mean_kl": figures["mean_kl"], "missed": missed})
        if not missed:
            break
    if missed and not cfg.accept_fidelity_miss:
        raise FidelityError(f"the int8 graph misses the fidelity gate on real text ({'; '.join(missed)}); "
                            "export fp32 instead, or pass --accept-fidelity-miss to keep it (recorded in the manifest)")
    q = parity.compare(steps, parity.run_onnx(session, steps, dims))
    par = {"max_abs_diff": q["max_abs_diff"], "top1_agreement": q["top1_agreement"],
           "mean_kl": q["mean_kl"], "max_kl": q["max_kl"]}
    quant = dict(recipe.to_json(), outlier_channels={k: v for k, v in sorted(outliers.items())}, tried=tried)
    fid = dict(figures, text="gpt2onnx/data/gate_text.txt (WikiText-2 test tail)", window=window, stride=stride,
               gate=gate, gated=why, missed=missed,
               status="missed, accepted with --accept-fidelity-miss" if missed else "passed")
    return quant, par, fid
