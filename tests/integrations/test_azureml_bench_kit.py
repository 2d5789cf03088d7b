"""The Azure ML per-SKU bench kit, offline: its YAML loads with the azure-ai-ml SDK, its Python
is the same job, a node's command run here makes a record the report labels with the SKU, and
submit.sh / collect.sh drive a stand-in `az` to a merged report over three SKUs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml

from gpt2onnx.bench import record as results, skus
from gpt2onnx.cli import main
from gpt2onnx.integrations import azureml_bench_kit as kit

from helpers.paths import BENCH_FIXTURES as FIXTURES, REPO

SKUS = ["Standard_F4s_v2", "Standard_D4as_v4", "Standard_E4s_v3"]
FIXTURE_OF = {"Standard_F4s_v2": "f4s_v2.json", "Standard_D4as_v4": "d4as_v4.json", "Standard_E4s_v3": "e4s_v3.json"}

# The SDK is in the dev extra; without it the YAML is checked with pyyaml only.
try:
    HAS_SDK = importlib.util.find_spec("azure.ai.ml") is not None
except ModuleNotFoundError:  # no azure namespace at all
    HAS_SDK = False
pytestmark = pytest.mark.filterwarnings("ignore")  # azure-ai-ml's schemas warn about their marshmallow use


def load_job(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from azure.ai.ml import load_job as load

        return load(path)


def load_compute(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from azure.ai.ml import load_compute as load

        return load(path)


@pytest.fixture(scope="module")
def bench_kit(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("kit") / "azbench")
    assert main(["azureml-bench-kit", out, "--skus", ",".join(SKUS), "--random-weights",
                 "--prices", os.path.join(REPO, "bench", "prices.example.toml")]) == 0
    return out


def test_kit_layout(bench_kit):
    for sku in SKUS:
        for rel in (f"jobs/{sku}.yml", f"jobs/{sku}.py", f"compute/{sku}.yml"):
            assert os.path.isfile(os.path.join(bench_kit, rel)), rel
    for rel in ("code/run_bench.sh", "code/gpt2onnx/cli/__init__.py", "environment/Dockerfile",
                "environment/requirements.txt", "environment/constraints.txt", "submit.sh", "collect.sh", "COST.md"):
        assert os.path.exists(os.path.join(bench_kit, rel)), rel
    for script in ("submit.sh", "collect.sh", "code/run_bench.sh"):
        assert subprocess.run(["bash", "-n", os.path.join(bench_kit, script)]).returncode == 0


@pytest.mark.skipif(not HAS_SDK, reason="azure-ai-ml is not installed (dev extra)")
@pytest.mark.parametrize("sku", SKUS)
def test_every_yaml_loads_with_the_azure_ml_sdk(bench_kit, sku):
    job = load_job(os.path.join(bench_kit, "jobs", f"{sku}.yml"))
    assert job.type == "command" and job.compute == kit.cluster_name(sku)
    assert job.command == f"bash run_bench.sh --sku {sku} --out ${{{{outputs.records}}}}"
    assert job.outputs["records"].type == "uri_folder"
    assert job.environment.build.path.endswith("environment")
    assert job.environment_variables["GPT2ONNX_BENCH_EXPORT_ARGS"] == "--random-weights"
    compute = load_compute(os.path.join(bench_kit, "compute", f"{sku}.yml"))
    assert (compute.size, compute.min_instances, compute.max_instances) == (sku, 0, 1)
    assert compute.name == kit.cluster_name(sku) and len(compute.name) <= 16


@pytest.mark.skipif(not HAS_SDK, reason="azure-ai-ml is not installed (dev extra)")
def test_the_python_jobs_are_the_yaml_jobs(bench_kit):
    for sku in SKUS:
        spec = importlib.util.spec_from_file_location(f"kit_{sku}", os.path.join(bench_kit, "jobs", f"{sku}.py"))
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(module)
        py, yml = module.job(), load_job(os.path.join(bench_kit, "jobs", f"{sku}.yml"))
        assert py.command == yml.command and py.compute == kit.cluster_name(sku)
        assert py.environment_variables == yml.environment_variables
        assert os.path.samefile(py.code, os.path.join(bench_kit, "code"))
        assert os.path.samefile(py.environment.build.path, os.path.join(bench_kit, "environment"))
        assert set(py.outputs) == set(yml.outputs) == {"records"}
        c = module.cluster()
        assert (c.name, c.size, c.min_instances) == (kit.cluster_name(sku), sku, 0)


def test_yaml_structure_without_the_sdk(bench_kit):
    """What the SDK checks above, with pyyaml only (runs where azure-ai-ml is missing too)."""
    for sku in SKUS:
        with open(os.path.join(bench_kit, "jobs", f"{sku}.yml"), encoding="utf-8") as f:
            job = yaml.safe_load(f)
        assert job["type"] == "command" and job["compute"] == f"azureml:{kit.cluster_name(sku)}"
        assert f"--sku {sku}" in job["command"] and job["outputs"]["records"]["type"] == "uri_folder"
        assert os.path.isdir(os.path.join(bench_kit, "jobs", job["code"]))
        assert os.path.isdir(os.path.join(bench_kit, "jobs", job["environment"]["build"]["path"]))
        assert set(job["environment_variables"]) == set(kit.NODE_ENV)
        with open(os.path.join(bench_kit, "compute", f"{sku}.yml"), encoding="utf-8") as f:
            compute = yaml.safe_load(f)
        assert compute["type"] == "amlcompute" and compute["size"] == sku and compute["min_instances"] == 0


def test_environment_is_pinned_like_constraints_txt(bench_kit):
    env = os.path.join(bench_kit, "environment")
    with open(os.path.join(env, "constraints.txt")) as f, open(os.path.join(REPO, "constraints.txt")) as g:
        assert f.read() == g.read()
    dockerfile = open(os.path.join(env, "Dockerfile")).read()
    assert '"torch==2.13.0"' in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    assert "-c /tmp/gpt2onnx/constraints.txt -r /tmp/gpt2onnx/requirements.txt" in dockerfile
    reqs = open(os.path.join(env, "requirements.txt")).read().split()
    assert {"onnxruntime>=1.22", "optimum-onnx[onnxruntime]", "safetensors"} <= set(reqs)
    assert not any(r.startswith(("torch", "pytest", "matplotlib")) for r in reqs)


def test_cost_per_run_from_the_prices_file(bench_kit):
    cost = open(os.path.join(bench_kit, "COST.md")).read()
    prices = skus.load_prices(os.path.join(REPO, "bench", "prices.example.toml"))
    hours = kit.estimate_hours(precisions=2, batch_sizes=[1, 8], prompt_tokens=[32, 128], new_tokens=128,
                               baselines=["pytorch", "optimum"], repeats=3, warmup=1)
    assert 0.2 < hours < 3
    row = next(ln for ln in cost.splitlines() if ln.startswith("| Standard_F4s_v2 |"))
    assert row == f"| Standard_F4s_v2 | 0.2 | {hours:.2f} | {prices.per_hour['Standard_F4s_v2'] * hours:.3f} |"
    assert "EXAMPLE prices" in cost


def test_a_nodes_command_run_here_makes_a_record_labelled_with_its_sku(bench_kit, tiny_src, tmp_path, capsys):
    """The job's command as a node runs it (code/ as the working folder, the job's environment
    variables, the output folder for ${{outputs.records}}), on a tiny model and grid."""
    with open(os.path.join(bench_kit, "jobs", "Standard_F4s_v2.yml"), encoding="utf-8") as f:
        job = yaml.safe_load(f)
    work = tmp_path / "node"
    shutil.copytree(os.path.join(bench_kit, "code"), work)
    out = tmp_path / "outputs" / "records"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # the environment's python
    (bin_ / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPT2ONNX_SKU")}
    env.update(job["environment_variables"])
    env.update(PATH=f"{bin_}:{env['PATH']}", GPT2ONNX_BENCH_MODEL=tiny_src, GPT2ONNX_BENCH_PRECISIONS="fp32",
               GPT2ONNX_BENCH_EXPORT_ARGS="", GPT2ONNX_BENCH_ARGS="--batch-sizes 1 --prompt-tokens 4 --new-tokens 2 "
               "--baselines none --repeats 1 --warmup 0", HOME=str(tmp_path))
    command = job["command"].replace("${{outputs.records}}", str(out))
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr  # a job log gets plain progress lines
    [name] = os.listdir(out)  # the record, nothing else
    rec = results.load(str(out / name))
    assert rec["sku"] == "Standard_F4s_v2" and rec["model"]["name"] == "tiny"
    assert rec["environment"]["git_revision"] is None or len(rec["environment"]["git_revision"]) == 40
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    cap = capsys.readouterr()
    md = open(tmp_path / "report" / "report.md", encoding="utf-8").read()
    assert "Standard_F4s_v2" in md
    mismatch = skus.check_cpu("Standard_F4s_v2", rec["environment"])
    if mismatch:  # this machine is not an F4s_v2: said, and not hidden behind a recommendation
        assert "machine does not match Standard_F4s_v2" in cap.err
        assert all(w.removeprefix("Standard_F4s_v2: ") in cap.err for w in mismatch)
        assert "Standard_F4s_v2 (machine does not match)" in md and "NONE" in cap.out
    else:
        assert "Standard_F4s_v2 (" in cap.out


@pytest.mark.slow  # an Optimum export of the tiny model, then PyTorch and Optimum runs
def test_the_default_baselines_leave_only_records_in_the_output_and_collect(tiny_src, tmp_path):
    """The kit with its default baselines (PyTorch and Optimum): a node's output holds its record and nothing
    else (the Optimum export is cached on the node's disk), and collect.sh turns it into a report."""
    kit_dir = kit.write_bench_kit(str(tmp_path / "kit"), skus=["Standard_F4s_v2"], batch_sizes=[1], prompt_tokens=[4],
                                  new_tokens=2, repeats=1, warmup=0)
    with open(os.path.join(kit_dir, "jobs", "Standard_F4s_v2.yml"), encoding="utf-8") as f:
        job = yaml.safe_load(f)
    assert "--baselines pytorch,optimum" in job["environment_variables"]["GPT2ONNX_BENCH_ARGS"]
    work = tmp_path / "node"
    shutil.copytree(os.path.join(kit_dir, "code"), work)
    out = tmp_path / "outputs" / "records"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_ / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPT2ONNX_SKU", "GPT2ONNX_CACHE")}
    env.update(job["environment_variables"])
    env.update(PATH=f"{bin_}:{env['PATH']}", GPT2ONNX_BENCH_MODEL=tiny_src, GPT2ONNX_BENCH_PRECISIONS="fp32",
               GPT2ONNX_BENCH_EXPORT_ARGS="", HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    command = job["command"].replace("${{outputs.records}}", str(out))
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    [name] = os.listdir(out)  # the record only: no .cache, no export
    rec = results.load(str(out / name))
    assert {(row["runtime"], row["precision"], row["error"]) for row in rec["results"]} == {
        ("gpt2onnx", "fp32", None), ("pytorch", "fp32", None), ("optimum", "fp32", None), ("optimum", "int8", None)}
    assert os.listdir(work / "cache" / "optimum")  # the export is cached on the node, beside its models
    outputs = tmp_path / "downloaded"
    shutil.copytree(out, outputs)
    with open(os.path.join(kit_dir, "jobs.txt"), "w", encoding="utf-8") as f:  # what submit.sh writes
        f.write("Standard_F4s_v2 job-Standard_F4s_v2\n")
    env = dict(os.environ, PATH=f"{_fake_az(tmp_path, {'Standard_F4s_v2': str(outputs)})}:{os.environ['PATH']}",
               GPT2ONNX=f"{sys.executable} -m gpt2onnx", PYTHONPATH=os.pathsep.join(sys.path))
    prices = os.path.join(REPO, "bench", "prices.example.toml")
    r = subprocess.run(["bash", os.path.join(kit_dir, "collect.sh"), prices], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(os.path.join(kit_dir, "records")) == [name]
    assert "Standard_F4s_v2" in open(os.path.join(kit_dir, "report", "report.md"), encoding="utf-8").read()


def _fake_az(tmp_path, outputs: dict[str, str]) -> str:
    """An `az` that logs its calls; job create names the job after its size, download copies `outputs[size]`
    (a job's output folder) to where Azure ML puts it."""
    bin_ = tmp_path / "fakebin"
    bin_.mkdir()
    az = bin_ / "az"
    az.write_text(f"""#!/usr/bin/env python3
import os, shutil, sys
a = sys.argv[1:]
with open({str(tmp_path / 'az.log')!r}, "a") as f:
    f.write(" ".join(a) + "\\n")
outputs = {outputs!r}
if a[:3] == ["ml", "job", "create"]:
    print("job-" + os.path.basename(a[a.index("-f") + 1]).removesuffix(".yml"))
elif a[:3] == ["ml", "job", "show"]:
    print("Completed")
elif a[:3] == ["ml", "job", "download"]:
    sku = a[a.index("-n") + 1].removeprefix("job-")
    dest = os.path.join(a[a.index("--download-path") + 1], "named-outputs", a[a.index("--output-name") + 1])
    shutil.copytree(outputs[sku], dest)
""")
    az.chmod(0o755)
    return str(bin_)


def _job_outputs(tmp_path) -> dict[str, str]:
    """Each size's job output: its fixture record, beside the JSON files that are not records
    (a stray config.json, an export cache in a hidden folder, as an older bench wrote there)."""
    outputs = {}
    for sku in SKUS:
        out = tmp_path / "outputs" / sku
        (out / ".cache" / "optimum" / "0123" / "fp32").mkdir(parents=True)
        shutil.copy(os.path.join(FIXTURES, FIXTURE_OF[sku]), out / f"{sku}.json")
        (out / "config.json").write_text('{"model_type": "gpt2"}')
        (out / ".cache" / "optimum" / "0123" / "fp32" / "config.json").write_text('{"model_type": "gpt2"}')
        outputs[sku] = str(out)
    return outputs


def test_submit_then_collect_gives_one_report_over_three_skus(bench_kit, tmp_path):
    work = tmp_path / "kit"
    shutil.copytree(bench_kit, work)
    env = dict(os.environ, PATH=f"{_fake_az(tmp_path, _job_outputs(tmp_path))}:{os.environ['PATH']}",
               GPT2ONNX=f"{sys.executable} -m gpt2onnx", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(["bash", str(work / "submit.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "az.log").read_text().splitlines()
    assert [ln for ln in log if ln.startswith("ml compute create")] == [
        f"ml compute create -f compute/{s}.yml" for s in SKUS]
    assert (work / "jobs.txt").read_text().split() == [w for s in SKUS for w in (s, f"job-{s}")]
    assert sum(ln.startswith("ml job stream") for ln in log) == 3
    prices = tmp_path / "prices.toml"
    prices.write_text('currency = "EUR"\n[price_per_hour]\nStandard_F4s_v2 = 0.5\nStandard_D4as_v4 = 0.3\n'
                      "Standard_E4s_v3 = 0.1\n")
    r = subprocess.run(["bash", str(work / "collect.sh"), str(prices)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work / "records")) == sorted(f"{s}.json" for s in SKUS)
    md = (work / "report" / "report.md").read_text()
    why = next(ln for ln in md.splitlines() if ln.startswith("| gpt2 "))
    assert "Standard_E4s_v3" in why and "decided by cost per 1M tokens" in why  # the cheapest of three
    assert "cost / 1M tokens (EUR)" in md


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["azureml-bench-kit", str(tmp_path / "k"), "--skus", "Standard_F4s_v3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown SKU 'Standard_F4s_v3'" in err
    assert main(["azureml-bench-kit", str(tmp_path / "k"), "--skus", "Standard_F4s_v2", "--precision", "int3"]) == 1
    assert "unknown precision 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
    assert main(["azureml-bench-kit", str(tmp_path / "k"), "--skus", "f4s_v2"]) == 0
    assert main(["azureml-bench-kit", str(tmp_path / "k"), "--skus", "f4s_v2"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
