"""The integer-GEMM int8 path keeps every row independent of its company, bit for bit (issue #21).

A row alone equals the same row in a batch of 1-8 rows, at 1 and 2 threads: first one
projection at the 124M model's width (the kernels MLAS picks at each M), then whole graphs
through the runtime with the even-M rule switched off (`row_probe.probe`): the tiny model
here, the 124M architecture in the slow test. A MatMulNBits graph is the probe's control:
there the rule is needed, and the probe must say so.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.artifact import read_manifest
from gpt2onnx.exporter.qgemm import quantize_qgemm
from helpers.row_probe import probe


def projection(tmp_path, seven_bits: str) -> str:
    """ids (B, S) -> Gather (64 x 768 table) -> MatMul 768 x 2304 -> + bias, on the QGEMM."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 768)).astype(np.float32), "wte.weight"),
             numpy_helper.from_array(rng.standard_normal((768, 2304)).astype(np.float32) * 0.05,
                                     "h.0.attn.c_attn.weight"),
             numpy_helper.from_array(rng.standard_normal(2304).astype(np.float32), "b")]
    nodes = [helper.make_node("Gather", ["wte.weight", "input_ids"], ["x"], "embed_tokens"),
             helper.make_node("MatMul", ["x", "h.0.attn.c_attn.weight"], ["y0"], "h.0.qkv_matmul"),
             helper.make_node("Add", ["y0", "b"], ["Y"], "h.0.qkv_bias")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", 2304])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    quantize_qgemm(model, seven_bits, [], tied=False)
    path = str(tmp_path / f"{seven_bits}.onnx")
    onnx.save_model(model, path)
    return path


@pytest.mark.parametrize("seven_bits", ["weights", "activations"])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_projection_row_alone_equals_the_row_in_any_batch(tmp_path, seven_bits, threads):
    from gpt2onnx._engine import session_options

    import onnxruntime as ort

    s = ort.InferenceSession(projection(tmp_path, seven_bits), session_options(threads),
                             providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for m in range(1, 9):
        ids = rng.integers(0, 64, m)
        for shape in ((1, m), (m, 1)):  # one prompt of m tokens, or m rows of one token (a decode step)
            batch = s.run(None, {"input_ids": ids.reshape(shape)})[0].reshape(m, -1)
            for i in range(m):
                alone = s.run(None, {"input_ids": ids[i:i + 1].reshape(1, 1)})[0].reshape(-1)
                assert np.array_equal(alone, batch[i]), (m, shape, i)


def test_tiny_model_rows_alone_equal_rows_in_batches_of_2_to_8(tiny_int8):
    """The whole tiny graph (qgemm, the default int8 recipe): prefill and 3 decode steps, partners of the
    same length (one batched prefill) or other lengths, first or last, 1 and 2 threads."""
    assert read_manifest(tiny_int8).quantization["scheme"] == "qgemm"
    cases, bad = probe(tiny_int8, threads=(1, 2), lengths=(1, 2, 5, 16), partners=range(1, 8), steps=3)
    assert cases == 2 * 4 * 7 * 2 * 2 and bad == []


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict:
    """A tiny GPT-2 128 wide (block 128, where MatMulNBits' row pairs show), exported both ways: {scheme: dir}."""
    import gpt2onnx
    from helpers.models import save_tiny_gpt2
    from gpt2onnx.exporter import quantize

    root = tmp_path_factory.mktemp("wide")
    src = save_tiny_gpt2(str(root / "src"), n_embd=128, n_head=2)
    out = {}
    for name, recipe in (("qgemm", quantize.INT8_QGEMM), ("MatMulNBits", quantize.INT8_NBITS)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quantize, "INT8", recipe)
            gpt2onnx.export(src, str(root / name), precision="int8", progress=False)
        out[name] = str(root / name)
    return out


def test_the_probe_finds_matmulnbits_row_pairs_and_no_qgemm_difference(wide):
    """The control: 8-bit MatMulNBits computes rows in pairs, so without the even-M rule rows differ; the
    same model on the QGEMM does not, in batches of 2-8 rows at 1 and 2 threads."""
    assert read_manifest(wide["MatMulNBits"]).quantization["scheme"] == "MatMulNBits"
    cases, bad = probe(wide["MatMulNBits"], threads=(1,), lengths=(1, 3, 5), partners=(1, 2), steps=3)
    assert bad, f"no row differed in {cases} cases"
    assert read_manifest(wide["qgemm"]).quantization["scheme"] == "qgemm"
    cases, bad = probe(wide["qgemm"], threads=(1, 2), lengths=(1, 3, 5, 12), partners=range(1, 8), steps=3)
    assert cases == 2 * 4 * 7 * 2 * 2 and bad == [], bad[:5]


@pytest.mark.slow
def test_124m_rows_alone_equal_rows_in_company(gpt2_124m):
    """The whole-graph probe on the default int8 folder at real scale: prompts of 1-33 tokens, beside
    1-4 partners, first or last, same or other lengths, prefill + 3 decode steps, 1 and 2 threads."""
    assert read_manifest(gpt2_124m["int8"]).quantization["scheme"] == "qgemm"
    cases, bad = probe(gpt2_124m["int8"], threads=(1, 2), lengths=range(1, 34), steps=3)
    assert cases == 2 * 33 * 4 * 2 * 2 and bad == [], bad[:5]
