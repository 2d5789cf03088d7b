"""int8 on onnxruntime's integer GEMM ("qgemm"): u8 activations per row x s8 weights per column.

Every transformer MatMul ``X (B, S, K) @ W (K, N)`` becomes (issue #21)::

    X ─Abs─ReduceMax(last axis)─Mul(1/QA)─ s (B, S, 1)                     each row's |max| / QA
    X ─QuantizeLinear(s, zp; one block per row)─ q (B, S, K) uint8         round(X / s) + ZP, saturating
    q ─MatMulIntegerToFloat(W8 (K, N) int8, s, w_scale (N,), ZP)─ Y       (q - ZP) @ W8 x s x w_scale

Why so: a row's scale is its own and its integer sums are exact, so a row gives the same bits
alone as in any batch (no row pairs: `gpt2onnx._engine.needs_row_pairs`); one operand keeps to
7 bits (`QuantRecipe.seven_bits`; `INT8` takes the weights) so that no x86 kernel, AVX2's
int16 pair sums included, can saturate. The bias stays the graph's own Add (the op would scale
it by each row's scale); the per-row QuantizeLinear is opset 21's blocked form, whose zero
point is one (B, S, 1) tensor shared by every MatMul (`to_opset21`); GELU outputs are bounded
by ``max(ReduceMax(X), GELU_FLOOR)``, one pass instead of two; a zero row's scale 0 gives 0.
The tied token table is stored once, int8 per token, for the embedding and the LM head; the
outlier split (`quantize.split_outliers`) runs before. The arithmetic and the measurements:
docs/quality.md ("int8 on the integer GEMM"), bench/README.md (2026-12-05).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .nbits import HEAD, HEAD_WEIGHT
from .recipe import SEVEN_BITS

OPSET = 21  # QuantizeLinear with a block size (one scale per row)
GELU_FLOOR = 0.171  # GELU(z) >= -0.16997 (erf), -0.17004 (tanh approximation)
GELU_OPS = ("FastGelu", "BiasGelu", "Gelu")


def ranges(seven_bits: str) -> tuple[int, int, int]:
    """(activation |q| max, its uint8 zero point, weight |q| max) for `seven_bits`.

    >>> ranges("activations"), ranges("weights")
    ((63, 64, 127), (127, 128, 63))
    """
    if seven_bits not in SEVEN_BITS:
        raise ValueError(f"seven_bits must be one of {SEVEN_BITS}, got {seven_bits!r}")
    return (63, 64, 127) if seven_bits == "activations" else (127, 128, 63)


def per_column(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of (K, N) `w`: (K, N) int8 within +-qmax, (N,) float32 scales.

    >>> q, s = per_column(np.array([[1.0, -4.0], [0.5, 2.0]], np.float32), 127)
    >>> q.tolist(), np.allclose(s, [1 / 127, 4 / 127])
    ([[127, -127], [64, 64]], True)
    """
    scales = (np.abs(w).max(0) / qmax).astype(np.float32)
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(w / scales), -qmax, qmax).astype(np.int8)
    return np.ascontiguousarray(q), scales


