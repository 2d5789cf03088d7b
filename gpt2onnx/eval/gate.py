"""The fidelity gate: thresholds on real text, the gate text, and the verdict (one model, one verdict).

>>> check({"top1_agreement": 0.995, "mean_kl": 0.002, "ppl_ratio": 1.003})
[]

`fidelity.measure` gives the figures; `gate_for` picks the thresholds that mean something
for the model at its precision (int8 and int4 have their own, `GATES`) and `check` says
what missed them. The exporter gates every quantized graph with these before it writes a
folder (`gpt2onnx.exporter.policy`), and ``gpt2onnx eval --task fidelity`` applies the same.

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
    from .fidelity import windows

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
