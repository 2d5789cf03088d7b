"""The KV cache's precision: fp32 (the default) or int8 with static per-channel scales.

>>> kv_record("fp32")
{'dtype': 'fp32'}

onnxruntime's CPU GroupQueryAttention keeps an int8 past/present when given ``k_quant_type`` /
``v_quant_type``, ``kv_cache_bit_width=8`` and float scales as inputs 12 and 13: it stores each
new key and value as ``clip(round_half_even(x / scale), -128, 127)`` (saturating) and attends
to ``q * scale``, prefill included (tests/exporter/test_kvcache.py). The scales are static
initializers, one per (head, channel) of every layer's K and V, (1, H, 1, D), calibrated at
export on real text the gate does not score (`gpt2onnx.eval.gate.kv_calibration_slice`):
``scale = |max| x MARGIN / 127``, the margin leaving room for louder text (a clipped value
hurts more than the coarser step). Why and what it costs: README, docs/quality.md ("int8 KV
cache"). The surgery on a built graph (fp32 or already weight-quantized)::

    past_key_values.{i}.key (B,H,P,D) fp32 ─┐               past ... int8 ─┐   k_scale.{i} (1,H,1,D) ─┐
    past_key_values.{i}.value ──────────────GQA        ->    past ... int8 ─GQA(k/v_quant_type) ──────┘
                                             └ present fp32                  └ present int8 (same buffer)
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KV_CACHES = ("auto", "fp32", "int8")  # what `export(kv_cache=)` and `--kv-cache` take
# "auto" (the default): int8 for int8/int4 weights when it passes their gate (else fp32, said so),
# fp32 for fp32 weights. Measured on 124M int8 (bench/README.md): b8 decode -21 %, peak RSS -100 MB,
# b1 decode unchanged, b8 prefill +16 %; fp32 folders stay exact (greedy equals transformers).
QUANT_TYPE = "PER_CHANNEL"  # a scale per (head, channel); onnxruntime also has PER_TENSOR
MARGIN = 1.25  # scale = calibrated |max| x MARGIN / 127
QMAX = 127.0
MIN_ABSMAX = 1e-6  # a channel that never moved still gets a usable (tiny) scale


def kv_record(kv_cache: str, *, margin: float = MARGIN, calibration: dict | None = None) -> dict:
    """The manifest's ``kv_cache`` field for an export with this cache."""
    if kv_cache == "fp32":
        return {"dtype": "fp32"}
    return {"dtype": "int8", "quant_type": QUANT_TYPE, "scale": f"calibrated |max| x {margin:g} / {QMAX:g}",
            "margin": margin, "saturation": "clip to [-128, 127]", "calibration": calibration or {}}


def calibrate(session, token_ids, *, window: int, n_layer: int) -> dict[str, np.ndarray]:
    """|max| of every layer's K and V per (head, channel) over `token_ids`, run by the fp32 graph.

    The text runs in windows of `window` tokens from an empty cache; a window's present
    outputs are the keys and values of all its positions. Returns ``{present name: (H, D)}``.
    """
    from ..graphio import GraphSpec

    spec = GraphSpec.of(session)
    names = [o.name for o in session.get_outputs()]
    ids = np.asarray(token_ids, np.int64).ravel()
    stats: dict[str, np.ndarray] = {}
    for a in range(0, max(len(ids) - 1, 1), window):
        outs = session.run(None, spec.feeds(ids[a:a + window][None, :], 1))  # LM head on one position only
        for name, value in zip(names, outs):
            if name.startswith("present."):
                m = np.abs(value).max(axis=(0, 2))  # (B,H,T,D) -> (H,D)
                stats[name] = m if name not in stats else np.maximum(stats[name], m)
    if len(stats) != 2 * n_layer:
        raise ValueError(f"expected {2 * n_layer} present outputs, got {len(stats)}")
    return stats


def scales(absmax: dict[str, np.ndarray], margin: float = MARGIN) -> dict[str, np.ndarray]:
    """Per-channel scales (1, H, 1, D) float32 by present name: |max| x margin / 127."""
    return {name: (np.maximum(a, MIN_ABSMAX) * margin / QMAX).astype(np.float32)[None, :, None, :]
            for name, a in absmax.items()}


def quantize_cache(src: str, dst: str, kv_scales: dict[str, np.ndarray]) -> str:
    """Write `dst` (model.onnx of the same folder as `src`) with an int8 KV cache; the weights stay in place.

    Only the graph proto changes (types, GroupQueryAttention attributes and inputs, the
    scale initializers, a few KB stored inline), so the external data file is shared.
    """
    if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
        raise ValueError("src and dst must be in one folder: they share the external data file")
    model = onnx.load(src, load_external_data=False)
    g = model.graph
    for vi in list(g.input) + list(g.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.elem_type = TensorProto.INT8
    done = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        key, value = node.output[1], node.output[2]  # present.{i}.key / .value
        inputs = list(node.input) + [""] * (14 - len(node.input))
        inputs[12], inputs[13] = f"{key}.scale", f"{value}.scale"  # k_scale, v_scale
        del node.input[:]
        node.input.extend(inputs)
        for name in (key, value):
            g.initializer.append(numpy_helper.from_array(kv_scales[name], f"{name}.scale"))
        node.attribute.extend([helper.make_attribute("k_quant_type", QUANT_TYPE),
                               helper.make_attribute("v_quant_type", QUANT_TYPE),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        done += 1
    if not done:
        raise ValueError(f"{src} has no GroupQueryAttention node")
    onnx.save_model(model, dst)
    return dst


def cache_dtype(model_path: str) -> str:
    """"int8" or "fp32": the type of a graph's first past input (tests and checks)."""
    model = onnx.load(model_path, load_external_data=False)
    past = next(i for i in model.graph.input if i.name.startswith("past_key_values."))
    return "int8" if past.type.tensor_type.elem_type == TensorProto.INT8 else "fp32"
