"""exporter/quantize: the recipes tried, block sizes, outlier channels, the exact outlier split, int8 blocks.

Unit level, on numbers and a one-MatMul graph made here. Whether int8 exports meet the
fidelity gate on real text is tests/eval/test_fidelity.py's job.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.exporter.policy import cpu_session
from gpt2onnx.exporter.nbits import blockwise_symmetric
from gpt2onnx.exporter.quantize import (FALLBACK_BLOCK, INT8, INT8_NBITS, fit_block, outlier_channels, recipes_to_try,
                                        split_outliers)
from gpt2onnx.exporter.quantize import QuantRecipe as Int8Recipe


@pytest.mark.parametrize("n,block,fit", [(768, 128, 128), (1600, 128, 64), (1280, 128, 128), (32, 128, 32),
                                         (48, 128, 16), (48, 32, 16), (100, 32, None), (8, 16, None),
                                         (1024, 16, 16)])
def test_fit_block_halves_down_to_16(n, block, fit):
    assert fit_block(block, n) == fit
    if fit is not None:
        assert n % fit == 0 and fit <= block and block % fit == 0


@pytest.mark.parametrize("n_embd,blocks", [
    (768, [128, 32]),  # gpt2: MatMulNBits block 128, then the finer block
    (1600, [64, 32]),  # gpt2-xl: 1600 = 64 x 25
    (32, [32]),  # the tiny test model: both shrink to 32, tried once
    (48, [16]),  # odd dims: 16 divides 48, nothing larger does
    (100, [128, 32]),  # no power of two >= 16 divides it: onnxruntime pads a partial block
])
def test_recipes_to_try_shrink_to_fit_n_embd(n_embd, blocks):
    """The shipped int8 recipe (qgemm: per column, no block) first, then MatMulNBits' blocks fitted to n_embd."""
    first, *rest = recipes_to_try(n_embd=n_embd)
    assert first == INT8 and INT8.scheme == "qgemm" and INT8.seven_bits == "weights"
    assert [r.block_size for r in rest] == blocks
    assert all(replace(r, table_block_size=INT8_NBITS.table_block_size) == replace(INT8_NBITS, block_size=r.block_size)
               for r in rest)  # only the blocks change (the token table's block shrinks the same way)


def test_recipes_to_try_keep_a_custom_recipe_and_never_coarsen_it():
    custom = Int8Recipe(block_size=64, outlier_ratio=4.0, max_outliers=2)
    recipes = recipes_to_try(custom, n_embd=768)
    assert [r.block_size for r in recipes] == [64, FALLBACK_BLOCK]
    assert {(r.outlier_ratio, r.max_outliers, r.accuracy_level) for r in recipes} == {(4.0, 2, 4)}
    assert [r.block_size for r in recipes_to_try(Int8Recipe(block_size=16), n_embd=768)] == [16]  # finer than 32
    assert recipes_to_try(None, 768) == recipes_to_try(INT8, 768)


def test_recipe_json_is_what_the_manifest_records(tiny_int8):
    from gpt2onnx import artifact

    recorded = artifact.read_manifest(tiny_int8).quantization
    assert INT8.to_json().keys() <= recorded.keys()
    assert recorded["scheme"] == "qgemm" and recorded["bits"] == 8 and recorded["seven_bits"] == "weights"


def calibration(k: int, outliers: dict[int, float]) -> np.ndarray:
    """|max| of K input channels: 1 (the median), the given channels set to the given values."""
    a = np.ones(k, np.float32)
    for i, v in outliers.items():
        a[i] = v
    return a


def test_outlier_channels_on_a_synthetic_calibration():
    stats = {
        "h.0.attn.c_attn.weight": calibration(64, {3: 50.0, 40: 9.0, 17: 200.0}),
        "h.0.mlp.c_fc.weight": calibration(64, {}),  # no outliers: no entry, no extra nodes
        "h.1.mlp.c_proj.weight": calibration(256, {5: 5.9, 9: 6.0}),  # not > 6 x the median
        "lm_head.weight_t": np.zeros(64, np.float32),  # a dead input: no median to compare with
    }
    assert outlier_channels(stats) == {"h.0.attn.c_attn.weight": [3, 17, 40]}  # sorted channel ids
    assert outlier_channels(stats, Int8Recipe(outlier_ratio=20.0)) == {"h.0.attn.c_attn.weight": [3, 17]}
    assert outlier_channels(stats, Int8Recipe(outlier_ratio=5.0)) == {"h.0.attn.c_attn.weight": [3, 17, 40],
                                                                      "h.1.mlp.c_proj.weight": [5, 9]}


