"""The per-SKU benchmark on Azure ML in one command: one command job per VM size.

For example::

    write_bench_kit("azbench", skus=["Standard_F4s_v2", "Standard_D4as_v4"], random_weights=True)
    # -> 'azbench'

``gpt2onnx azureml-bench-kit OUT --skus A,B,C`` calls `write_bench_kit`. The kit::

    OUT/
      code/run_bench.sh        what a node runs: export, then `gpt2onnx bench --sku SIZE --out <job output>`
      code/gpt2onnx/           a copy of this package (the image needs no gpt2onnx wheel)
      environment/             Dockerfile + requirements.txt + constraints.txt: the tested pins
      compute/<SIZE>.yml       a cluster of that size, 0 to 1 nodes (`az ml compute create -f`)
      jobs/<SIZE>.yml          the command job (`az ml job create -f`)
      jobs/<SIZE>.py           the same job and cluster with the azure-ai-ml SDK v2
      submit.sh                create the clusters, submit every job, wait for all
      collect.sh PRICES.toml   download every job's records into records/, `gpt2onnx report`
      COST.md                  the estimated cost of a run per size (with --prices)

docs/azureml_bench.md walks through it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Sequence

from ..errors import Gpt2OnnxError, InvalidRequestError
from ..fsutil import new_folder
from .azureml_kit import BASE_IMAGE

NODE_ENV = {  # the job's environment variables -> what run_bench.sh does with them
    "GPT2ONNX_BENCH_MODEL": "hub id or folder exported on the node",
    "GPT2ONNX_BENCH_PRECISIONS": "comma list: one export + one bench per precision",
    "GPT2ONNX_BENCH_EXPORT_ARGS": "extra flags of `gpt2onnx export` (e.g. --random-weights)",
    "GPT2ONNX_BENCH_ARGS": "extra flags of `gpt2onnx bench` (the grid, baselines, repeats)",
}
OUTPUT = "records"  # the job's output folder: one bench record per precision
# Wall time of one job besides the benchmark itself, for COST.md: node allocation and the
# image pull (the first build of the environment image runs once per workspace, on a
# build machine, and is not billed to the cluster), the export of 124M in fp32 + int8.
NODE_START_H = 0.15
EXPORT_H_PER_PRECISION = 0.05
TOKEN_S = 0.04  # rough seconds per generated token and row-step at 124M on 2 cores, all runtimes mixed

RUN_BENCH_SH = r'''#!/usr/bin/env bash
# What each Azure ML node runs (written by 'gpt2onnx azureml-bench-kit'):
#   bash run_bench.sh --sku Standard_F4s_v2 --out DIR
# exports $GPT2ONNX_BENCH_MODEL in each of $GPT2ONNX_BENCH_PRECISIONS, then benches it on
# this VM, labelled with --sku; the records go to DIR (the job's output folder).
set -euo pipefail
sku="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sku) sku="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "run_bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$sku" ] && [ -n "$out" ] || { echo "usage: run_bench.sh --sku SIZE --out DIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # the gpt2onnx copy beside this script
work="${GPT2ONNX_BENCH_WORKDIR:-$PWD}"
models="$work/models"
# The baselines' exports (Optimum: ~0.8 GB at 124M) go to the node's disk, never to the job's output.
export GPT2ONNX_CACHE="${GPT2ONNX_CACHE:-$work/cache}"
: "${GPT2ONNX_BENCH_MODEL:?the job sets it}" "${GPT2ONNX_BENCH_PRECISIONS:?the job sets it}"
mkdir -p "$out"
for precision in ${GPT2ONNX_BENCH_PRECISIONS//,/ }; do
  # shellcheck disable=SC2086  # the ARGS variables are flag lists
  python -m gpt2onnx export "$GPT2ONNX_BENCH_MODEL" "$models/$precision" --precision "$precision" --force \
    ${GPT2ONNX_BENCH_EXPORT_ARGS:-}
  # shellcheck disable=SC2086
  python -m gpt2onnx bench "$models/$precision" --sku "$sku" --out "$out" ${GPT2ONNX_BENCH_ARGS:-}
done
'''

JOB_PY = '''"""Azure ML command job: gpt2onnx bench on {sku} (written by 'gpt2onnx azureml-bench-kit').

The job and cluster of {sku}.yml and ../compute/{sku}.yml with the azure-ai-ml SDK v2:

    python jobs/{sku}.py     # the workspace from config.json (MLClient.from_config)
