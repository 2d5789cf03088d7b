"""The bench "as on Cascade Lake": the openvino-capped baseline, the AMX state in the record. Never speed."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from gpt2onnx import bench, cpu
from gpt2onnx.bench import env as benchenv, ovgenai, record as results
from gpt2onnx.bench.recommend import AMX_OFF_LABEL, group_key, group_label

SMALL = dict(batch_sizes=[1], prompt_tokens=[4], new_tokens=2, repeats=1, warmup=0, progress=False, bandwidth_mib=32)
CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}


def _amx_cpu(monkeypatch, usable):
    """This machine as a CPU with AMX whose AMX request is granted (True) or refused (False)."""
    real = cpu.isa_flags
    monkeypatch.setattr(cpu, "isa_flags", lambda: {**real(), "amx": True})
    monkeypatch.setattr(benchenv, "amx_usable", lambda: usable)


@pytest.fixture
def fake_workers(monkeypatch):
    """Every worker answered without running: the jobs and environments they got are kept."""
    calls = []
    real_run = subprocess.run

    def fake(argv, *a, input=None, env=None, **k):
        if argv[1:3] != ["-m", "gpt2onnx.bench.worker"]:
            return real_run(argv, *a, input=input, env=env, **k)
        job = json.loads(input)
        calls.append((job, env))
        if job["mode"] == "prepare-openvino":
            out = {"ov_dir": "/ov-ir", "versions": {"openvino": "0"}}
        else:
            out = {"load_s": 0.1, "tokenize_ms": [1.0], "first_token_ms": [2.0], "step_ms": [1.0, 1.0],
                   "total_s": [0.5], "peak_rss_mb": 100.0, "weight_bytes_per_token": 1000,
                   "amx_usable": benchenv.amx_usable()}
        return subprocess.CompletedProcess(argv, 0, json.dumps(out) + "\n", "")

    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(bench.run, "missing_packages", lambda b: [])
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    return calls


def test_capped_worker_gets_the_settings_and_the_record_says_capped(tiny_int8, tmp_path, monkeypatch,
                                                                      fake_workers):
    _amx_cpu(monkeypatch, usable=False)
    rec = bench.run_bench(tiny_int8, baselines=["openvino", "openvino-capped"], out_dir=str(tmp_path), **SMALL)
    runs = {job["runtime"]: (job, env) for job, env in fake_workers if job["mode"] == "run"}
    assert set(runs) == {"gpt2onnx", "openvino", "openvino-capped"}
    job, env = runs["openvino-capped"]
    assert job["ov_dir"] == "/ov-ir" and env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_VNNI"
    assert "ONEDNN_MAX_CPU_ISA" not in runs["openvino"][1] and "ONEDNN_MAX_CPU_ISA" not in runs["gpt2onnx"][1]
    assert [j["mode"] for j, _ in fake_workers].count("prepare-openvino") == 1  # one export serves both
    assert [(r["runtime"], r["error"]) for r in rec["results"]] == [
        ("gpt2onnx", None), ("openvino", None), ("openvino-capped", None)]
    assert rec["environment"]["amx_usable"] is False and results.amx_off(rec)
    [path] = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    assert results.load(path)["environment"]["amx_usable"] is False
    table = bench.format_table(rec)
    assert "AMX OFF in this run" in table and "vs openvino-capped int8" in table
    assert "openvino-capped: OpenVINO GenAI as on Cascade Lake (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI, " \
           "INFERENCE_PRECISION_HINT=f32)\n" in table + "\n"  # no "ran WITH AMX" warning: both sides capped


def test_capped_baseline_beside_an_uncapped_gpt2onnx_is_flagged(tiny_int8, tmp_path, monkeypatch, fake_workers):
    _amx_cpu(monkeypatch, usable=True)
    rec = bench.run_bench(tiny_int8, baselines=["openvino-capped"], out_dir=None, **SMALL)
    assert rec["environment"]["amx_usable"] is True and not results.amx_off(rec)
    table = bench.format_table(rec)
    assert "AMX OFF" not in table and "gpt2onnx ran WITH AMX here" in table


def test_a_worker_with_another_amx_state_is_an_error_row(tiny_int8, tmp_path, monkeypatch):
    """The bench says AMX off, the real worker (no preload) says otherwise: no figure, one line."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    real = benchenv.amx_usable()  # True on an AMX CPU, None elsewhere
    monkeypatch.setattr(benchenv, "amx_usable", lambda: False)
    rec = bench.run_bench(tiny_int8, baselines=[], out_dir=None, **SMALL)
    [row] = rec["results"]
    assert row["tokens_per_s"] is None and "\n" not in row["error"]
    want = {None: "no AMX in the CPU", True: "AMX on"}[real]
    assert row["error"].startswith(f"the worker's AMX state ({want}) is not the bench's (AMX off)")


