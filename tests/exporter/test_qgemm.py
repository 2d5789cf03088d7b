"""exporter/qgemm: the integer-GEMM int8 graph on small graphs made here (issue #21).

The graph against a numpy model of what it should compute, a row of zeros, the 7-bit bound
that keeps AVX2's int16 pair sums exact, the GELU shortcut, the recipe's checks. Rows alone vs
in a batch: tests/runtime/test_qgemm_rows.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.exporter.policy import cpu_session
from gpt2onnx.exporter.qgemm import GELU_FLOOR, SEVEN_BITS, per_column, quantize_qgemm, ranges
from gpt2onnx.exporter.quantize import QuantRecipe

V, K, N, F = 50, 64, 40, 96  # vocab, width, projection width, MLP width


def embed_project(seed: int = 0, gelu: bool = False):
    """ids (B, S) -> Gather(wte) -> X -> MatMul(W) [-> FastGelu -> MatMul(W2)] -> + bias -> Y, as the exporter names them."""
    rng = np.random.default_rng(seed)
    wte = rng.standard_normal((V, K)).astype(np.float32)
    wte[7] = 0.0  # token 7 embeds to a row of zeros
    w = rng.standard_normal((K, F if gelu else N)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((F, N)).astype(np.float32) * 0.1
    b = rng.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("Gather", ["wte.weight", "input_ids"], ["x"], "embed_tokens")]
    inits = [numpy_helper.from_array(wte, "wte.weight"), numpy_helper.from_array(w, "h.0.mlp.c_fc.weight"),
             numpy_helper.from_array(b, "b")]
    if gelu:
        inits += [numpy_helper.from_array(w2, "h.0.mlp.c_proj.weight"),
                  numpy_helper.from_array(np.zeros(F, np.float32), "b1")]
        nodes += [helper.make_node("MatMul", ["x", "h.0.mlp.c_fc.weight"], ["f"], "h.0.fc"),
                  helper.make_node("FastGelu", ["f", "b1"], ["g"], "h.0.gelu", domain="com.microsoft"),
                  helper.make_node("MatMul", ["g", "h.0.mlp.c_proj.weight"], ["y0"], "h.0.mlp_proj")]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "h.0.mlp.c_fc.weight"], ["y0"], "h.0.fc"))
    nodes.append(helper.make_node("Add", ["y0", "b"], ["Y"], "bias"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", N])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model, wte, w, w2, b


def run(model, ids, tmp_path, name, outputs=("Y",)):
    path = str(tmp_path / f"{name}.onnx")
    onnx.save_model(model, path)
    return cpu_session(path).run(list(outputs), {"input_ids": ids})


def expose(model, *names):
    """Make intermediate tensors graph outputs (type left to onnxruntime)."""
    for n in names:
        model.graph.output.append(onnx.ValueInfoProto(name=n))
    return model


IDS = np.array([[1, 7, 3, 4, 9], [2, 2, 40, 11, 7]], np.int64)


@pytest.mark.parametrize("seven_bits", SEVEN_BITS)
def test_one_projection_computes_per_row_integers_times_scales(tmp_path, seven_bits):
    """Y = (round(X / s) @ W8) x s x w_scale + bias, s = each row's |max| / QA; the table int8 per token."""
    model, wte, w, _, b = embed_project()
    ref = run(model, IDS, tmp_path, "fp32")[0]
    report = quantize_qgemm(model, seven_bits, [], tied=False)
    onnx.checker.check_model(model)
    assert report["embedding"] == "int8" and not report["shared_table"]
    assert "MatMul" not in [n.op_type for n in model.graph.node]
    y, x, q = run(expose(model, "x", "h.0.fc/q"), IDS, tmp_path, "q", ("Y", "x", "h.0.fc/q"))
    qa, zp, qw = ranges(seven_bits)
    tq, ts = per_column(np.ascontiguousarray(wte.T), qw)  # the table: a scale per token
    np.testing.assert_array_equal(x, (tq.T.astype(np.float32) * ts[:, None])[IDS])  # the dequantized rows
    s = np.abs(x).max(-1, keepdims=True) / qa
    with np.errstate(invalid="ignore", divide="ignore"):
        expect_q = np.clip(np.rint(x / s), -qa, qa) + zp
    real = s[..., 0] > 0
    assert (np.abs(q[real].astype(int) - expect_q[real]) <= 1).all() and np.mean(q[real] == expect_q[real]) > 0.99
    wq, ws = per_column(w, qw)
    acc = (q.astype(np.int64) - zp) @ wq.astype(np.int64)
    np.testing.assert_allclose(y, acc * s * ws + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[IDS == 7], np.broadcast_to(b, (int((IDS == 7).sum()), N)))  # zero row: the bias
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()  # and close to fp32


@pytest.mark.parametrize("seven_bits", SEVEN_BITS)
def test_no_u8_times_s8_pair_sum_can_saturate_int16(tmp_path, seven_bits):
    """AVX2's vpmaddubsw adds two u8 x s8 products in int16: with one operand in 7 bits no sum can reach 32767,
    even for a row with a huge value (every other value then rounds to the zero point)."""
    model, *_ = embed_project(1, gelu=True)
    quantize_qgemm(model, seven_bits, [], tied=False)
    qa, zp, qw = ranges(seven_bits)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= qw
    model.graph.node[[n.name for n in model.graph.node].index("embed_tokens/dequantize")].output[0] = "x_table"
    x = np.random.default_rng(2).standard_normal((1, 3, K)).astype(np.float32)
    x[0, 1, 5] = 1e6
    model.graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K]))
    path = str(tmp_path / "m.onnx")
    onnx.save_model(expose(model, "h.0.fc/q", "h.0.mlp_proj/q"), path)
    ids = np.zeros((1, 3), np.int64)
    for q in cpu_session(path).run(["h.0.fc/q", "h.0.mlp_proj/q"], {"input_ids": ids, "x": x}):
        assert zp - qa <= q.min() and q.max() <= zp + qa
        assert 2 * int(q.max()) * qw <= 32767


def test_gelu_inputs_take_one_pass_and_never_clip(tmp_path):
    """The MLP projection's input comes from FastGelu (>= -0.17): ReduceMax + Max(floor) bounds its |max|."""
    model, *_ = embed_project(3, gelu=True)
    ref = run(model, IDS, tmp_path, "fp32")[0]
    quantize_qgemm(model, "weights", [], tied=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["h.0.mlp_proj/rowmax"] == "ReduceMax" and ops["h.0.mlp_proj/absmax"] == "Max"
    assert "h.0.mlp_proj/abs" not in ops and ops["h.0.fc/abs"] == "Abs"  # the LayerNorm-side input keeps Abs
    y, g, s = run(expose(model, "g", "h.0.mlp_proj/row_scale"), IDS, tmp_path, "q",
                  ("Y", "g", "h.0.mlp_proj/row_scale"))
    assert (s * 127 >= np.abs(g).max(-1, keepdims=True) * (1 - 1e-6)).all()  # no value clipped
    assert (s * 127 >= GELU_FLOOR * (1 - 1e-6)).all() and g.min() > -GELU_FLOOR
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_the_qgemm_recipe_checks_its_fields():
    assert QuantRecipe(scheme="qgemm").label == "qgemm (7-bit activations)"
    with pytest.raises(ValueError, match="scheme"):
        QuantRecipe(scheme="qgemm4")
    with pytest.raises(ValueError, match="8-bit"):
        QuantRecipe(scheme="qgemm", bits=4)
    with pytest.raises(ValueError, match="seven_bits"):
        QuantRecipe(scheme="qgemm", seven_bits="both")
