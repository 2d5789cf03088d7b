"""The MatMulNBits weight passes: the transformer's MatMuls, and the one token table.

`quantize_matmuls` turns the MatMuls into ``MatMulNBits`` with onnxruntime's round-to-nearest
block quantizer (``QuantRecipe.algorithm = "rtn"``), symmetric or with uint8 zero points,
honouring exclusions (the fp32 outlier MatMuls, the LM head). `tie_table` quantizes GPT-2's
token table once for both the embedding and the tied LM head. onnxruntime's other weight
quantizers (GPTQ, HQQ) were measured and dropped: docs/quality.md, "What was tried and dropped".
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .recipe import QuantRecipe

HEAD = "lm_head"  # name of the LM head MatMul in `graph.build(..., untied_lm_head=True)`
HEAD_WEIGHT = "lm_head.weight_t"  # its (E, V) weight


def fit_block(block: int, n: int) -> int | None:
    """The largest of block, block/2, ... (down to 16) that divides `n`; None if none does.

    >>> fit_block(128, 768), fit_block(128, 1600), fit_block(32, 100)
    (128, 64, None)
    """
    while block >= 16:
        if n % block == 0:
            return block
        block //= 2
    return None


def quantize_matmuls(model: onnx.ModelProto, recipe: QuantRecipe, exclude: list[str]) -> onnx.ModelProto:
    """Every MatMul with a constant weight -> MatMulNBits (`recipe`), except the nodes named in `exclude`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    log = logging.getLogger("onnxruntime.quantization")
    old_level = log.level
    log.setLevel(logging.ERROR)
    try:
        q = MatMulNBitsQuantizer(model, bits=recipe.bits, block_size=recipe.block_size,
                                 is_symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level,
                                 nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
        q.process()
    finally:
        log.setLevel(old_level)
    return q.model.model


def head_is_tied(model: onnx.ModelProto) -> bool:
    """True when the LM head's (E, V) weight is the token table transposed (GPT-2's tied head).

    Call it before `split_outliers`, which zeroes the head's outlier rows.
    """
    inits = {i.name: i for i in model.graph.initializer}
    if "wte.weight" not in inits or HEAD_WEIGHT not in inits:
        return False
    return bool(np.array_equal(numpy_helper.to_array(inits["wte.weight"]),
                               numpy_helper.to_array(inits[HEAD_WEIGHT]).T))


def blockwise_symmetric(w: np.ndarray, block_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization per block of the last axis, in MatMulNBits' uint8 layout.

    (R, C) float -> (R, C/block, block*bits/8) uint8 and (R, C/block) float32 scales;
    dequantized: (q - 2^(bits-1)) * scale. 8 bits: scale = |max| / 127. 4 bits: as
    onnxruntime's own symmetric 4-bit quantizer, scale = (the value of largest |.|) / -8,
    which uses all 16 levels (the block's extreme lands on -8); two values per byte,
    low nibble first.

    >>> q, s = blockwise_symmetric(np.array([[1.0, -2.0, 0.5, 4.0]], np.float32), 4, 4)
    >>> q.shape, s.tolist(), (q & 15).ravel().tolist(), (q >> 4).ravel().tolist()
    ((1, 1, 2), [[-0.5]], [6, 7], [12, 0])
    """
    r, c = w.shape
    blocks = w.reshape(r, c // block_size, block_size).astype(np.float32)
    if bits == 8:
        scales = np.abs(blocks).max(-1) / 127.0  # (R, C/bs)
        lo, hi = -127, 127
    elif bits == 4:
        idx = np.abs(blocks).argmax(-1)[..., None]
        scales = np.take_along_axis(blocks, idx, -1)[..., 0] / -8.0
        lo, hi = -8, 7
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    scales[scales == 0] = 1.0
    zp = 1 << (bits - 1)
    q = (np.clip(np.rint(blocks / scales[..., None]), lo, hi) + zp).astype(np.uint8)  # (R, C/bs, bs)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def tie_table(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int, tied: bool) -> dict:
    """Quantize the token table (V, E) to `bits` for the embedding and (when `tied`) the LM head too::

        wte.weight_q (V, E/bs, bs*bits/8) uint8 ─┬─GatherBlockQuantized(ids; scales (V, E/bs, 1))─Reshape─ (B,S,E)
                                                 └─MatMulNBits(x; scales (V, E/bs))────────────────────── logits

    MatMulNBits wants B as (N, K/bs, bs*bits/8) and GatherBlockQuantized scales of the data's
    rank, so the table is stored 3-D, the gather's output reshaped back to (B, S, E), and only
    the scales (~1 % of the table) stored twice. Both read uint8 data with MatMulNBits'
    conventions (two 4-bit values per byte, low nibble first; no zero points = 8 or 128).

    Returns what was done: ``{"embedding": ..., "lm_head": ..., "shared_table": bool,
    "table_block_size": ...}``. A head that is not tied keeps its own table (quantized by
    the MatMulNBits quantizer, same bits). An n_embd that is no multiple of 16 keeps the
    fp32 table for the embedding.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[0] == "wte.weight")
    head = next((n for n in g.node if n.op_type == "MatMul" and n.name == HEAD), None)
    wte = numpy_helper.to_array(inits["wte.weight"])  # (V, E)
    v, e = wte.shape
    bs = fit_block(block_size, e)
    precision = f"int{bits}"
    if bs is None:
        return {"embedding": "fp32", "lm_head": _own_head(model, head, bits, block_size, accuracy_level),
                "shared_table": False, "table_block_size": None}
    q, scales = blockwise_symmetric(wte, bs, bits)
    g.initializer.remove(inits["wte.weight"])
    g.initializer.extend([numpy_helper.from_array(q, "wte.weight_q"),
                          numpy_helper.from_array(scales[..., None], "wte.weight_scales_g")])  # (V, E/bs, 1)
    blocks = gather.output[0] + "_blocks"  # (B, S, E/bs, bs)
    new = [helper.make_node("GatherBlockQuantized", ["wte.weight_q", gather.input[1], "wte.weight_scales_g"],
                            [blocks], name=gather.name, domain="com.microsoft",
                            gather_axis=0, quantize_axis=2, block_size=bs, bits=bits),
           helper.make_node("Reshape", [blocks, "wte.table_shape"], list(gather.output), name=gather.name + "/reshape")]
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, e], np.int64), "wte.table_shape"))
    _replace(g, gather, new)
    if not (tied and head is not None):
        return {"embedding": precision, "lm_head": _own_head(model, head, bits, bs, accuracy_level),
                "shared_table": False, "table_block_size": bs}
    g.initializer.remove(inits[HEAD_WEIGHT])
    g.initializer.append(numpy_helper.from_array(scales, "wte.weight_scales"))  # (V, E/bs): MatMulNBits' shape
    kw = {"accuracy_level": accuracy_level} if accuracy_level else {}
    _replace(g, head, [helper.make_node("MatMulNBits", [head.input[0], "wte.weight_q", "wte.weight_scales"],
                                        list(head.output), name=head.name, domain="com.microsoft",
                                        K=e, N=v, bits=bits, block_size=bs, **kw)])
    return {"embedding": precision, "lm_head": precision, "shared_table": True, "table_block_size": bs}


def _own_head(model: onnx.ModelProto, head, bits: int, block_size: int, accuracy_level: int) -> str:
    """Quantize an untied (or unshareable) LM head on its own; returns its precision."""
    if head is None:
        return "fp32"
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != head.name]
    recipe = QuantRecipe(bits=bits, block_size=block_size, accuracy_level=accuracy_level)
    quantized = quantize_matmuls(model, recipe, others)
    if quantized is not model:
        model.CopyFrom(quantized)
    return f"int{bits}"


def _replace(g, old, new: list) -> None:
    i = list(g.node).index(old)
    g.node.remove(old)
    for k, n in enumerate(new):
        g.node.insert(i + k, n)
