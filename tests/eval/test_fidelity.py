"""gpt2onnx.fidelity: the int8 gate measured on real text, and the outlier hazard."""

from __future__ import annotations

import os

import numpy as np
import pytest
from outliers import inject_outliers

from gpt2onnx.eval import fidelity
from gpt2onnx.eval.fidelity import measure
from gpt2onnx.eval.gate import GATE, check, gate_text

from helpers.paths import WIKI_SLICE


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fp32(tiny_fp32):

    from gpt2onnx.graphio import open_folder

    f = open_folder(tiny_fp32, threads=1)
    ids = np.asarray(f.tokenizer.encode(gate_text()).ids, np.int64)
    return f.session, ids


def test_gate_text_is_the_wikitext2_tail():
    text = gate_text()
    assert len(text.encode("utf-8")) == 30238
    assert text.startswith(" \n = = = Administration = = = \n") and text.endswith("\n")


def test_fp32_against_itself_is_perfect(fp32):
    session, ids = fp32
    f = measure(session, session, ids, window=64, stride=32, limit=40)
    assert f["top1_agreement"] == 1.0 and f["mean_kl"] == 0.0 and f["p99_kl"] == 0.0 and f["ppl_ratio"] == 1.0
    assert f["windows"] == 40 and f["positions"] == 63 + 39 * 32
    assert check(f) == []
    prompts = fidelity.spaced_prompts(ids, count=4, length=16)
    g = fidelity.greedy_agreement(session, session, prompts, new_tokens=12)
    assert g["greedy_identical"] == 1.0 and g["greedy_prefix_mean"] == 12.0


def test_fidelity_task_fp32_folder_vs_itself(tiny_fp32):
    from gpt2onnx.eval import evaluate

    data = WIKI_SLICE
    r = evaluate(tiny_fp32, "fidelity", data=data, reference=tiny_fp32, limit=20, progress=False, threads=1)
    assert r["top1_agreement"] == 1.0 and r["mean_kl"] == 0.0 and r["ppl_ratio"] == 1.0
    assert r["greedy_identical"] == 1.0 and r["gate_missed"] == []