def test_openvino_with_a_capped_isa_in_the_environment_is_not_run(tiny_int8, monkeypatch, fake_workers):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    rec = bench.run_bench(tiny_int8, baselines=["openvino"], out_dir=None, **SMALL)
    ov = next(r for r in rec["results"] if r["runtime"] == "openvino")
    assert ov["error"] == ("not run: ONEDNN_MAX_CPU_ISA=AVX2 is set, so OpenVINO would not run with its defaults; "
                           "unset it, or use --baselines openvino-capped")
    assert not [j for j, _ in fake_workers if j["mode"] != "run" or j["runtime"] != "gpt2onnx"]


def test_capped_pipeline_is_compiled_with_f32(monkeypatch):
    """run_openvino hands LLMPipeline the capped properties (fake OpenVINO modules stop it there)."""
    got = {}

    class Stop(Exception):
        pass

    def pipeline(path, device, **kwargs):
        got.update(kwargs, path=path, device=device)
        raise Stop

    genai = types.SimpleNamespace(SchedulerConfig=lambda: types.SimpleNamespace(max_num_batched_tokens=256,
                                                                                  max_num_seqs=256),
                                  LLMPipeline=pipeline)
    monkeypatch.setitem(sys.modules, "openvino_genai", genai)
    monkeypatch.setitem(sys.modules, "openvino", types.ModuleType("openvino"))
    job = {"runtime": "openvino-capped", "threads": 2, "batch_size": 8, "prompt_tokens": 128, "new_tokens": 4,
           "ov_dir": "/ov-ir"}
    for key, value in CAPPED.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Stop):
        ovgenai.run_openvino(job)
    assert got["INFERENCE_PRECISION_HINT"] == "f32" and got["INFERENCE_NUM_THREADS"] == 2
    assert got["scheduler_config"].enable_prefix_caching is False  # the plain baseline's settings otherwise
    got.clear()
    with pytest.raises(Stop):
        ovgenai.run_openvino({**job, "runtime": "openvino"})
    assert "INFERENCE_PRECISION_HINT" not in got  # the plain baseline keeps OpenVINO's defaults


def test_capped_worker_without_its_environment_refuses_in_one_line(tiny_int8):
    job = {"mode": "run", "runtime": "openvino-capped", "model_dir": tiny_int8, "ov_dir": "/ov-ir", "threads": 1,
           "batch_size": 1, "prompt_tokens": 4, "new_tokens": 2, "warmup": 0, "repeats": 1}
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    p = subprocess.run([sys.executable, "-m", "gpt2onnx.bench.worker"], input=json.dumps(job), capture_output=True,
                       text=True, env=env)
    assert p.returncode == 1 and p.stdout.count("\n") == 1
    assert json.loads(p.stdout) == {"error": "RuntimeError: openvino-capped needs ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI "
                                             "in its environment, got None; run it through gpt2onnx bench "
                                             "--baselines openvino-capped"}


def test_records_before_amx_usable_still_load_and_a_wrong_one_is_refused(tiny_int8, tmp_path, fake_workers):
    rec = bench.run_bench(tiny_int8, baselines=[], out_dir=None, **SMALL)
    old = copy.deepcopy(rec)
    del old["environment"]["amx_usable"]
    assert results.validate(old, source="old.json") is old and not results.amx_off(old)
    bad = copy.deepcopy(rec)
    bad["environment"]["amx_usable"] = "no"
    with pytest.raises(Exception, match=r"^bad.json: environment.amx_usable must be a bool, got 'no'; "):
        results.validate(bad, source="bad.json")