"""

import os

from azure.ai.ml import MLClient, Output, command
from azure.ai.ml.entities import AmlCompute, BuildContext, Environment

KIT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cluster() -> AmlCompute:
    return AmlCompute(name={cluster!r}, size={sku!r}, min_instances=0, max_instances=1,
                      idle_time_before_scale_down=120)


def job():
    return command(
        display_name={display!r}, experiment_name={experiment!r}, compute={cluster!r},
        code=os.path.join(KIT, "code"),
        command={command!r},
        environment=Environment(name="gpt2onnx-bench", build=BuildContext(path=os.path.join(KIT, "environment"))),
        environment_variables={env!r},
        outputs={{{output!r}: Output(type="uri_folder", mode="rw_mount")}},
    )


if __name__ == "__main__":
    from azure.identity import DefaultAzureCredential

    ml = MLClient.from_config(DefaultAzureCredential())
    ml.compute.begin_create_or_update(cluster()).result()
    print(ml.jobs.create_or_update(job()).name)
'''

SUBMIT_SH = '''#!/usr/bin/env bash
# Create one cluster per VM size (min 0 nodes: an idle cluster costs nothing), submit one
# bench job per size, wait for all. Needs the az CLI with the ml extension, logged in, and
#   az configure --defaults group=RESOURCE_GROUP workspace=WORKSPACE
# Writes jobs.txt (size, job name) for collect.sh.
set -euo pipefail
cd "$(dirname "$0")"
skus=({skus})
for sku in "${{skus[@]}}"; do
  az ml compute create -f "compute/$sku.yml" >/dev/null
done
: > jobs.txt
for sku in "${{skus[@]}}"; do
  name="$(az ml job create -f "jobs/$sku.yml" --query name -o tsv)"
  echo "$sku $name" >> jobs.txt
  echo "submitted $sku: $name" >&2
done
failed=0
while read -r sku name; do
  az ml job stream -n "$name" >/dev/null || true  # returns when the job ends
  status="$(az ml job show -n "$name" --query status -o tsv)"
  echo "$sku $name: $status" >&2
  [ "$status" = "Completed" ] || failed=1
done < jobs.txt
exit "$failed"
'''

COLLECT_SH = '''#!/usr/bin/env bash
# Download the records of every job in jobs.txt into records/ and merge them:
#   bash collect.sh PRICES.toml      (your prices per VM hour; see bench/prices.example.toml)
set -euo pipefail
prices="${{1:?usage: collect.sh PRICES.toml}}"
prices="$(cd "$(dirname "$prices")" && pwd)/$(basename "$prices")"
cd "$(dirname "$0")"
rm -rf downloads records
mkdir -p records
while read -r sku name; do
  az ml job download -n "$name" --output-name {output} --download-path "downloads/$sku" >/dev/null
  n=0  # bench records only: hidden folders (caches) are skipped, other JSON files are not records
  while IFS= read -r -d '' f; do
    grep -q '"schema": *"{schema}/' "$f" || continue
    cp "$f" records/; n=$((n + 1))
  done < <(find "downloads/$sku" -name '.*' -prune -o -name '*.json' -path '*{output}*' -print0)
  echo "$sku $name: $n record(s)" >&2
  [ "$n" -gt 0 ] || {{ echo "collect.sh: no record from $sku ($name); see 'az ml job show -n $name'" >&2; exit 1; }}
done < jobs.txt
${{GPT2ONNX:-gpt2onnx}} report records --out report --prices "$prices"
'''


def record_schema_prefix() -> str:
    """What a bench record's "schema" starts with, as a grep pattern: how collect.sh tells records from other JSON.

    >>> print(record_schema_prefix())
    gpt2onnx\\.bench
    """
    from ..bench.record import SCHEMA

    return re.escape(SCHEMA.rsplit("/", 1)[0])


def cluster_name(sku: str) -> str:
    """An AmlCompute name for a size (letters, digits, '-'; at most 16 characters).

    >>> cluster_name("Standard_D4as_v4")
    'g2o-d4as-v4'
    """
    name = "g2o-" + re.sub(r"[^a-z0-9]+", "-", sku.lower().removeprefix("standard_")).strip("-")
    return name[:16].rstrip("-")


def node_env(*, model: str, precisions: Sequence[str], random_weights: bool, bench_args: str) -> dict[str, str]:
    """The environment variables of a job (see `NODE_ENV`)."""
    return {"GPT2ONNX_BENCH_MODEL": model, "GPT2ONNX_BENCH_PRECISIONS": ",".join(precisions),
            "GPT2ONNX_BENCH_EXPORT_ARGS": "--random-weights" if random_weights else "",
            "GPT2ONNX_BENCH_ARGS": bench_args}


def node_command(sku: str) -> str:
    return f"bash run_bench.sh --sku {sku} --out ${{{{outputs.{OUTPUT}}}}}"


def _yaml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_yaml(sku: str, *, env: dict[str, str], experiment: str) -> str:
    lines = ["$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json", "type: command",
             f"display_name: gpt2onnx-bench-{sku}", f"experiment_name: {experiment}",
             f"compute: azureml:{cluster_name(sku)}", "code: ../code", f"command: {node_command(sku)}",
             "environment:", "  build:", "    path: ../environment", "environment_variables:"]
    lines += [f"  {k}: {_yaml_str(v)}" for k, v in env.items()]
    lines += ["outputs:", f"  {OUTPUT}:", "    type: uri_folder", "    mode: rw_mount", ""]
    return "\n".join(lines)


def compute_yaml(sku: str) -> str:
    return ("$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n"
            f"name: {cluster_name(sku)}\ntype: amlcompute\nsize: {sku}\n"
            "min_instances: 0  # no node, no cost, while idle\nmax_instances: 1\nidle_time_before_scale_down: 120\n")


def _requirements() -> list[str]:
    """What a node installs: the runtime and the `export` extra (the bench's baselines need it)."""
    from importlib import metadata

    out = []
    for req in metadata.requires("gpt2onnx") or []:
        spec, _, marker = req.partition(";")
        if not marker or 'extra == "export"' in marker:
            out.append(spec.strip())
    return out


def _constraints() -> str:
    """The pins the tests passed with: the repository's constraints.txt, else this environment's."""
    from importlib import metadata

    repo = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "constraints.txt")
    if os.path.isfile(repo):
        with open(repo, encoding="utf-8") as f:
            return f.read()
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"] != "gpt2onnx"}, key=str.lower)
    return "# pip freeze of the environment that wrote this kit\n" + "\n".join(pins) + "\n"


