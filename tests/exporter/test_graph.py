"""exporter/graph: the decoder graph built straight from weights, run with onnxruntime, no PyTorch.

Parity with transformers is checked by every export (tests/exporter/test_pipeline.py); here
the graph itself: its I/O is the model folder's contract, the fused onnxruntime ops are
there, `logits_to_keep` is optional with Hugging Face's default, the KV cache and the mask
give the logits of a plain run, odd dims give the right shapes, and config checks.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from gpt2onnx import artifact
from gpt2onnx.errors import UnsupportedModelError
from gpt2onnx.exporter import graph
from gpt2onnx.exporter.policy import cpu_session

from helpers.models import ODD, TINY


def gpt2_config(**fields) -> SimpleNamespace:
    """What `Dims.from_config` reads of a `transformers.GPT2Config`, with GPT-2's defaults."""
    return SimpleNamespace(**{"n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                              **TINY, **fields})


def random_weights(d: graph.Dims, seed: int = 0) -> dict:
    """Hugging Face GPT-2 parameter names (without ``transformer.``) -> float32, LM head tied to wte."""
    rng = np.random.default_rng(seed)
    E, I = d.n_embd, d.n_inner

    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"wte.weight": r(d.vocab_size, E, scale=0.5), "wpe.weight": r(d.n_positions, E),
         "ln_f.weight": 1 + r(E), "ln_f.bias": r(E)}
    for i in range(d.n_layer):
        p = f"h.{i}."
        w.update({p + "ln_1.weight": 1 + r(E), p + "ln_1.bias": r(E),
                  p + "attn.c_attn.weight": r(E, 3 * E), p + "attn.c_attn.bias": r(3 * E),  # Conv1D: (in, out)
                  p + "attn.c_proj.weight": r(E, E), p + "attn.c_proj.bias": r(E),
                  p + "ln_2.weight": 1 + r(E), p + "ln_2.bias": r(E),
                  p + "mlp.c_fc.weight": r(E, I), p + "mlp.c_fc.bias": r(I),
                  p + "mlp.c_proj.weight": r(I, E), p + "mlp.c_proj.bias": r(E)})
    w["lm_head.weight"] = w["wte.weight"]
    return w


def build(folder, *, untied_lm_head: bool = False, **fields) -> tuple[graph.Dims, str]:
    d = graph.Dims.from_config(gpt2_config(**fields))
    os.makedirs(folder)
    return d, graph.build(random_weights(d), d, str(folder), untied_lm_head=untied_lm_head)


def feeds(d: graph.Dims, ids, *, mask=None, positions=None, past=None, keep=None) -> dict:
    """Inputs of one run: `ids` (B,S); `past` (present outputs of an earlier run) or an empty cache."""
    ids = np.asarray(ids, np.int64)
    b, s = ids.shape
    p = 0 if past is None else past[0].shape[2]
    out = {"input_ids": ids,
           "attention_mask": np.ones((b, p + s), np.int64) if mask is None else np.asarray(mask, np.int64),
           "position_ids": np.tile(np.arange(p, p + s), (b, 1)) if positions is None else np.asarray(positions)}
    for i in range(d.n_layer):
        for j, kv in enumerate(("key", "value")):
            empty = np.zeros((b, d.n_head, 0, d.head_dim), np.float32)
            out[f"past_key_values.{i}.{kv}"] = empty if past is None else past[2 * i + j]
    if keep is not None:
        out["logits_to_keep"] = np.array(keep, np.int64)
    return out


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    d, path = build(tmp_path_factory.mktemp("graph") / "tiny")
    return d, path, cpu_session(path)


def test_io_names_are_the_model_folders_contract(tiny_fp32, tiny_int8):
    """The graph's inputs and outputs, in order, are the manifest's io names (HF / Optimum names)."""
    for folder in (tiny_fp32, tiny_int8):
        m = artifact.read_manifest(folder)
        g = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
        names = graph.io_names(m.dims.n_layer)
        assert [i.name for i in g.input] == list(m.inputs) == names["inputs"]
        assert [o.name for o in g.output] == list(m.outputs) == names["outputs"]
    assert names["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names["inputs"][3:] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                                   "past_key_values.1.value", "logits_to_keep"]
    assert names["outputs"] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]


@pytest.mark.parametrize("activation,gelu", [("gelu_new", "FastGelu"), ("gelu_pytorch_tanh", "FastGelu"),
                                             ("gelu", "BiasGelu")])
def test_fused_onnxruntime_ops_one_set_per_layer(tmp_path, activation, gelu):
    d, path = build(tmp_path / "g", n_layer=3, activation_function=activation)
    model = onnx.load(path, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 3 and ops.count(gelu) == 3
    assert ops.count("LayerNormalization") == 2 * 3 + 1  # ln_1, ln_2 per layer, ln_f
    assert not {"Softmax", "Tanh", "Erf", "Pow"} & set(ops)  # no unfused attention or gelu left
    assert {n.domain for n in model.graph.node if n.op_type in ("GroupQueryAttention", gelu)} == {"com.microsoft"}
    assert {o.domain: o.version for o in model.opset_import} == {"": graph.OPSET, "com.microsoft": graph.MS_OPSET}
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["num_heads"] == attrs["kv_num_heads"] == d.n_head
    assert attrs["scale"] == pytest.approx(1 / np.sqrt(d.head_dim))


def test_weights_are_external_and_64_byte_aligned(tiny_graph):
    _, path, _ = tiny_graph
    model = onnx.load(path, load_external_data=False)
    data = os.path.join(os.path.dirname(path), graph.EXTERNAL_DATA)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in external} >= {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "ln_f.bias"}
    end = 0
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == graph.EXTERNAL_DATA and int(info["offset"]) % 64 == 0, (t.name, info)
        end = max(end, int(info["offset"]) + int(info["length"]))
    assert end == os.path.getsize(data)


def test_logits_to_keep_defaults_to_every_position(tiny_graph):
    """Hugging Face's meaning when it is not fed (Optimum never feeds it); k keeps the last min(k, S)."""
    d, path, sess = tiny_graph
    model = onnx.load(path, load_external_data=False)
    default = next(t for t in model.graph.initializer if t.name == "logits_to_keep")
    assert onnx.numpy_helper.to_array(default) == graph.LOGITS_TO_KEEP_DEFAULT == 0
    ids = [[5, 17, 300, 2, 999], [1, 2, 3, 4, 5]]
    full = sess.run(["logits"], feeds(d, ids))[0]
    assert full.shape == (2, 5, d.vocab_size)
    for k, kept in [(0, 5), (1, 1), (3, 3), (5, 5), (9, 5)]:
        logits = sess.run(["logits"], feeds(d, ids, keep=k))[0]
        assert logits.shape == (2, kept, d.vocab_size), k
        np.testing.assert_allclose(logits, full[:, 5 - kept:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [TINY, ODD], ids=["tiny", "odd"])
def test_cache_and_shapes_step_by_step_equal_one_plain_run(tmp_path, dims):
    """Prefill 5 tokens, then decode 3 one at a time with the cache: the logits of a plain 8-token run.
    ODD has 3 heads, 48 dims and a vocabulary of 997 (not a multiple of 8): no size is hard-coded."""
    d, path = build(tmp_path / "g", **dims)
    sess = cpu_session(path)
    ids = np.random.default_rng(1).integers(0, d.vocab_size, (2, 8))
    plain = sess.run(["logits"], feeds(d, ids))[0]  # (B, 8, V)
    out = sess.run(None, feeds(d, ids[:, :5]))
    logits, past = out[0], out[1:]
    assert logits.shape == (2, 5, d.vocab_size)
    assert [p.shape for p in past] == [(2, d.n_head, 5, d.head_dim)] * 2 * d.n_layer
    np.testing.assert_allclose(logits, plain[:, :5], rtol=1e-4, atol=1e-4)
    for t in range(5, 8):
        out = sess.run(None, feeds(d, ids[:, t:t + 1], past=past))
        logits, past = out[0], out[1:]
        assert logits.shape == (2, 1, d.vocab_size)
        assert past[0].shape == (2, d.n_head, t + 1, d.head_dim)
        np.testing.assert_allclose(logits[:, 0], plain[:, t], rtol=1e-4, atol=1e-4)


def test_left_padding_is_masked(tiny_graph):
    """A left-padded row (mask 0 0 1 1 1, positions from its first token) predicts what it predicts alone."""
    d, _, sess = tiny_graph
    alone = sess.run(["logits"], feeds(d, [[7, 8, 9]]))[0]
    padded = sess.run(["logits"], feeds(d, [[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]], mask=[[0, 0, 1, 1, 1], [1] * 5],
                                        positions=[[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))[0]
    np.testing.assert_allclose(padded[0, 2:], alone[0], rtol=1e-4, atol=1e-4)


def test_untied_lm_head_is_a_matmul_with_the_same_logits(tmp_path, tiny_graph):
    """The int8 recipe needs the LM head as its own (E, V) MatMul; the tied graph shares wte through a Gemm."""
    d, tied_path, tied = tiny_graph
    _, path = build(tmp_path / "untied", untied_lm_head=True)
    untied, tied_model = onnx.load(path, load_external_data=False), onnx.load(tied_path, load_external_data=False)
    head = next(n for n in untied.graph.node if n.name == "lm_head")
    assert head.op_type == "MatMul" and head.input[1] == "lm_head.weight_t"
    tied_head = next(n for n in tied_model.graph.node if n.name == "lm_head")
    assert tied_head.op_type == "Gemm" and tied_head.input[1] == "wte.weight"
    assert "lm_head.weight" not in {t.name for t in tied_model.graph.initializer}  # shared, not stored twice
    f = feeds(d, [[3, 1, 4, 1, 5]])
    np.testing.assert_allclose(cpu_session(path).run(["logits"], f)[0], tied.run(["logits"], f)[0],
                               rtol=1e-5, atol=1e-5)


def test_dims_from_config():
    d = graph.Dims.from_config(gpt2_config(n_layer=3, scale_attn_by_inverse_layer_idx=True))
    assert d.head_dim == 16 and d.n_inner == 4 * 32 and d.activation == "gelu_new"
    assert d.attn_scales == pytest.approx([1 / 4, 1 / 8, 1 / 12])  # 1/sqrt(16) / (layer + 1)
    assert graph.Dims.from_config(gpt2_config(scale_attn_weights=False)).attn_scales == (1.0, 1.0)
    assert graph.Dims.from_config(gpt2_config(n_inner=40)).n_inner == 40
    assert d.to_json() == {"n_layer": 3, "n_head": 2, "n_embd": 32, "head_dim": 16, "vocab_size": 1000,
                           "n_positions": 64, "n_inner": 128}
    with pytest.raises(UnsupportedModelError, match="activation_function 'relu' is not supported; .*gelu_new"):
        graph.Dims.from_config(gpt2_config(activation_function="relu"))