def test_capped_records_never_merge_with_the_machines_own(tiny_int8, fake_workers, monkeypatch):
    _amx_cpu(monkeypatch, usable=True)
    on = bench.run_bench(tiny_int8, baselines=[], out_dir=None, **SMALL)
    off = copy.deepcopy(on)
    off["environment"]["amx_usable"] = False
    assert group_key(on) != group_key(off)
    assert group_label(group_key(off)).endswith(", " + AMX_OFF_LABEL) and AMX_OFF_LABEL not in group_label(
        group_key(on))


def _noamx_so(tmp_path) -> str | None:
    from helpers.paths import shared_path

    src = shared_path("tools", "noamx.c")
    if not shutil.which("cc") or not os.path.isfile(src):
        return None
    so = str(tmp_path / "noamx.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", so, src, "-ldl"], check=True)
    return so


@pytest.mark.skipif(not cpu.isa_flags().get("amx"), reason="needs a CPU with AMX")
def test_amx_usable_reads_the_preload(tmp_path):
    so = _noamx_so(tmp_path)
    if so is None:
        pytest.skip("needs cc and ../shared/tools/noamx.c")
    code = "from gpt2onnx.bench.env import amx_usable; print(amx_usable())"
    ask = lambda extra: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, **extra}, check=True).stdout.strip()
    assert ask({}) == "True" and ask({"LD_PRELOAD": so}) == "False"


def _issue21_records(root, rec):
    """Rounds 1-3 as bench/issue21_table.sh lays them out; gpt2onnx's b8 tokens/s 1.5, 1.65, 1.8 x OpenVINO's."""
    for n, ours_tps in enumerate((300.0, 330.0, 360.0), 1):
        for mode, base in (("amx", "openvino"), ("capped", "openvino-capped")):
            folder = root / f"r{n}-{mode}"
            folder.mkdir()
            for b, p in ((1, 32), (8, 128)):
                r = copy.deepcopy(rec)
                r["environment"]["isa"]["amx"], r["environment"]["amx_usable"] = True, mode == "amx"
                r["results"] = [{**rec["results"][0], "runtime": rt, "batch_size": b, "prompt_tokens": p,
                                 "tokens_per_s": tps, "peak_rss_mb": rss}
                                for rt, tps, rss in (("gpt2onnx", ours_tps, 300.0), (base, 200.0, 400.0))]
                results.dump(r, str(folder / f"b{b}.json"))


def test_issue21_table_takes_medians_of_per_round_ratios_and_refuses_a_wrong_amx_state(tiny_int8, tmp_path,
                                                                                         fake_workers):
    from helpers.paths import REPO

    rec = bench.run_bench(tiny_int8, baselines=[], out_dir=None, **SMALL)
    _issue21_records(tmp_path, rec)
    table = [sys.executable, os.path.join(REPO, "bench", "issue21_table.py"), str(tmp_path)]
    p = subprocess.run(table, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    [tps] = [ln for ln in p.stdout.splitlines() if ln.startswith("| b8 tokens/s")]
    assert tps.endswith("| 330 | 200 | **1.65×** (1.50, 1.65, 1.80) | 330 | 200 | **1.65×** (1.50, 1.65, 1.80) |")
    [rss] = [ln for ln in p.stdout.splitlines() if ln.startswith("| b8/128 peak RSS")]
    assert "| 300 | 400 | **0.75×** (0.75, 0.75, 0.75) |" in rss and "| with AMX: gpt2onnx |" in p.stdout
    bad = tmp_path / "r2-capped" / "b1.json"
    wrong = results.load(str(bad))
    wrong["environment"]["amx_usable"] = True
    results.dump(wrong, str(bad))
    p = subprocess.run(table, capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == (f"issue21_table: {bad}: this capped run could use AMX; the no-AMX preload did not take "
                        "(check its path)\n")
