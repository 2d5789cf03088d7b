"""int4: the export, its own gate, the one token table, and the tools that read its folder."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import gpt2onnx
from gpt2onnx import cli
from gpt2onnx.artifact import read_manifest, verify
from gpt2onnx.errors import FidelityError
from gpt2onnx.exporter import policy
from gpt2onnx.eval.gate import DECISIVE_MARGIN, GATE, GATE_INT4, check, gate_for, gate_text


def _graph(folder: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)


def test_tiny_int4_export_passes_parity_and_its_gate_and_generates(tiny_int4, tiny_int8):
    m = read_manifest(tiny_int4).to_dict()
    q = m["quantization"]
    assert m["precision"] == "int4" and q["bits"] == 4 and q["scheme"] == "MatMulNBits"
    assert q["algorithm"] == "rtn" and q["lm_head"] == q["embedding"] and q["shared_table"]
    assert m["parity"]["int4"]["top1_agreement"] > 0.95 and m["parity"]["int4"]["mean_kl"] < GATE_INT4["mean_kl"]
    fid = m["fidelity"]
    assert fid["status"] == "passed" and fid["missed"] == [] and fid["decisive_margin"] == DECISIVE_MARGIN
    assert set(fid["gate"]) <= set(GATE_INT4) and fid["gate"]["mean_kl"] == GATE_INT4["mean_kl"]
    nodes = _graph(tiny_int4).graph.node
    bits = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    table_bits = int(q["lm_head"].removeprefix("int"))
    assert bits == {4, table_bits}  # transformer MatMuls at 4 bits, the LM head (the token table) at its own
    head = next(n for n in nodes if n.name == "lm_head")
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == table_bits
    assert [t["lm_head"] for t in q["tried"]] == ["int4"]  # the 4-bit table passed: the ladder stopped there
    sizes = {p: os.path.getsize(os.path.join(p, "model.onnx.data")) for p in (tiny_int4, tiny_int8)}
    assert sizes[tiny_int4] < sizes[tiny_int8]
    gen = gpt2onnx.load(tiny_int4)
    r = gen.generate("The history of", max_new_tokens=6, ignore_eos=True)[0]
    assert r.generated_tokens == 6 and r.text
    card = open(os.path.join(tiny_int4, "MODEL_CARD.md"), encoding="utf-8").read()
    assert "## int4 weights + int8 KV cache fidelity against fp32" in card  # the default cache for int4: int8
    assert "4-bit" in card and "one token table for both" in card


@pytest.mark.parametrize("precision", ["int4"])  # int8 (qgemm): tests/exporter/test_quantize.py
def test_one_token_table_serves_embedding_and_lm_head(tiny_int4, precision):
    """GPT-2 ties wte and the LM head: the folder stores the quantized table once and both nodes read it."""
    folder = tiny_int4
    model = _graph(folder)
    g = model.graph
    users = {n.op_type: n for n in g.node if "wte.weight_q" in n.input}
    assert set(users) == {"GatherBlockQuantized", "MatMulNBits"} and users["MatMulNBits"].name == "lm_head"
    names = [i.name for i in g.initializer]
    assert not [n for n in names if n.startswith("lm_head.weight")] and names.count("wte.weight_q") == 1
    m = read_manifest(folder).to_dict()
    v, e = m["dims"]["vocab_size"], m["dims"]["n_embd"]
    table = next(i for i in g.initializer if i.name == "wte.weight_q")
    bits = int(m["quantization"]["lm_head"].removeprefix("int"))
    assert list(table.dims)[0] == v and np.prod(table.dims) == v * e * bits // 8
    # The data file holds the table's bytes once: no other tensor of (V, E) weights at any bit width.
    lengths = [int(d.value) for i in g.initializer for d in i.external_data if d.key == "length"]
    assert sum(n >= v * e * bits // 8 for n in lengths) == 1, sorted(lengths)[-3:]


def test_shared_table_gives_the_same_logits_as_a_private_copy(tiny_int4, tmp_path):
    """Sharing changes storage, not arithmetic: a head reading its own copy computes the same logits."""
    model = onnx.load(os.path.join(tiny_int4, "model.onnx"))
    g = model.graph
    table = next(i for i in g.initializer if i.name == "wte.weight_q")
    copy = numpy_helper.from_array(numpy_helper.to_array(table).copy(), "lm_head.own_table")
    g.initializer.append(copy)
    head = next(n for n in g.node if n.name == "lm_head")
    head.input[1] = "lm_head.own_table"
    path = str(tmp_path / "copy.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location="copy.onnx.data")
    from gpt2onnx.eval import fidelity

    ids = np.arange(3, 40)
    shared = fidelity.logits_at_end(policy.cpu_session(os.path.join(tiny_int4, "model.onnx")), ids, len(ids))
    private = fidelity.logits_at_end(policy.cpu_session(path), ids, len(ids))
    np.testing.assert_array_equal(shared, private)


def test_the_gate_rejects_a_bad_int4_recipe(tmp_path, monkeypatch):
    """Outlier channels, the split switched off, 4-bit block 128: the int4 gate misses, no folder is written;
    with --accept-fidelity-miss the folder says so in its manifest and card."""
    from helpers.models import save_tiny_gpt2
    from outliers import inject_outliers

    from gpt2onnx import sources
    from gpt2onnx.exporter import quantize

    src = save_tiny_gpt2(str(tmp_path / "src"), initializer_range=0.2)
    real_load = sources.load

    def with_outliers(*a, **k):
        s = real_load(*a, **k)
        inject_outliers(s.model, channels=(3, 17), scale=300.0)
        return s

    monkeypatch.setattr(sources, "load", with_outliers)
    bad = replace(quantize.INT4, block_size=128, outlier_ratio=1e9)  # no channel is an outlier: no split
    monkeypatch.setattr(quantize, "INT4_LADDER", (bad,))
    with pytest.raises(FidelityError, match="int4 graph misses the fidelity gate.*mean_kl"):
        gpt2onnx.export(src, str(tmp_path / "bad"), precision="int4", progress=False)
    assert not (tmp_path / "bad").exists() and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    m = gpt2onnx.export(src, str(tmp_path / "kept"), precision="int4", progress=False, accept_fidelity_miss=True)
    assert m.fidelity["missed"] and m.fidelity["status"].startswith("missed")
    # 128 fitted to n_embd 32; --kv-cache auto: with the int8 cache, then again with an fp32 cache
    assert [(t["block_size"], t["kv_cache"]) for t in m.quantization["tried"]] == [(32, "int8"), (32, "fp32")]
    assert m.kv_cache.dtype == "fp32" and m.fidelity["kv_cache"] == "fp32"
    assert "WARNING: this int4 export MISSED the gate" in (tmp_path / "kept" / "MODEL_CARD.md").read_text()


def test_int4_gate_thresholds_and_decisive_positions():
    good = {"top1_agreement": 0.8, "decisive_top1_agreement": 0.96, "decisive_share": 0.7, "mean_kl": 0.04,
            "ppl_ratio": 1.04, "ppl_ref": 30.0}
    gate, why = gate_for(good, 50257, False, "int4")
    assert gate == GATE_INT4 and why == "full gate" and check(good, gate) == []
    assert check(dict(good, decisive_top1_agreement=0.9), gate) == ["decisive_top1_agreement 0.9 < 0.95"]
    assert check(dict(good, mean_kl=0.06), gate) == ["mean_kl 0.06 > 0.05"]
    assert len(check(dict(good, ppl_ratio=0.94), gate)) == 1
    unsure = dict(good, decisive_share=0.4, decisive_top1_agreement=0.5)
    gate, why = gate_for(unsure, 50257, False, "int4")
    assert "decisive_top1_agreement" not in gate and "40 %" in why and check(unsure, gate) == []
    assert gate_for(good, 50257, True, "int4") == ({"mean_kl": GATE_INT4["mean_kl"]}, "random weights: mean_kl only")
    assert gate_for(good, 50257, False, "int8")[0] == GATE and gate_for(good, 50257, False, "fp32")[0] == GATE
    assert check(dict(good, top1_agreement=0.8), GATE)  # int8's gate still counts every position


def test_measure_reports_decisive_positions(tiny_fp32):
    from gpt2onnx.eval import fidelity

    from gpt2onnx.graphio import open_folder

    gen = open_folder(tiny_fp32, threads=1)
    ids = np.asarray(gen.tokenizer.encode(gate_text()).ids[:400])
    f = fidelity.measure(gen.session, gen.session, ids, window=64, stride=32, limit=6)
    assert f["decisive_top1_agreement"] == 1.0 and 0.0 < f["decisive_share"] <= 1.0
    assert f["decisive_margin"] == DECISIVE_MARGIN  # measure's default is the gate's constant
    none = fidelity.measure(gen.session, gen.session, ids, window=64, stride=32, limit=2, margin=1e9)
    assert none["decisive_share"] == 0.0 and none["decisive_top1_agreement"] is None


def test_eval_fidelity_applies_the_int4_gate(tiny_int4, tiny_fp32, capsys):
    from gpt2onnx.eval import evaluate, format_result

    data = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "wiki_slice.txt")
    r = evaluate(tiny_int4, "fidelity", data=data, reference=tiny_fp32, limit=8, progress=False, threads=1)
    assert r["precision"] == "int4" and r["gate_missed"] == [] and r["decisive_share"] > 0
    assert "int4 gate  passed" in format_result(r)
    manifest = read_manifest(tiny_int4)
    from gpt2onnx.eval import fidelity_verdict

    assert fidelity_verdict(dict(r, mean_kl=0.06), manifest, r.get("vocab_size", 1000)) == ["mean_kl 0.06 > 0.05"]


def test_inspect_bench_and_packaging_read_int4_folders(tiny_int4, tmp_path, capsys):
    assert verify(tiny_int4).precision == "int4"
    assert cli.main(["inspect", tiny_int4]) == 0
    assert "int4" in capsys.readouterr().out
    from gpt2onnx import bench
    from gpt2onnx.bench import record

    rec = bench.run_bench(tiny_int4, baselines=[], out_dir=str(tmp_path / "bench"), batch_sizes=[1],
                          prompt_tokens=[4], new_tokens=3, repeats=1, warmup=0, progress=False, bandwidth_mib=32)
    assert rec["model"]["precision"] == "int4" and rec["results"][0]["precision"] == "int4"
    (path,) = [os.path.join(tmp_path, "bench", f) for f in os.listdir(tmp_path / "bench")]
    assert record.load(path)["model"]["precision"] == "int4"  # the schema accepts int4
    from gpt2onnx.integrations import azureml_kit, mlflow as g2m

    kit = azureml_kit.write_kit(tiny_int4, str(tmp_path / "kit"))
    assert "int4" in open(os.path.join(kit, "model.yml"), encoding="utf-8").read()
    out = g2m.package_mlflow(tiny_int4, str(tmp_path / "mlflow"), batch_size=2)
    assert "int4" in open(os.path.join(out, "model.yml"), encoding="utf-8").read()
