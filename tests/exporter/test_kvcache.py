"""--kv-cache int8: what onnxruntime does with an int8 cache, the export, its record and its gate."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import damaged_folders
import gpt2onnx
from gpt2onnx.errors import FidelityError
from gpt2onnx import artifact
from gpt2onnx.cli import main
from gpt2onnx.errors import ArtifactError, ExportError
from gpt2onnx.eval.fidelity import windows
from gpt2onnx.exporter import kvcache, policy, quantize
from gpt2onnx.eval import gate
from gpt2onnx.eval.gate import GATE, GATE_WINDOWS, KV_CALIBRATION_TOKENS, kv_calibration_slice

from helpers.paths import WIKI_SLICE

H, D = 2, 8


def _gqa(quantized: bool) -> ort.InferenceSession:
    """One GroupQueryAttention over packed qkv (B,S,3HD) with a shared cache, int8 (static scales) or fp32."""
    ct = TensorProto.INT8 if quantized else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", 3 * H * D]),
              helper.make_tensor_value_info("pk", ct, ["B", H, "P", D]),
              helper.make_tensor_value_info("pv", ct, ["B", H, "P", D]),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    names = ["qkv", "", "", "pk", "pv", "seqlens", "total", "", "", "", ""]
    attrs = {}
    if quantized:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, H, 1, D]) for n in ("ks", "vs")]
        names += ["", "ks", "vs"]
        attrs = dict(k_quant_type=kvcache.QUANT_TYPE, v_quant_type=kvcache.QUANT_TYPE, kv_cache_bit_width=8)
    node = helper.make_node("GroupQueryAttention", names, ["out", "k", "v"], domain="com.microsoft",
                            num_heads=H, kv_num_heads=H, **attrs)
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("out", TensorProto.FLOAT), ("k", ct), ("v", ct))]
    model = helper.make_model(helper.make_graph([node], "g", inputs, outs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_onnxruntime_int8_cache_rounds_saturates_and_attends_to_the_dequantized_cache():
    """The semantics kvcache.py is written for (onnxruntime 1.32 CPU): q = clip(round(x / scale), -128, 127)
    per (head, channel), and the prefill's attention reads q x scale, not the fp32 keys and values."""
    rng = np.random.default_rng(0)
    s, cap = 5, 16
    qkv = rng.standard_normal((1, s, 3 * H * D)).astype(np.float32)
    k = qkv[0, :, H * D:2 * H * D].reshape(s, H, D).transpose(1, 0, 2)  # (H,S,D)
    v = qkv[0, :, 2 * H * D:].reshape(s, H, D).transpose(1, 0, 2)
    scale = (np.abs(k).max(1) / 127 * rng.uniform(0.5, 1.5, (H, D))).astype(np.float32)[None, :, None, :]  # some clip
    feeds = {"qkv": qkv, "seqlens": np.array([s - 1], np.int32), "total": np.array(s, np.int32)}
    out, pk, pv = _gqa(True).run(None, dict(feeds, pk=np.zeros((1, H, cap, D), np.int8),
                                            pv=np.zeros((1, H, cap, D), np.int8), ks=scale, vs=scale))
    expect = np.clip(np.rint(k / scale[0]), -128, 127)
    assert pk.dtype == np.int8 and np.array_equal(pk[0, :, :s], expect)
    assert (np.abs(k / scale[0]) > 128.5).any() and (pk.min() == -128 or pk.max() == 127)  # saturated, not wrapped
    kd, vd = pk[0, :, :s] * scale[0], pv[0, :, :s] * scale[0]
    q = qkv[0, :, :H * D].reshape(s, H, D).transpose(1, 0, 2)

    def attend(k, v):
        w = q @ k.transpose(0, 2, 1) / np.sqrt(D) + np.triu(np.full((s, s), -np.inf), 1)
        w = np.exp(w - w.max(-1, keepdims=True))
        return ((w / w.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(s, H * D)

    assert np.abs(out[0] - attend(kd, vd)).max() < 1e-5
    assert np.abs(out[0] - attend(k, v)).max() > 1e-2


def test_calibration_slice_is_disjoint_from_what_the_gate_scores():
    for n, window in ((6000, 1024), (3000, 64), (2600, 1024)):
        begin, end = kv_calibration_slice(n, window)
        gate_end = list(windows(n, window, window // 2))[:GATE_WINDOWS][-1].end
        assert gate_end <= begin < end <= n and end - begin <= KV_CALIBRATION_TOKENS


def test_int8_kv_export_records_its_cache_and_passes_the_gate(tiny_kv8):
    for precision, folder in tiny_kv8.items():
        m = artifact.verify(folder)
        assert m.precision == precision and m.kv_cache.dtype == "int8" and m.kv_cache.quant_type == "PER_CHANNEL"
        kv = m.raw["kv_cache"]
        assert kv["margin"] == kvcache.MARGIN and kv["calibration"]["tokens"][0] >= 2 * kv["calibration"]["window"]
        fid = m.fidelity
        assert fid["status"] == "passed" and fid["kv_cache"] == "int8" and fid["mean_kl"] <= GATE["mean_kl"]
        par = m.parity[precision if precision != "fp32" else "fp32_kv_int8"]  # the weights precision; kv_cache says the cache
        assert par["top1_agreement"] >= 0.95 and par["mean_kl"] < GATE["mean_kl"]
        assert m.parity["fp32_max_abs_diff"] < 1e-3  # the fp32 graph was checked against PyTorch as always
        assert (m.quantization is None) == (precision == "fp32")
        assert m.tags["kv_cache"] == "int8"
        card = open(os.path.join(folder, "MODEL_CARD.md"), encoding="utf-8").read()
        assert "| KV cache | int8, per-channel static scales" in card
        assert f"## {precision} weights + int8 KV cache fidelity against fp32" in card
        assert "KV cache int8 (PER_CHANNEL)" in artifact.summary(m)
        assert sorted(os.listdir(folder)) == sorted([*m.files, artifact.MANIFEST])  # no leftover fp32 graph


def test_int8_kv_graph_has_int8_past_and_static_scales(tiny_kv8):
    model = onnx.load(os.path.join(tiny_kv8["int8"], "model.onnx"), load_external_data=False)
    g, dims = model.graph, artifact.read_manifest(tiny_kv8["int8"]).dims
    cache = [v for v in list(g.input) + list(g.output) if v.name.startswith(("past_key_values.", "present."))]
    assert cache and all(v.type.tensor_type.elem_type == TensorProto.INT8 for v in cache)
    inits = {i.name: i for i in g.initializer}
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    for node in gqa:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        for name in node.input[12:14]:
            scale = numpy_helper.to_array(inits[name])
            assert scale.shape == (1, dims.n_head, 1, dims.head_dim) and scale.dtype == np.float32 and (scale > 0).all()
    assert len(gqa) == 2 and kvcache.cache_dtype(os.path.join(tiny_kv8["fp32"], "model.onnx")) == "int8"


def test_fp32_kv_export_records_an_fp32_cache(tiny_fp32, tiny_int8_kvfp32):
    for folder in (tiny_fp32, tiny_int8_kvfp32):
        m = artifact.read_manifest(folder)
        assert m.raw["kv_cache"] == {"dtype": "fp32"} and m.kv_cache.numpy_dtype == "float32"
        assert kvcache.cache_dtype(os.path.join(folder, "model.onnx")) == "fp32"


def _copy_with_manifest(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    damaged_folders.edit_manifest(dst, edit)
    return str(dst)


def test_a_manifest_without_kv_cache_reads_as_fp32_and_generates(tiny_int8_kvfp32, tmp_path):
    old = _copy_with_manifest(tiny_int8_kvfp32, tmp_path / "old",  # older folders have no self-hash either
                              lambda m: (m.pop("kv_cache"), m.pop(artifact.SELF_HASH)))
    assert artifact.read_manifest(old).kv_cache == artifact.KVCacheSpec("fp32")
    assert gpt2onnx.load(old).generate("The", max_new_tokens=3, ignore_eos=True)[0].generated_tokens == 3


@pytest.mark.parametrize("kv,message", [({"dtype": "int4"}, "kv_cache dtype 'int4' is not one this gpt2onnx knows"),
                                        ("int8", "kv_cache must be an object with a dtype")])
def test_an_unknown_kv_cache_in_a_manifest_is_one_line(tiny_int8, tmp_path, kv, message):
    bad = _copy_with_manifest(tiny_int8, tmp_path / "bad", lambda m: m.update(kv_cache=kv))
    with pytest.raises(ArtifactError, match=message) as e:
        artifact.read_manifest(bad)
    assert "\n" not in str(e.value) and ("upgrade" in str(e.value) or "re-export" in str(e.value))


def test_a_bad_kv_cache_value_is_one_line(tiny_src, tmp_path, capsys):
    with pytest.raises(ExportError, match="kv_cache must be one of auto, fp32, int8, got 'fp16'; pass --kv-cache") as e:
        gpt2onnx.export(tiny_src, tmp_path / "x", kv_cache="fp16", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    assert main(["export", tiny_src, str(tmp_path / "y"), "--kv-cache", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "argument --kv-cache: invalid choice: 'fp16'" in err and not (tmp_path / "y").exists()


def test_cli_export_with_kv_cache_int8(tiny_src, tmp_path, capsys):
    out = tmp_path / "cli-kv8"
    assert main(["export", tiny_src, str(out), "--kv-cache", "int8", "--quiet"]) == 0
    assert "KV cache int8 (PER_CHANNEL)" in capsys.readouterr().out
    assert artifact.verify(out).kv_cache.dtype == "int8"


def test_eval_fidelity_of_an_int8_kv_folder_against_its_fp32_export(tiny_kv8, tiny_fp32):
    from gpt2onnx.eval import evaluate

    r = evaluate(tiny_kv8["fp32"], "fidelity", data=WIKI_SLICE, reference=tiny_fp32, limit=6, progress=False,
                 threads=1)
    assert r["kv_cache"] == "int8" and r["gate_missed"] == [] and 0 < r["mean_kl"] < GATE["mean_kl"]
    assert r["greedy_prefix_mean"] > 0


def test_auto_is_int8_for_quantized_weights_and_fp32_for_fp32(tiny_int8, tiny_int4, tiny_fp32):
    """The default `--kv-cache auto`: an int8 cache where the weights are quantized (it passed their gate here)."""
    for folder, dtype in ((tiny_int8, "int8"), (tiny_int4, "int8"), (tiny_fp32, "fp32")):
        m = artifact.read_manifest(folder)
        assert m.kv_cache.dtype == dtype and kvcache.cache_dtype(os.path.join(folder, "model.onnx")) == dtype
        if dtype == "int8":
            assert m.raw["fidelity"]["kv_cache"] == "int8" and m.raw["fidelity"]["status"] == "passed"


def test_auto_falls_back_to_an_fp32_cache_when_the_int8_cache_misses(tiny_src, tmp_path, monkeypatch, capsys):
    """`auto` exports the same weights with an fp32 cache, saying so, instead of failing. The tiny model's
    attention barely moves its logits (even saturated scales pass), so the first rung's miss is simulated."""
    real, calls = policy.check, []
    int8_rungs = len(quantize.recipes_to_try(n_embd=32))  # every weight recipe is tried with the int8 cache first

    def check(figures, gate):
        calls.append(1)
        return real(figures, gate) + (["mean_kl (simulated miss of the int8 cache)"] if len(calls) <= int8_rungs
                                      else [])

    monkeypatch.setattr(policy, "check", check)
    m = gpt2onnx.export(tiny_src, tmp_path / "auto", precision="int8", progress=True)
    assert m.kv_cache.dtype == "fp32" and m.fidelity["status"] == "passed"
    tried = m.quantization["tried"]
    assert [t["kv_cache"] for t in tried] == ["int8"] * int8_rungs + ["fp32"] and int8_rungs == 2  # qgemm, block 32
    assert all(t["missed"] for t in tried[:-1]) and not tried[-1]["missed"] and tried[-1]["what"] == tried[0]["what"]
    assert "again with an fp32 KV cache" in capsys.readouterr().err
    assert gpt2onnx.load(str(tmp_path / "auto")).generate("a", max_new_tokens=2)[0].generated_tokens == 2
    calls.clear()
    with pytest.raises(FidelityError, match="--kv-cache fp32"):  # asked for int8 explicitly: no fallback
        gpt2onnx.export(tiny_src, tmp_path / "int8", precision="int8", kv_cache="int8", progress=False)
    assert len(calls) == int8_rungs


def test_a_kv_cache_that_misses_the_gate_is_refused_unless_accepted(tiny_src, tmp_path, monkeypatch):
    """The tiny model's attention barely moves its logits, so a gate of mean KL 0 stands in for a miss."""
    from gpt2onnx.errors import FidelityError

    monkeypatch.setattr(gate, "GATE", {"mean_kl": 0.0})
    with pytest.raises(FidelityError, match="fp32 \\+ int8 KV cache graph misses the fidelity gate.*--kv-cache fp32"):
        gpt2onnx.export(tiny_src, tmp_path / "missed", kv_cache="int8", progress=False)
    assert not (tmp_path / "missed").exists()
    m = gpt2onnx.export(tiny_src, tmp_path / "kept", kv_cache="int8", accept_fidelity_miss=True, progress=False)
    assert m.fidelity["status"].startswith("missed, accepted") and m.kv_cache.dtype == "int8"