def test_outlier_channels_keep_the_largest_max_outliers():
    values = {i: 10.0 + i for i in range(0, 40, 2)}  # 20 outliers, channel 38 the largest
    found = outlier_channels({"w": calibration(64, values)}, Int8Recipe(max_outliers=3))
    assert found == {"w": [34, 36, 38]}
    assert len(outlier_channels({"w": calibration(64, values)})["w"]) == INT8.max_outliers


def one_matmul(k: int = 8, n: int = 5, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """Y = X @ W, W (k, n) an initializer named like an exported weight."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["X", "h.0.mlp.c_fc.weight"], ["Y"], name="h.0.fc")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", n])],
                          initializer=[numpy_helper.from_array(w, "h.0.mlp.c_fc.weight")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w


def run(model: onnx.ModelProto, x: np.ndarray, tmp_path, name: str) -> np.ndarray:
    path = str(tmp_path / f"{name}.onnx")
    onnx.save_model(model, path)
    return cpu_session(path).run(["Y"], {"X": x})[0]


def test_split_outliers_is_exact_and_names_the_fp32_matmul(tmp_path):
    """X @ W == (X * mask) @ W_inliers + X[:, outliers] @ W[outliers]; the outlier MatMul stays fp32."""
    model, w = one_matmul()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    x[:, [1, 6]] *= 300  # the outlier channels
    before = run(model, x, tmp_path, "before")
    np.testing.assert_allclose(before, x @ w, rtol=1e-5, atol=1e-3)
    keep = split_outliers(model, {"h.0.mlp.c_fc.weight": [1, 6], "not.in.graph": [0]})
    assert keep == ["h.0.fc/outlier_matmul"]
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Mul", "Gather", "MatMul", "MatMul", "Add"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not inits["h.0.mlp.c_fc.weight"][[1, 6]].any()  # outlier rows zeroed in the inlier weight
    np.testing.assert_array_equal(inits["h.0.mlp.c_fc.weight.outlier_rows"], w[[1, 6]])
    np.testing.assert_array_equal(inits["h.0.mlp.c_fc.weight.inlier_mask"], [1, 0, 1, 1, 1, 1, 0, 1])
    np.testing.assert_allclose(run(model, x, tmp_path, "after"), before, rtol=1e-5, atol=1e-3)


def test_split_outliers_without_outliers_changes_nothing():
    model, _ = one_matmul()
    before = model.SerializeToString()
    assert split_outliers(model, {}) == []
    assert model.SerializeToString() == before


def test_blockwise_8bit_round_trip_within_half_a_step():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[0, :16] = 0.0  # an all-zero block
    w[1, 20] = 40.0  # one large value: only its own block's scale grows
    q, scales = blockwise_symmetric(w, 16, 8)
    q = q.reshape(6, 64)  # (R, C/block, block) -> (R, C)
    assert q.dtype == np.uint8 and scales.shape == (6, 4) and scales.dtype == np.float32
    assert scales[0, 0] == 1.0 and (q[0, :16] == 128).all()
    assert scales[1, 1] == pytest.approx(40.0 / 127) and scales[1, 2] < 0.1
    deq = (q.astype(np.float32) - 128) * np.repeat(scales, 16, axis=1)
    assert (np.abs(deq - w) <= np.repeat(scales, 16, axis=1) / 2 + 1e-6).all()
    assert q.min() >= 1 and q.max() <= 255  # symmetric: -127 .. 127 around 128


def test_int8_folder_runs_every_matmul_on_the_qgemm_with_one_token_table(tiny_int8):
    import os

    from gpt2onnx.artifact import read_manifest

    model = onnx.load(os.path.join(tiny_int8, "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and "MatMulNBits" not in ops  # a random model has no outliers: nothing stays fp32
    assert ops.count("MatMulIntegerToFloat") == 4 * 2 + 1  # the LM head too
    inits = {t.name: t for t in model.graph.initializer}
    tables = [t for t in inits.values() if list(t.dims) == [1000, 32]]
    assert [t.name for t in tables] == ["wte.weight_s8"] and tables[0].data_type == TensorProto.INT8  # stored once
    head = next(n for n in model.graph.node if n.name == "lm_head")
    transpose = next(n for n in model.graph.node if n.output[0] == head.input[1])
    assert transpose.op_type == "Transpose" and transpose.input[0] == "wte.weight_s8"
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "wte.weight_s8"]
    assert [n.name for n in gathers] == ["embed_tokens"]  # the embedding reads the same table
    lengths = [int(d.value) for i in model.graph.initializer for d in i.external_data if d.key == "length"]
    assert sum(n >= 1000 * 32 for n in lengths) == 1, sorted(lengths)[-3:]  # its bytes once in the data file
    assert {i.version for i in model.opset_import if i.domain in ("", "ai.onnx")} == {21}
    assert read_manifest(tiny_int8).opset == 21