def _dockerfile(torch_pin: str) -> str:
    return (f"FROM {BASE_IMAGE}\n"
            "# Python 3.11 with the pins of constraints.txt; torch from the CPU wheel index (the default\n"
            "# Linux wheel pulls several GB of CUDA libraries a CPU benchmark never uses).\n"
            "RUN conda create -y -q -n gpt2onnx python=3.11 pip && conda clean -a -y\n"
            "ENV PATH=/opt/miniconda/envs/gpt2onnx/bin:$PATH\n"
            "COPY requirements.txt constraints.txt /tmp/gpt2onnx/\n"
            f"RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \"{torch_pin}\"\n"
            "RUN pip install --no-cache-dir -c /tmp/gpt2onnx/constraints.txt -r /tmp/gpt2onnx/requirements.txt\n")


def estimate_hours(*, precisions: int, batch_sizes: Sequence[int], prompt_tokens: Sequence[int], new_tokens: int,
                   baselines: Sequence[str], repeats: int, warmup: int) -> float:
    """A rough wall time of one job: node start, exports, and every timed and warm-up run."""
    runtimes = 1 + ("pytorch" in baselines) + 2 * ("optimum" in baselines)
    # a run: new_tokens decode steps + a prefill (~1/16 of a step per prompt token); a batch of b rows
    # costs ~10 % more per row-step than one row
    steps = sum((new_tokens + p / 16) * (1 + 0.1 * (b - 1)) for b in batch_sizes for p in prompt_tokens)
    bench_s = precisions * runtimes * (repeats + warmup) * steps * TOKEN_S
    return NODE_START_H + precisions * EXPORT_H_PER_PRECISION + bench_s / 3600


def cost_table(skus: Sequence[str], hours: float, prices) -> str:
    head = f"| VM size | price per hour ({prices.currency}) | est. hours | est. cost per run ({prices.currency}) |"
    rows = [head, "|---|---|---|---|"]
    total = 0.0
    for sku in skus:
        price = prices.per_hour.get(sku)
        cost = None if price is None else price * hours
        total += cost or 0.0
        rows.append(f"| {sku} | {price if price is not None else 'not in the prices file'} | {hours:.2f} | "
                    f"{'-' if cost is None else f'{cost:.3f}'} |")
    rows.append(f"| all | | | {total:.3f} |")
    label = " These are EXAMPLE prices, not real ones." if prices.example else ""
    return (f"# Estimated cost of one run of this kit\n\nEach size runs one job: about {hours:.2f} h of one node "
            "(node start, the exports, every warm-up and timed run; an estimate, the real time is in each job's "
            f"details).{label} Idle clusters scale to 0 nodes and cost nothing.\n\n" + "\n".join(rows) + "\n")