def to_opset21(model: onnx.ModelProto) -> None:
    """Raise the default-domain opset to 21; Reduce* ops take ``axes`` as an input from opset 18."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, OPSET)
    g = model.graph
    for node in g.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":  # ReduceSum moved at 13
            attr = next((a for a in node.attribute if a.name == "axes"), None)
            if attr is not None:
                name = f"{node.name or node.output[0]}/axes"
                g.initializer.append(numpy_helper.from_array(np.asarray(attr.ints, np.int64), name))
                node.attribute.remove(attr)
                node.input.append(name)


class _Rewriter:
    """Builds the quantize + QGEMM nodes of one graph (shared constants made once)."""

    def __init__(self, model: onnx.ModelProto, seven_bits: str):
        self.g = model.graph
        self.body = ranges(seven_bits)
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.added: dict[str, onnx.TensorProto] = {}
        for name, value in (("qgemm/gelu_floor", np.array(GELU_FLOOR, np.float32)),
                            ("qgemm/last_axis", np.array([-1], np.int64)),
                            ("qgemm/one", np.array([1], np.int64))):
            self.const(name, value)
        # The zero points of every body MatMul's (B, S, 1) row scales: made once from input_ids' shape.
        self.head_nodes = [
            helper.make_node("Shape", ["input_ids"], ["qgemm/ids_shape"], "qgemm/ids_shape"),
            helper.make_node("Concat", ["qgemm/ids_shape", "qgemm/one"], ["qgemm/rows_shape"], "qgemm/rows_shape",
                             axis=0),
            helper.make_node("Expand", [self.zp(self.body), "qgemm/rows_shape"], ["qgemm/zp_rows"], "qgemm/zp_rows"),
        ]

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.added:
            self.added[name] = numpy_helper.from_array(value, name)
        return name

    def zp(self, rng) -> str:
        return self.const(f"qgemm/zp{rng[1]}", np.array(rng[1], np.uint8))

    def _bounded_by_gelu(self, x: str) -> bool:
        """x comes from a GELU (possibly through the outlier split's 0/1 mask)."""
        node = self.producer.get(x)
        if node is not None and node.op_type == "Mul" and node.input[1].endswith(".inlier_mask"):
            node = self.producer.get(node.input[0])
        return node is not None and node.op_type in GELU_OPS

    def quantize_rows(self, x: str, k: int, base: str, rng, own_zp: bool) -> tuple[list, str, str]:
        """Nodes quantizing `x` (.., k) per row to `rng`: (nodes, q, scale). `own_zp`: x is not (B, S, k)."""
        nodes = []
        if self._bounded_by_gelu(x):
            nodes += [helper.make_node("ReduceMax", [x, "qgemm/last_axis"], [base + "/rowmax"], base + "/rowmax",
                                       keepdims=1),
                      helper.make_node("Max", [base + "/rowmax", "qgemm/gelu_floor"], [base + "/absmax"],
                                       base + "/absmax")]
        else:
            nodes += [helper.make_node("Abs", [x], [base + "/abs"], base + "/abs"),
                      helper.make_node("ReduceMax", [base + "/abs", "qgemm/last_axis"], [base + "/absmax"],
                                       base + "/absmax", keepdims=1)]
        scale, zp = base + "/row_scale", "qgemm/zp_rows"
        inv = self.const(f"qgemm/inv{rng[0]}", np.array(1.0 / rng[0], np.float32))
        nodes.append(helper.make_node("Mul", [base + "/absmax", inv], [scale], base + "/row_scale"))
        if own_zp:
            zp = base + "/zp_rows"
            nodes += [helper.make_node("Shape", [scale], [base + "/scale_shape"], base + "/scale_shape"),
                      helper.make_node("Expand", [self.zp(rng), base + "/scale_shape"], [zp], zp)]
        nodes.append(helper.make_node("QuantizeLinear", [x, scale, zp], [base + "/q"], base + "/quantize",
                                      axis=-1, block_size=k))
        return nodes, base + "/q", scale

    def qgemm(self, x: str, y: str, w_name: str, w_q: np.ndarray | str, w_scales: np.ndarray, k: int, name: str,
              rng=None, own_zp: bool = False) -> list:
        """Nodes computing y = x @ W on the QGEMM; `w_q` an int8 (K, N) array or the name of such a tensor."""
        rng = rng or self.body
        nodes, q, scale = self.quantize_rows(x, k, name, rng, own_zp)
        if isinstance(w_q, np.ndarray):
            w_q = self.const(w_name + "_s8", w_q)
        self.const(w_name + "_scales", w_scales)
        nodes.append(helper.make_node("MatMulIntegerToFloat", [q, w_q, scale, w_name + "_scales", self.zp(rng)], [y],
                                      name, domain="com.microsoft"))
        return nodes


def quantize_qgemm(model: onnx.ModelProto, seven_bits: str, exclude: list[str], tied: bool) -> dict:
    """Rewrite `model` in place: every MatMul with a constant weight, except the nodes named in
    `exclude`, onto the QGEMM; the token table int8 per token. Returns the table report
    (as `nbits.tie_table`)."""
    to_opset21(model)
    r = _Rewriter(model, seven_bits)
    g = model.graph
    head = next((n for n in g.node if n.op_type == "MatMul" and n.name == HEAD), None)
    share = tied and head is not None
    nodes = list(r.head_nodes)
    dropped = set()
    for node in g.node:
        w = r.inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or node.name in exclude or len(w.dims) != 2 or (share and node is head):
            nodes.append(node)
            continue
        wf = numpy_helper.to_array(w)
        w_q, w_s = per_column(wf, r.body[2])
        nodes += r.qgemm(node.input[0], node.output[0], w.name, w_q, w_s, wf.shape[0], node.name or w.name,
                         own_zp=node is head)
        dropped.add(w.name)
    del g.node[:]
    g.node.extend(nodes)
    report = _token_table(model, r, head if share else None)
    for name in dropped:
        if not any(name in n.input for n in g.node):
            g.initializer.remove(r.inits[name])
    g.initializer.extend(r.added.values())
    return report


def _token_table(model: onnx.ModelProto, r: _Rewriter, head) -> dict:
    """The token table int8, one scale per token, for the embedding and (`head` given) the tied LM head::

        wte_s8 (V, E) int8 ─Gather(ids)─ (B, S, E) ─DequantizeLinear(scale[ids] (B, S, 1))─ embedding
              └─Transpose (folded at load)─ (E, V) ─MatMulIntegerToFloat(w_scale = scale (V,))─ logits
    """
    g = model.graph
    gather = next((n for n in g.node if n.op_type == "Gather" and n.input[0] == "wte.weight"), None)
    if gather is None:  # no token table (a graph made by hand): nothing to share
        return {"embedding": "fp32", "lm_head": "fp32" if head is None else "int8", "shared_table": False,
                "table_block_size": None}
    wte = numpy_helper.to_array(r.inits["wte.weight"])  # (V, E)
    rng = r.body  # measured: a 7-bit head input with an 8-bit table costs more than this (bench/README.md)
    q, s = per_column(np.ascontiguousarray(wte.T), rng[2])  # per token = per column of the head's (E, V)
    v, e = wte.shape
    r.const("wte.weight_s8", np.ascontiguousarray(q.T))
    r.const("wte.weight_token_scales", s[:, None])  # (V, 1): gathered as (B, S, 1)
    ids, out = gather.input[1], gather.output[0]
    embed = [helper.make_node("Gather", ["wte.weight_s8", ids], [out + "_s8"], gather.name, axis=0),
             helper.make_node("Gather", ["wte.weight_token_scales", ids], [out + "_scales"], gather.name + "/scales",
                              axis=0),
             helper.make_node("DequantizeLinear", [out + "_s8", out + "_scales"], [out], gather.name + "/dequantize",
                              axis=-1, block_size=e)]
    i = list(g.node).index(gather)
    g.node.remove(gather)
    for k, n in enumerate(embed):
        g.node.insert(i + k, n)
    g.initializer.remove(r.inits["wte.weight"])
    report = {"embedding": "int8", "lm_head": "int8", "shared_table": head is not None, "table_block_size": None}
    if head is None:  # no LM head (a graph made by hand), or an untied one, quantized with the other MatMuls
        return report
    g.node.insert(0, helper.make_node("Transpose", ["wte.weight_s8"], ["wte.weight_s8_t"], "qgemm/head_weight",
                                      perm=[1, 0]))
    i = list(g.node).index(head)
    g.node.remove(head)
    for k, n in enumerate(r.qgemm(head.input[0], head.output[0], "wte.weight", "wte.weight_s8_t", s, e, head.name,
                                  rng, own_zp=True)):
        g.node.insert(i + k, n)
    if HEAD_WEIGHT in r.inits:
        g.initializer.remove(r.inits[HEAD_WEIGHT])
    return report
