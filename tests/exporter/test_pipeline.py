"""Exporter: parity, the model folder contract, atomic output and every user error."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from outliers import inject_outliers

import gpt2onnx
from gpt2onnx import artifact
from gpt2onnx.cli import main
from gpt2onnx.errors import ExportError, ParityError, UnsupportedModelError

from helpers.models import save_tiny_gpt2


def _ops(folder):
    return [n.op_type for n in onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph.node]


def test_fp32_folder_contract(tiny_fp32):
    m = artifact.verify(tiny_fp32).to_dict()
    assert m["precision"] == "fp32" and m["quantization"] is None
    assert m["parity"]["fp32_max_abs_diff"] <= 1e-3
    assert m["parity"]["fp32_top1_agreement"] == 1.0
    assert m["dims"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "head_dim": 16, "vocab_size": 1000,
                         "n_positions": 64, "n_inner": 128}
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json", "MODEL_CARD.md"}
    for name, info in m["files"].items():
        assert os.path.getsize(os.path.join(tiny_fp32, name)) == info["bytes"]
        assert len(info["sha256"]) == 64
    assert m["io"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in m["io"]["inputs"] and "present.1.value" in m["io"]["outputs"]
    assert m["source"]["random_weights"] is False and m["source"]["kind"] == "local"
    assert {"onnxruntime", "torch", "transformers", "gpt2onnx"} <= set(m["tools"])
    ops = _ops(tiny_fp32)
    assert ops.count("GroupQueryAttention") == 2 and ops.count("LayerNormalization") == 5
    assert ops.count("FastGelu") == 2
    card = open(os.path.join(tiny_fp32, "MODEL_CARD.md"), encoding="utf-8").read()
    assert "Intended uses and limitations" in card and "2 vCPU, 0 GPU, 8 GiB memory, 28 GiB disk" in card
    assert "RANDOM WEIGHTS" not in card


def test_graph_reproduces_torch_with_padding_and_cache(tiny_fp32, tiny_torch):
    """Independent of the exporter's own check: right padding, prefill, 3 cached steps.

    The graph's cache is contiguous per row: the mask only gives each row's length, and
    a row's new token goes at its own position (HF puts it after the padding instead).
    """
    import onnxruntime as ort
    import torch

    s = ort.InferenceSession(os.path.join(tiny_fp32, "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 1000, (2, 6))
    lengths = np.array([6, 2])
    mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int64)  # right padding
    pos = np.tile(np.arange(6), (2, 1))
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits_to_keep": np.array(0)}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((2, 2, 0, 16), np.float32)
    logits, *past = s.run(None, feeds)
    with torch.no_grad():
        ref = tiny_torch(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    np.testing.assert_allclose(logits[mask == 1], ref.logits.numpy()[mask == 1], atol=1e-4)
    # logits_to_keep = 1: only the last position
    last, *_ = s.run(None, dict(feeds, logits_to_keep=np.array(1)))
    assert last.shape == (2, 1, 1000)
    np.testing.assert_allclose(last[:, 0], logits[:, -1], atol=1e-5)
    pkv, torch_mask = ref.past_key_values, mask
    nxt = logits[np.arange(2), lengths - 1].argmax(-1)[:, None]
    for _ in range(3):
        pos = lengths[:, None]
        lengths = lengths + 1
        mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
        torch_mask = np.concatenate([torch_mask, np.ones((2, 1), np.int64)], 1)
        feeds = {"input_ids": nxt, "attention_mask": mask, "position_ids": pos, "logits_to_keep": np.array(1)}
        for i in range(2):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        logits, *past = s.run(None, feeds)
        with torch.no_grad():
            ref = tiny_torch(torch.tensor(nxt), attention_mask=torch.tensor(torch_mask), position_ids=torch.tensor(pos),
                             past_key_values=pkv, use_cache=True)
        pkv = ref.past_key_values
        np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4)
        assert past[0].shape == (2, 2, lengths.max(), 16)
        nxt = logits[:, -1].argmax(-1)[:, None]


def test_int8_folder(tiny_int8):
    m = artifact.verify(tiny_int8).to_dict()
    assert m["precision"] == "int8"
    q = m["quantization"]
    assert q["scheme"] == "qgemm" and q["bits"] == 8 and q["lm_head"] == "int8"
    p = m["parity"]
    assert p["fp32_max_abs_diff"] <= 1e-3  # the graph before quantization
    assert 0.5 <= p["int8"]["top1_agreement"] <= 1.0 and 0.0 <= p["int8"]["mean_kl"] < 0.5
    ops = _ops(tiny_int8)
    assert "MatMul" not in ops and "Gemm" not in ops  # every weight matmul quantized, LM head included
    assert ops.count("MatMulIntegerToFloat") == 2 * 4 + 1 and "MatMulNBits" not in ops
    assert not os.path.exists(os.path.join(tiny_int8, "fp32"))


def test_odd_shapes_export(odd_src, tmp_path):
    for precision in ("fp32", "int8"):
        m = gpt2onnx.export(odd_src, str(tmp_path / precision), precision=precision, progress=False)
        assert m.dims.n_head == 3 and m.dims.vocab_size == 997
        assert m.parity["fp32_max_abs_diff"] <= 1e-3


def test_bin_weights_and_random_weights(tmp_path):
    src = save_tiny_gpt2(str(tmp_path / "bin"), safe=False, seed=3)
    assert os.path.exists(os.path.join(src, "pytorch_model.bin"))
    m = gpt2onnx.export(src, str(tmp_path / "o1"), progress=False)
    assert m.parity["fp32_max_abs_diff"] <= 1e-3
    with open(tmp_path / "o1" / artifact.MANIFEST, encoding="utf-8") as f:  # typed, and what the folder holds
        assert isinstance(m, artifact.Manifest) and m == artifact.read_manifest(str(tmp_path / "o1"))
        assert m.to_dict() == json.load(f)
    r = gpt2onnx.export(src, str(tmp_path / "o2"), random_weights=True, seed=7, progress=False)
    assert r.source.random_weights is True and r.source.seed == 7 and r.tags["weights"] == "random"
    assert "RANDOM WEIGHTS" in open(tmp_path / "o2" / "MODEL_CARD.md", encoding="utf-8").read()
    assert "RANDOM WEIGHTS" in artifact.summary(artifact.read_manifest(str(tmp_path / "o2")))
    # random weights really differ from the saved ones
    assert r.files["model.onnx.data"]["sha256"] != m.files["model.onnx.data"]["sha256"]


def test_existing_outdir_refused_then_force(tiny_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="exists; pass --force"):
        gpt2onnx.export(tiny_src, str(out), progress=False)
    assert (out / "keep.txt").exists()
    gpt2onnx.export(tiny_src, str(out), force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "gpt2onnx.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_leaves_nothing(tiny_src, tmp_path, monkeypatch, exc):
    import gpt2onnx.exporter.quantize as q

    def boom(*a, **k):
        raise exc("stop")

    monkeypatch.setattr(q, "quantize_model", boom)
    with pytest.raises(exc):
        gpt2onnx.export(tiny_src, str(tmp_path / "out"), precision="int8", progress=False)
    assert os.listdir(tmp_path) == []


def test_parity_failure_is_an_error(tiny_src, tmp_path, monkeypatch):
    import gpt2onnx.sources as sources

    real = sources.numpy_weights

    def damaged(model):
        w = dict(real(model))
        w["h.1.mlp.c_fc.weight"] = w["h.1.mlp.c_fc.weight"] * 1.5
        return w

    monkeypatch.setattr(sources, "numpy_weights", damaged)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        gpt2onnx.export(tiny_src, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == []


def test_source_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        gpt2onnx.export(str(tmp_path / "nope"), str(tmp_path / "o"), progress=False)
    with pytest.raises(UnsupportedModelError, match="unknown source 'llama-7b'"):
        gpt2onnx.export("llama-7b", str(tmp_path / "o"), progress=False)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(UnsupportedModelError, match="bert model, not GPT-2"):
        gpt2onnx.export(str(bert), str(tmp_path / "o"), progress=False)
    (bert / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        gpt2onnx.export(str(bert), str(tmp_path / "o"), progress=False)
    noweights = tmp_path / "nw"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(UnsupportedModelError, match="no weights"):
        gpt2onnx.export(str(noweights), str(tmp_path / "o"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bert", "nw"]


def test_tokenizer_errors(tmp_path, tiny_src):
    src = save_tiny_gpt2(str(tmp_path / "notok"), tokenizer=False)
    with pytest.raises(UnsupportedModelError, match="no tokenizer.*--tokenizer DIR"):
        gpt2onnx.export(src, str(tmp_path / "o"), progress=False)
    with pytest.raises(UnsupportedModelError, match="tokenizer folder .* does not exist"):
        gpt2onnx.export(src, str(tmp_path / "o"), tokenizer=str(tmp_path / "missing"), progress=False)
    # GPT-2's real 50257-token vocabulary does not fit a 1000-token model
    data = os.path.join(os.path.dirname(gpt2onnx.__file__), "data")
    with pytest.raises(UnsupportedModelError, match="50257 tokens but the model only 1000"):
        gpt2onnx.export(src, str(tmp_path / "o"), tokenizer=data, progress=False)
    m = gpt2onnx.export(src, str(tmp_path / "o"), tokenizer=tiny_src, progress=False)
    assert m.files["tokenizer.json"]["bytes"] > 0


def test_output_errors(tiny_src, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ExportError, match="choose a writable output path"):
        gpt2onnx.export(tiny_src, str(f / "sub" / "out"), progress=False)
    with pytest.raises(ExportError, match="not a folder"):
        gpt2onnx.export(tiny_src, str(f), force=True, progress=False)
    with pytest.raises(ExportError, match="precision must be one of fp32, int8, int4"):
        gpt2onnx.export(tiny_src, str(tmp_path / "o"), precision="int2", progress=False)


def test_cli_export_and_inspect(tiny_src, tmp_path, capsys):
    out = str(tmp_path / "m")
    assert main(["export", tiny_src, out, "--precision", "int8", "--quiet"]) == 0
    assert "precision  int8" in capsys.readouterr().out
    assert main(["inspect", out]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert main(["export", tiny_src, out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --force" in err and "Traceback" not in err
    assert main(["export", tiny_src, out, "--precision", "int3"]) == 2
    # a flipped byte in the weights is caught by inspect
    data = os.path.join(out, "model.onnx.data")
    with open(data, "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert main(["inspect", out]) == 1
    assert "does not match its sha256" in capsys.readouterr().err
    assert main(["inspect", out, "--no-hash"]) == 0
    assert main(["inspect", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_int8_fidelity_is_recorded(tiny_int8):
    from gpt2onnx.artifact import read_manifest

    m = read_manifest(tiny_int8).to_dict()
    f = m["fidelity"]
    assert f["status"] == "passed" and f["missed"] == [] and f["positions"] > 100
    assert f["mean_kl"] <= f["gate"]["mean_kl"]
    assert m["quantization"]["outlier_channels"] == {}  # a random model has none: no extra nodes
    card = open(os.path.join(tiny_int8, "MODEL_CARD.md"), encoding="utf-8").read()
    assert "int8 weights + int8 KV cache fidelity against fp32" in card and "MISSED" not in card


def test_fidelity_gate_refuses_an_int8_export_that_misses_it(tmp_path, monkeypatch):
    """A model with outlier channels: the shipped recipe (calibrated fp32 split) passes;
    with the split turned off the gate fires, and --accept-fidelity-miss keeps it, marked."""
    import dataclasses

    import gpt2onnx
    from helpers.models import save_tiny_gpt2
    from gpt2onnx import sources
    from gpt2onnx.exporter import quantize
    from gpt2onnx.artifact import read_manifest
    from gpt2onnx.errors import FidelityError

    src_dir = save_tiny_gpt2(str(tmp_path / "src"), initializer_range=0.2)
    src = sources.load(src_dir)
    inject_outliers(src.model, channels=(3, 17), scale=300.0)
    src.model.save_pretrained(src_dir)
    m = gpt2onnx.export(src_dir, str(tmp_path / "ok"), precision="int8", progress=False)
    assert m.fidelity["status"] == "passed" and len(m.quantization["outlier_channels"]) == 4
    assert [t["what"] for t in m.quantization["tried"]] == ["qgemm (7-bit weights)"]

    monkeypatch.setattr(quantize, "INT8", dataclasses.replace(quantize.INT8, outlier_ratio=float("inf")))
    with pytest.raises(FidelityError, match="misses the fidelity gate.*mean_kl.*--accept-fidelity-miss"):
        gpt2onnx.export(src_dir, str(tmp_path / "bad"), precision="int8", progress=False)
    assert not (tmp_path / "bad").exists() and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    m = gpt2onnx.export(src_dir, str(tmp_path / "kept"), precision="int8", progress=False, accept_fidelity_miss=True)
    assert m.fidelity["missed"] and m.fidelity["status"].startswith("missed")
    # --kv-cache auto: qgemm, then MatMulNBits (block 128 fitted to n_embd 32), with the int8 cache, then again
    # with an fp32 cache; all missed, the last kept
    assert [(t["what"], t["kv_cache"]) for t in m.quantization["tried"]] == [
        ("qgemm (7-bit weights)", "int8"), ("block 32", "int8"), ("qgemm (7-bit weights)", "fp32"), ("block 32", "fp32")]
    assert all(t["missed"] for t in m.quantization["tried"]) and m.kv_cache.dtype == "fp32"
    assert gpt2onnx.load(str(tmp_path / "kept")).generate("a", max_new_tokens=2)[0].generated_tokens == 2
    assert read_manifest(str(tmp_path / "kept")).to_dict()["fidelity"]["missed"]
    assert "WARNING: this int8 export MISSED the gate" in (tmp_path / "kept" / "MODEL_CARD.md").read_text()


def test_a_fidelity_miss_retries_with_matmulnbits_then_the_finer_block(tmp_path, monkeypatch):
    """n_embd 64: qgemm first; when it misses, MatMulNBits block 64, then block 32, each written over (not
    appended to) the one before."""
    import gpt2onnx
    from helpers.models import save_tiny_gpt2
    from gpt2onnx.exporter import policy

    src_dir = save_tiny_gpt2(str(tmp_path / "src"), n_embd=64, n_head=2)
    first = []
    real_check = policy.check

    def check_missing_the_first(figures, gate=None):  # the first two measurements miss, the third passes
        first.append(figures)
        return ["top1_agreement 0 < 0.99 (forced)"] if len(first) <= 2 else real_check(figures, gate)

    monkeypatch.setattr(policy, "check", check_missing_the_first)
    m = gpt2onnx.export(src_dir, str(tmp_path / "m"), precision="int8", progress=False)
    assert [(t["what"], bool(t["missed"])) for t in m.quantization["tried"]] == [
        ("qgemm (7-bit weights)", True), ("block 64", True), ("block 32", False)]
    q = m.quantization
    assert (q["scheme"], q["block_size"]) == ("MatMulNBits", 32) and m.fidelity["status"] == "passed"
    assert m.opset == 17  # the qgemm graph's opset 21 did not stick
    monkeypatch.setattr(policy, "check", real_check)
    once = gpt2onnx.export(src_dir, str(tmp_path / "once"), precision="int8", progress=False).quantization["tried"]
    assert [t["what"] for t in once] == ["qgemm (7-bit weights)"]
    data = {d: os.path.getsize(tmp_path / d / "model.onnx.data") for d in ("m", "once")}
    assert data["m"] < 1.5 * data["once"], data  # the retry rewrote the data file, did not append to it
    assert gpt2onnx.load(str(tmp_path / "m")).generate("a", max_new_tokens=2)[0].generated_tokens == 2