def write_bench_kit(outdir: str, *, skus: Sequence[str], model: str = "gpt2", precisions: Sequence[str] = ("int8", "fp32"),
                    random_weights: bool = False, batch_sizes: Sequence[int] = (1, 8),
                    prompt_tokens: Sequence[int] = (32, 128), new_tokens: int = 128,
                    baselines: Sequence[str] = ("pytorch", "optimum"), repeats: int = 3, warmup: int = 1,
                    prices_path: str | None = None, experiment: str = "gpt2onnx-bench", force: bool = False) -> str:
    """Write the Azure ML bench kit for `skus` into `outdir`; returns `outdir` (see the module docstring).

    Raises:
        InvalidRequestError: an unknown size, precision or baseline, or a bad prices file.
        Gpt2OnnxError: `outdir` exists (pass `force`).
    """
    from ..bench import skus as catalog
    from ..bench.run import BASELINES
    from ..exporter.pipeline import PRECISIONS

    names = list(dict.fromkeys(catalog.get(s).name for s in skus))
    if not names:
        raise InvalidRequestError("no VM size given; pass --skus, e.g. Standard_F4s_v2,Standard_D4as_v4")
    for p in precisions:
        if p not in PRECISIONS:
            raise InvalidRequestError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    for b in baselines:
        if b not in (*BASELINES, "none"):
            raise InvalidRequestError(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)} (or none)")
    prices = catalog.load_prices(prices_path) if prices_path else None
    if os.path.exists(outdir) and not force:
        raise Gpt2OnnxError(f"{outdir!r} exists; pass --force to replace it")
    bench_args = shlex.join(["--batch-sizes", ",".join(map(str, batch_sizes)),
                             "--prompt-tokens", ",".join(map(str, prompt_tokens)), "--new-tokens", str(new_tokens),
                             "--baselines", ",".join(baselines) or "none", "--repeats", str(repeats),
                             "--warmup", str(warmup)])  # progress: plain lines in the job's log
    env = node_env(model=model, precisions=precisions, random_weights=random_weights, bench_args=bench_args)
    reqs = _requirements()
    torch_pin = next((ln for ln in _constraints().splitlines() if ln.startswith("torch==")), "torch")
    with new_folder(outdir, prefix=".bench-kit-") as tmp:
        pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # gpt2onnx/
        shutil.copytree(pkg, os.path.join(tmp, "code", "gpt2onnx"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _write(tmp, "code/run_bench.sh", RUN_BENCH_SH, executable=True)
        _write(tmp, "environment/Dockerfile", _dockerfile(torch_pin))
        _write(tmp, "environment/requirements.txt", "\n".join(r for r in reqs if not r.startswith("torch")) + "\n")
        _write(tmp, "environment/constraints.txt", _constraints())
        for sku in names:
            _write(tmp, f"compute/{sku}.yml", compute_yaml(sku))
            _write(tmp, f"jobs/{sku}.yml", job_yaml(sku, env=env, experiment=experiment))
            _write(tmp, f"jobs/{sku}.py", JOB_PY.format(
                sku=sku, cluster=cluster_name(sku), display=f"gpt2onnx-bench-{sku}", experiment=experiment,
                command=node_command(sku), env=env, output=OUTPUT))
        _write(tmp, "submit.sh", SUBMIT_SH.format(skus=" ".join(names)), executable=True)
        _write(tmp, "collect.sh", COLLECT_SH.format(output=OUTPUT, schema=record_schema_prefix()), executable=True)
        if prices is not None:
            hours = estimate_hours(precisions=len(precisions), batch_sizes=batch_sizes, prompt_tokens=prompt_tokens,
                                   new_tokens=new_tokens, baselines=baselines, repeats=repeats, warmup=warmup)
            _write(tmp, "COST.md", cost_table(names, hours, prices))
    return outdir


def _write(root: str, rel: str, text: str, *, executable: bool = False) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    if executable:
        os.chmod(path, 0o755)