def test_torch_reference_agrees_with_the_export(tiny_torch, fp32):
    session, ids = fp32
    f = measure(fidelity.TorchSession(tiny_torch), session, ids, window=64, stride=32, limit=20)
    assert f["top1_agreement"] == 1.0 and f["mean_kl"] < 1e-9 and f["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    prompts = fidelity.spaced_prompts(ids, count=3, length=10)
    assert fidelity.greedy_agreement(fidelity.TorchSession(tiny_torch), session, prompts,
                                     new_tokens=20)["greedy_identical"] == 1.0


def test_check_thresholds():
    good = {"top1_agreement": GATE["top1_agreement"], "mean_kl": GATE["mean_kl"], "ppl_ratio": GATE["ppl_ratio"]}
    assert check(good) == []
    assert check(dict(good, top1_agreement=0.98)) == ["top1_agreement 0.98 < 0.99"]
    assert check(dict(good, mean_kl=0.02)) == ["mean_kl 0.02 > 0.01"]
    assert len(check(dict(good, ppl_ratio=0.95))) == 1  # much better than the reference is suspect too
    assert len(check({"top1_agreement": float("nan"), "mean_kl": float("nan"), "ppl_ratio": float("nan")})) == 3


def test_gate_fires_on_damaged_int8(tiny_int8, fp32, tmp_path):
    """Corrupt the weight scales of the shipped int8 graph (per column: qgemm): the gate must say so."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.path.join(tiny_int8, "model.onnx"))
    scales = {n.input[3] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert scales
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name in scales:
            a = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((a * rng.uniform(0.3, 1.7, a.shape)).astype(a.dtype), init.name))
    path = str(tmp_path / "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
    session, ids = fp32
    damaged = measure(session, _session(path), ids, window=64, stride=32, limit=20)
    assert check(damaged), damaged
    shipped = measure(session, _session(os.path.join(tiny_int8, "model.onnx")), ids, window=64, stride=32, limit=20)
    assert shipped["mean_kl"] < damaged["mean_kl"] / 10


def test_outlier_injection_keeps_the_fp32_function(tiny_src):
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_src).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    seen = {}
    model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].abs()))
    with torch.no_grad():
        before = model(x).logits
        plain = seen["x"].amax((0, 1))  # (E,) largest |input| of c_attn per channel
        channels = inject_outliers(model, channels=(3, 17), scale=300.0)
        after = model(x).logits
        outl = seen["x"].amax((0, 1))
    assert float((before - after).abs().max()) < 1e-4
    others = np.delete(outl.numpy(), channels)
    assert outl[list(channels)].min() > 50 * np.median(others)  # the injected channels dominate
    assert np.allclose(others, np.delete(plain.numpy(), channels), rtol=1e-5, atol=1e-6)  # the rest unchanged


@pytest.fixture(scope="module")
def sensitive_src(tmp_path_factory) -> str:
    """A tiny GPT-2 whose blocks matter: with the default init (std 0.02) the residual
    stream is nearly all embedding and no quantization error reaches the logits."""
    from helpers.models import save_tiny_gpt2

    return save_tiny_gpt2(str(tmp_path_factory.mktemp("src") / "sensitive"), initializer_range=0.2)


def _int8_figures(src_folder: str, work, recipes: dict, *, outliers: bool, mode: str = "scale",
                  split: bool = False) -> dict:
    """fp32 vs each int8 recipe on the gate text; `split`: keep calibrated outlier channels in fp32."""
    from gpt2onnx import tokenizer
    from gpt2onnx import sources
    from gpt2onnx.exporter import graph
    from gpt2onnx.exporter.quantize import calibrate, outlier_channels, quantize_model

    src = sources.load(src_folder)
    if outliers:
        inject_outliers(src.model, channels=(3, 17), scale=300.0 if mode == "scale" else 100.0, mode=mode)
    fp32_dir = work / "fp32"
    fp32_dir.mkdir(parents=True)
    fp32_path = graph.build(sources.numpy_weights(src.model), graph.Dims.from_config(src.config), str(fp32_dir),
                            untied_lm_head=True)  # as the exporter's int8 path
    ref = _session(fp32_path)
    ids = np.asarray(tokenizer.from_files(src_folder).encode(gate_text()).ids)
    found = outlier_channels(calibrate(src.model, ids[:512], window=64)) if split else None
    out = {"outlier_channels": found}
    for name, recipe in recipes.items():
        (work / name).mkdir()
        q = _session(quantize_model(fp32_path, str(work / name), recipe, found))
        out[name] = measure(ref, q, ids, window=64, stride=32, limit=40)
    return out


def test_outliers_make_the_shipped_int8_recipe_miss_the_gate(sensitive_src, tmp_path):
    """The hazard, reproduced: the same fp32 function passes without outlier channels
    and misses the gate with them when activations are quantized to int8 per block
    (accuracy_level=4); float activations (accuracy_level=0, weight-only) do far better.
    Random weights make perplexity meaningless (ppl ~1e17), so only agreement and KL
    are gated here."""
    from gpt2onnx.exporter.quantize import INT8, Int8Recipe

    gate = {k: GATE[k] for k in ("top1_agreement", "mean_kl")}
    plain = _int8_figures(sensitive_src, tmp_path / "plain", {"shipped": INT8}, outliers=False)
    assert check(plain["shipped"], gate) == [], plain
    hit = _int8_figures(sensitive_src, tmp_path / "outliers",
                        {"shipped": INT8, "weight_only": Int8Recipe(accuracy_level=0)}, outliers=True)
    assert check(hit["shipped"], gate), hit
    assert hit["weight_only"]["mean_kl"] < hit["shipped"]["mean_kl"] / 4, hit


@pytest.mark.parametrize("mode", ["scale", "shift"])
def test_calibrated_outlier_split_passes_the_gate(sensitive_src, tmp_path, mode):
    """The shipped fix: calibration finds exactly the injected channels in every c_attn /
    c_fc input, and keeping them in fp32 (LLM.int8()-style split) brings the shipped
    recipe back to its no-outlier fidelity, for both kinds of injected outliers."""
    from gpt2onnx.exporter.quantize import INT8

    gate = {k: GATE[k] for k in ("top1_agreement", "mean_kl")}
    hit = _int8_figures(sensitive_src, tmp_path / mode, {"shipped": INT8}, outliers=True, mode=mode, split=True)
    assert hit["outlier_channels"] == {f"h.{i}.{m}.weight": [3, 17] for i in range(2)
                                       for m in ("attn.c_attn", "mlp.c_fc")}
    assert check(hit["shipped"], gate) == [], hit
    assert hit["shipped"]["mean_kl"] < 1e-3, hit


def test_outlier_split_is_exact_in_fp32(tiny_src, tmp_path):
    """split_outliers rewrites MatMuls without changing what the fp32 graph computes."""
    import onnx

    from gpt2onnx import sources
    from gpt2onnx.exporter import graph
    from gpt2onnx.exporter.quantize import split_outliers

    src = sources.load(tiny_src)
    dims = graph.Dims.from_config(src.config)
    path = graph.build(sources.numpy_weights(src.model), dims, str(tmp_path), untied_lm_head=True)
    model = onnx.load(path)
    names = split_outliers(model, {"h.0.attn.c_attn.weight": [1, 5], "lm_head.weight_t": [0]})
    assert names == ["h.0.qkv_matmul/outlier_matmul", "lm_head/outlier_matmul"]
    split_path = str(tmp_path / "split.onnx")
    onnx.save_model(model, split_path, save_as_external_data=True, location="split.onnx.data")
    ids = np.arange(1, 30)
    a = fidelity.logits_at_end(_session(path), ids, len(ids))
    b = fidelity.logits_at_end(_session(split_path), ids, len(ids))
    np.testing.assert_allclose(a, b, atol=1e-5)


# -- one gate, one verdict: eval --task fidelity judges as the exporter did ----------------

def test_eval_does_not_miss_a_random_weight_int8_the_exporter_passed(tiny_src, tmp_path, capsys):
    """The exporter gated this model on mean_kl alone (random weights: its argmax is noise);
    eval must apply that same gate, and say so, instead of the full gate's top-1."""
    import gpt2onnx
    from gpt2onnx.cli import main
    from gpt2onnx.eval import evaluate, format_result
    from gpt2onnx.exporter import policy

    out = str(tmp_path / "rnd-int8")
    m = gpt2onnx.export(tiny_src, out, precision="int8", random_weights=True, seed=3, progress=False)
    assert m.fidelity["status"] == "passed" and m.fidelity["gated"] == "random weights: mean_kl only"
    data = os.path.join(os.path.dirname(policy.__file__), "..", "data", "gate_text.txt")
    r = evaluate(out, "fidelity", data=data, limit=8, progress=False, threads=1)  # reference: the recorded source
    assert r["gate_missed"] == [] and r["gated"] == "random weights: mean_kl only" and r["gate"] == {"mean_kl": 0.01}
    line = next(ln for ln in format_result(r).splitlines() if ln.startswith("int8 gate"))
    assert line == "int8 gate  passed (the exporter's gate, random weights: mean_kl only: mean_kl <= 0.01)"
    assert main(["eval", out, "--task", "fidelity", "--data", data, "--limit", "8", "--threads", "1", "--quiet"]) == 0
    assert "MISSED" not in capsys.readouterr().out


def test_a_reference_of_another_model_is_refused_in_one_line(tiny_int8, tmp_path, capsys):
    """A distilgpt2-like reference (fewer layers) for a gpt2-like model, as a folder and as a source."""
    import gpt2onnx
    from helpers.models import save_tiny_gpt2
    from gpt2onnx.cli import main
    from gpt2onnx.errors import InvalidRequestError
    from gpt2onnx.eval import evaluate

    data = WIKI_SLICE
    distil_src = save_tiny_gpt2(str(tmp_path / "distil"), n_layer=1)
    distil = str(tmp_path / "distil-fp32")
    gpt2onnx.export(distil_src, distil, progress=False)
    for ref in (distil, distil_src):
        with pytest.raises(InvalidRequestError, match=r"is another model than .* \(n_layer 1 vs 2, reference vs model\)"):
            evaluate(tiny_int8, "fidelity", data=data, reference=ref, limit=2, progress=False, threads=1)
    wide = save_tiny_gpt2(str(tmp_path / "wide"), n_embd=48, vocab_size=1200, tokenizer=False)
    with pytest.raises(InvalidRequestError, match=r"n_embd 48 vs 32, vocab_size 1200 vs 1000"):
        evaluate(tiny_int8, "fidelity", data=data, reference=wide, limit=2, progress=False, threads=1)
    assert main(["eval", tiny_int8, "--task", "fidelity", "--data", data, "--reference", distil, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpt2onnx: error: the fidelity reference")
