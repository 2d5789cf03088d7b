"""The bench runner: record shape and sanity, baselines, errors, CLI. Never speed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket

import pytest

from gpt2onnx import artifact, bench, cli, cpu
from gpt2onnx.bench import record as results, runs as benchruns
from gpt2onnx.errors import ArtifactError, InvalidRequestError

SMALL = dict(batch_sizes=[1], prompt_tokens=[4], new_tokens=4, repeats=1, warmup=0, progress=False, bandwidth_mib=32)


@pytest.fixture(scope="module")
def bench_run(tiny_int8, tmp_path_factory):
    """gpt2onnx int8 and the PyTorch baseline at batch 1 and 2, 4-token prompts, 4 new tokens."""
    out = str(tmp_path_factory.mktemp("results"))
    rec = bench.run_bench(tiny_int8, baselines=["pytorch"], out_dir=out, **{**SMALL, "batch_sizes": [1, 2]})
    [name] = [n for n in os.listdir(out) if n.endswith(".json")]
    return rec, os.path.join(out, name)


def ok_rows(rec):
    return [r for r in rec["results"] if r["error"] is None]


def test_record_validates_and_is_written(bench_run):
    rec, path = bench_run
    assert results.validate(rec, source="test") is rec
    assert results.load(path) == rec
    host = re.sub(r"[^A-Za-z0-9._]+", "_", socket.gethostname())
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{re.escape(host)}-tiny-int8\.json", os.path.basename(path))
    assert bench.record_path(rec, os.path.dirname(path)) == path
    assert rec["sku"] is None and rec["projection"] is False
    assert rec["settings"] == {"threads": [cpu.physical_cores()], "new_tokens": 4, "repeats": 1, "warmup": 0,
                               "batch_sizes": [1, 2], "prompt_tokens": [4]}


def test_one_row_per_runtime_and_config_interleaved(bench_run):
    rec, _ = bench_run
    got = [(r["runtime"], r["precision"], r["batch_size"], r["prompt_tokens"]) for r in rec["results"]]
    assert got == [("gpt2onnx", "int8", 1, 4), ("pytorch", "fp32", 1, 4),
                   ("gpt2onnx", "int8", 2, 4), ("pytorch", "fp32", 2, 4)]
    assert all(r["error"] is None for r in rec["results"]), [r["error"] for r in rec["results"]]


def test_figures_are_sane(bench_run):
    rec, _ = bench_run
    for r in ok_rows(rec):
        tok, first = r["token_ms"], r["first_token_ms"]
        assert 0 < tok["p50"] <= tok["p90"] <= tok["p99"]
        assert 0 < first["p50"] <= first["p90"]
        assert tok["mean"] > 0 and r["load_s"] > 0 and r["tokenize_ms"] > 0
        assert r["peak_rss_mb"] > 0 and r["floor_ratio"] > 0
        assert r["new_tokens"] == 4 and r["threads"] == cpu.physical_cores()
        # One repeat: wall time includes first token + the 3 following steps (the parts never exceed the
        # whole; no bound the other way: timings belong in benchmarks, not in pass/fail tests).
        wall_ms = r["batch_size"] * r["new_tokens"] / r["tokens_per_s"] * 1e3
        steps_ms = first["p50"] + (r["new_tokens"] - 1) * tok["mean"]
        assert steps_ms <= wall_ms * 1.01 + 0.01
    # Peak RSS is each worker's own, not inherited from this (torch-importing) test process:
    # the torch-free gpt2onnx worker stays well below the PyTorch one.
    rss = {(r["runtime"], r["batch_size"]): r["peak_rss_mb"] for r in ok_rows(rec)}
    assert rss[("gpt2onnx", 1)] < rss[("pytorch", 1)]


def test_environment_and_model(bench_run, tiny_int8):
    rec, _ = bench_run
    env, model = rec["environment"], rec["model"]
    assert env["memory_bandwidth_gbs"] > 0
    assert set(env["isa"]) == {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx"}
    assert {"gpt2onnx", "onnxruntime", "numpy", "torch", "transformers"} <= set(env["versions"])
    assert env["git_revision"] is None or re.fullmatch(r"[0-9a-f]{40,64}", env["git_revision"])
    assert model["name"] == "tiny" and model["precision"] == "int8" and model["random_weights"] is False
    assert 0 < model["weight_bytes_per_token"] < model["size_bytes"]


def test_ratios_and_table(bench_run):
    rec, _ = bench_run
    rs = results.ratios(rec)
    assert [(r["batch_size"], r["baseline"]) for r in rs] == [(1, "pytorch"), (2, "pytorch")]
    assert all(r["decode_speedup"] > 0 and r["tokens_per_s_ratio"] > 0 for r in rs)
    table = bench.format_table(rec)
    assert "gpt2onnx int8" in table and "pytorch fp32" in table and "vs pytorch fp32" in table
    assert "SKU not given" in table and rec["environment"]["cpu_model"] in table


def test_row_summary_counts_exact_tokens():
    out = {"load_s": 1.0, "tokenize_ms": [0.2, 0.4, 0.3], "first_token_ms": [10.0, 12.0, 11.0],
           "step_ms": [float(x) for x in range(1, 101)], "total_s": [2.0, 4.0, 3.0], "peak_rss_mb": 100.0,
           "weight_bytes_per_token": 10**9}
    row = benchruns.result_row("gpt2onnx", "int8", (4, 8, 32), 128, out, bandwidth_gbs=10.0)
    assert row["tokens_per_s"] == pytest.approx(8 * 128 / 3.0, abs=1e-3)  # median wall time: 3 s
    assert row["token_ms"]["p50"] == 50.5 and row["token_ms"]["mean"] == 50.5
    assert row["first_token_ms"] == {"p50": 11.0, "p90": 11.8}
    assert row["floor_ratio"] == round(50.5 / 100.0, 3)  # floor: 1 GB / 10 GB/s = 100 ms
    assert row["tokenize_ms"] == 0.3 and row["threads"] == 4 and row["error"] is None
    failed = benchruns.result_row("pytorch", "fp32", (4, 8, 32), 128, {"error": "boom"}, bandwidth_gbs=10.0)
    assert failed["error"] == "boom" and failed["token_ms"] is None


def test_weight_bytes_leave_out_gathered_tables(tiny_fp32, tiny_int8):
    from gpt2onnx import artifact

    d = artifact.read_manifest(tiny_fp32).to_dict()["dims"]
    n_params = artifact.read_manifest(tiny_fp32).to_dict()["n_params"]
    fp32 = bench.onnx_weight_bytes(os.path.join(tiny_fp32, "model.onnx"))
    int8 = bench.onnx_weight_bytes(os.path.join(tiny_int8, "model.onnx"))
    # fp32 ties the LM head to wte, so only wpe is left out.
    assert fp32 == pytest.approx((n_params - d["n_positions"] * d["n_embd"]) * 4, rel=0.02)
    # int8 (qgemm): every MatMul (LM head included: the token table, read through its Transpose) at 1 byte
    # + a 4-byte scale per output column; the per-token scales of the embedding and wpe are only gathered.
    assert artifact.read_manifest(tiny_int8).to_dict()["quantization"]["scheme"] == "qgemm"
    e, layers, v = d["n_embd"], d["n_layer"], d["vocab_size"]
    assert int8 == pytest.approx(12 * e * e * layers + e * v + 4 * (9 * e * layers + v), rel=0.1)


def test_baselines_without_the_export_extra_are_reported_not_run(tiny_int8, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.run, "missing_packages", lambda b: ["torch", "transformers"])
    rec = bench.run_bench(tiny_int8, baselines=["pytorch", "optimum"], out_dir=str(tmp_path),
                          **{**SMALL, "new_tokens": 2})
    rows = {(r["runtime"], r["precision"]): r for r in rec["results"]}
    assert set(rows) == {("gpt2onnx", "int8"), ("pytorch", "fp32"), ("optimum", "fp32"), ("optimum", "int8")}
    assert rows[("gpt2onnx", "int8")]["error"] is None
    for key in (("pytorch", "fp32"), ("optimum", "fp32"), ("optimum", "int8")):
        assert "gpt2onnx[export]" in rows[key]["error"] and rows[key]["tokens_per_s"] is None
    table = bench.format_table(rec)
    assert "failed, see below" in table and "pip install 'gpt2onnx[export]'" in table
    assert all(r["baseline_error"] for r in results.ratios(rec))
    assert not os.path.exists(os.path.join(tmp_path, ".cache"))  # no Optimum export attempted


def test_missing_source_folder_makes_an_error_row(tiny_int8, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_int8, model)
    path = os.path.join(model, "gpt2onnx.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["source"]["id"] = str(tmp_path / "gone")
    manifest[artifact.SELF_HASH] = artifact.content_sha256(manifest)  # a consistent manifest of a moved source
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    rec = bench.run_bench(model, baselines=["pytorch"], out_dir=None, **{**SMALL, "new_tokens": 2})
    [ours, torch_row] = rec["results"]
    assert ours["error"] is None
    assert "no longer exists" in torch_row["error"] and "gone" in torch_row["error"]


@pytest.mark.slow  # Optimum's own export + its int8 quantization, then both runs
def test_optimum_baselines_fp32_and_int8_cached(tiny_int8, tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "results"
    monkeypatch.setenv("GPT2ONNX_CACHE", str(cache))
    rec = bench.run_bench(tiny_int8, baselines=["optimum"], out_dir=str(out), **{**SMALL, "new_tokens": 3})
    rows = {(r["runtime"], r["precision"]): r for r in rec["results"]}
    assert set(rows) == {("gpt2onnx", "int8"), ("optimum", "fp32"), ("optimum", "int8")}
    for r in rows.values():
        assert r["error"] is None, r["error"]
        assert r["token_ms"]["p50"] <= r["token_ms"]["p90"] <= r["token_ms"]["p99"] and r["floor_ratio"] > 0
    # Optimum's own int8 reads fewer weight bytes per step than its fp32: the floor ratios differ in basis.
    [entry] = os.listdir(cache / "optimum")  # the export is cached in $GPT2ONNX_CACHE ...
    cached = os.listdir(cache / "optimum" / entry)
    assert "fp32" in cached and any(c.startswith("int8-") for c in cached)
    [record] = os.listdir(out)  # ... and --out holds the record alone
    assert record.endswith(".json")
    assert {r["baseline_precision"] for r in results.ratios(rec)} == {"fp32", "int8"}


def test_doctests():
    import doctest

    from gpt2onnx.bench import recommend

    assert doctest.testmod(bench).failed == 0
    assert doctest.testmod(recommend).failed == 0


# -- bad inputs: refused before anything runs -----------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_sizes=[0]), "batch sizes must be positive"),
    (dict(batch_sizes=[]), "batch sizes must be a non-empty list"),
    (dict(batch_sizes=[1, 1]), "twice"),
    (dict(prompt_tokens=[61]), "exceed the model's context of 64"),
    (dict(new_tokens=1), "new tokens"),
    (dict(repeats=0), "repeats"),
    (dict(threads=[0]), "threads"),
    (dict(baselines=["tensorflow"]), "unknown baseline 'tensorflow'; choose from pytorch, optimum, openvino"),
    (dict(sku="Standard_Z9"), "unknown SKU"),
])
def test_bad_arguments(tiny_int8, tmp_path, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        bench.run_bench(tiny_int8, **{"out_dir": str(tmp_path), **SMALL, **kwargs})


def test_missing_model_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        bench.run_bench(str(tmp_path / "nope"), out_dir=str(tmp_path), **SMALL)


def test_unwritable_out(tiny_int8, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidRequestError, match="cannot write results to .*; pass a writable --out folder"):
        bench.run_bench(tiny_int8, out_dir=str(blocker / "results"), **SMALL)


@pytest.mark.parametrize("text", ["1,x", "", "0", "1,,2", "-1", "1.5"])
def test_parse_int_list_refuses(text):
    with pytest.raises(InvalidRequestError, match="--batch-sizes"):
        bench.parse_int_list(text, "--batch-sizes")


# -- command line ---------------------------------------------------------------------


@pytest.fixture
def main():
    return cli.main


def test_cli_bench_with_sku_from_env(main, tiny_int8, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2ONNX_SKU", "f4s_v2")
    monkeypatch.setattr(bench, "BANDWIDTH_MIB", 32)
    out = str(tmp_path / "res")
    code = main(["bench", tiny_int8, "--batch-sizes", "1", "--prompt-tokens", "2", "--new-tokens", "2",
                 "--baselines", "none", "--repeats", "1", "--warmup", "0", "--out", out, "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0
    [name] = os.listdir(out)
    assert name.endswith("-Standard_F4s_v2-tiny-int8.json")
    rec = results.load(os.path.join(out, name))
    assert rec["sku"] == "Standard_F4s_v2" and [r["runtime"] for r in rec["results"]] == ["gpt2onnx"]
    assert f"wrote {os.path.join(out, name)}" in stdout and "SKU Standard_F4s_v2" in stdout
    # This test machine is not an F4s_v2 (4 vCPUs) unless it happens to be one: mismatches are shown.
    if rec["environment"]["logical_cores"] != 4:
        assert "warning: Standard_F4s_v2: " in stdout


@pytest.mark.parametrize("argv, match", [
    (["bench", "/nonexistent/model"], "does not exist"),
    (["bench", "MODEL", "--batch-sizes", "1,x"], "--batch-sizes must be positive integers"),
    (["bench", "MODEL", "--baselines", "pytorch,jax"], "unknown baseline 'jax'"),
    (["bench", "MODEL", "--out", "BLOCKED"], "cannot write results to .*blocker"),
])
def test_cli_bench_bad_input_is_one_line(main, tiny_int8, tmp_path, capsys, argv, match):
    (tmp_path / "blocker").write_text("a file where the results folder should go")
    subs = {"MODEL": tiny_int8, "BLOCKED": str(tmp_path / "blocker" / "results")}
    argv = [subs.get(a, a) for a in argv]
    assert main(argv + ["--prompt-tokens", "4", "--new-tokens", "4", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpt2onnx: error: ") and re.search(match, err)


def test_cli_skus_flags_fit_for_a_model(main, tiny_int8, capsys):
    assert main(["skus", "--model-dir", tiny_int8]) == 0
    out = capsys.readouterr().out
    assert "Standard_F4s_v2" in out and "fits 0.00 GiB model" in out and "yes (" in out
    assert main(["skus"]) == 0
    assert "fits" not in capsys.readouterr().out.splitlines()[0]


def test_cli_report_over_a_results_folder(main, bench_run, tmp_path, capsys):
    _, path = bench_run
    out = str(tmp_path / "report")
    assert main(["report", os.path.dirname(path), "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "report.md")) and os.path.isfile(os.path.join(out, "report.html"))
    assert "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "empty_dir_missing")]) == 1


def test_job_scenario_static_and_continuous_write_the_same_rows(main, tiny_int8, tmp_path, capsys):
    """`gpt2onnx bench --scenario job`: uniform / static / continuous runs, each in its own worker."""
    import json as _json

    assert main(["bench", tiny_int8, "--scenario", "job", "--job-prompts", "12", "--batch-sizes", "3",
                 "--repeats", "1", "--threads", "1", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "continuous / static" in out and "texts identical across modes and layouts: yes" in out
    assert "shared / shared-nocache" in out and "prompt tokens saved" in out
    rec = _json.loads((tmp_path / "job-tiny-int8-12.json").read_text())
    assert [r["mode"] for r in rec["runs"]] == ["uniform", "static", "continuous", "shared", "shared-nocache"]
    assert rec["summary"]["texts_identical"] is True and rec["settings"]["layouts"] == ["1x1"]
    assert all(r["tokens"] > 0 and r["peak_rss_mb"] > 0 and r["cpu_s"] > 0 for r in rec["runs"])
    by_mode = {r["mode"]: r for r in rec["runs"]}
    assert by_mode["shared"]["prefix_cache"]["hits"] > 0 and by_mode["shared-nocache"]["prefix_cache"]["hits"] == 0
    assert by_mode["shared"]["texts_sha256"] == by_mode["shared-nocache"]["texts_sha256"]


def test_job_scenario_compares_layouts_in_interleaved_rounds(main, tiny_int8, tmp_path, capsys):
    """--workers 1,2 --threads 1: layouts 1x1 and 2x1, round by round; RSS summed over the job's processes."""
    import json as _json

    assert main(["bench", tiny_int8, "--scenario", "job", "--job-prompts", "40", "--batch-sizes", "2",
                 "--repeats", "2", "--threads", "1", "--workers", "1,2", "--job-modes", "continuous", "--quiet",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2x1 / 1x1 (same round, median): continuous" in out and "layouts: yes" in out
    rec = _json.loads((tmp_path / "job-tiny-int8-40-1x1_2x1.json").read_text())
    assert [(r["round"], r["layout"], r["mode"]) for r in rec["runs"]] == [
        (0, "1x1", "continuous"), (0, "2x1", "continuous"), (1, "1x1", "continuous"), (1, "2x1", "continuous")]
    one, two = (max(r["peak_rss_mb"] for r in rec["runs"] if r["workers"] == w) for w in (1, 2))
    assert two > one  # two models in memory, not one
    assert set(rec["summary"]["vs_1x1"]) == {"2x1"} and rec["summary"]["texts_identical"] is True
    assert main(["bench", tiny_int8, "--scenario", "job", "--workers", "0", "--quiet", "--out", str(tmp_path)]) == 1
    assert main(["bench", tiny_int8, "--scenario", "job", "--job-modes", "fast", "--quiet",
                 "--out", str(tmp_path)]) == 1


def test_cli_bench_on_a_machine_smaller_than_its_sku_warns_once_and_is_never_recommended(
        main, tiny_int8, tmp_path, monkeypatch, capsys):
    """--sku Standard_F4s_v2 (4 vCPUs) on a 2-vCPU machine: each mismatch once, none wrong, not recommended."""
    from gpt2onnx.bench import env as benchenv, run as benchrun, skus

    def two_vcpus(**kw):
        e = benchenv.environment(**kw)
        e.update(cpu_model="Intel(R) Xeon(R) Platinum 8272CL CPU @ 2.60GHz", logical_cores=2, physical_cores=1,
                 affinity=[0, 1], cgroup_cpu_quota=None, memory_gib=3.8,
                 isa={"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False, "amx": False})
        return e

    monkeypatch.setattr(benchrun, "environment", two_vcpus)
    out = str(tmp_path / "res")
    assert main(["bench", tiny_int8, "--sku", "Standard_F4s_v2", "--batch-sizes", "1", "--prompt-tokens", "2",
                 "--new-tokens", "2", "--baselines", "none", "--repeats", "1", "--warmup", "0", "--out", out]) == 0
    cap = capsys.readouterr()
    both = cap.out + cap.err
    expected = skus.check_cpu("Standard_F4s_v2", two_vcpus())
    assert any("2 vCPUs detected, catalog says 4" in w for w in expected)
    for w in expected:
        assert both.count(w) == 1, w
    assert "pinned" not in both
    assert "SKU Standard_F4s_v2 (the machine does NOT match it)" in cap.out
    assert main(["report", out, "--out", str(tmp_path / "rep")]) == 0
    rep = capsys.readouterr()
    assert "NONE — no batch-size-1 gpt2onnx results with a SKU (on a machine that matches it)" in rep.out
    assert "not counted: records of Standard_F4s_v2" in rep.out
    assert "machine does not match Standard_F4s_v2, so it is never recommended" in rep.err


def test_shared_head_job_requests(tiny_int8):
    """The shared-head job: a 384-token head from one of 4 templates + a 16-64-token tail, 32-64 new tokens
    (at a 1024-token context; scaled down for shorter ones), the same every time."""
    from gpt2onnx import tokenizer
    from gpt2onnx.bench.jobbench import job_requests

    tok = tokenizer.load(tiny_int8)
    reqs = job_requests(tok, prompts=40, n_positions=1024, kind="shared")
    assert reqs == job_requests(tok, prompts=40, n_positions=1024, kind="shared")
    ids = [tok.encode(r["prompt"]).ids for r in reqs]
    heads = {tuple(x[:384]) for x in ids}
    assert len(heads) == 4 and all(16 <= len(x) - 384 <= 64 for x in ids)
    assert all(32 <= r["max_new_tokens"] <= 64 and r["ignore_eos"] for r in reqs)
    small = job_requests(tok, prompts=10, n_positions=64, kind="shared")
    assert all(len(tok.encode(r["prompt"]).ids) + r["max_new_tokens"] <= 64 for r in small)


def test_shared_openvino_mode_without_openvino_is_one_line(main, tiny_int8, tmp_path, capsys, monkeypatch):
    import importlib.util

    from gpt2onnx.bench import runs as benchruns

    monkeypatch.delenv(benchruns.OPENVINO_PYTHON_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "openvino_genai" else real(name, *a, **k))
    assert main(["bench", tiny_int8, "--scenario", "job", "--job-modes", "shared,shared-openvino", "--quiet",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shared-openvino needs openvino-genai" in err[0] and "install_openvino.sh" in err[0]
