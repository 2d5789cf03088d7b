"""The bench's runs: which runtimes can run, one run in a `gpt2onnx.bench.worker` process, its result row.

For example::

    from gpt2onnx.bench.runs import call_worker, result_row
    job = {"mode": "run", "runtime": "gpt2onnx", "model_dir": "models/gpt2-int8", "threads": 4, "batch_size": 1,
           "prompt_tokens": 32, "new_tokens": 128, "warmup": 1, "repeats": 3, "source": None}
    out = call_worker(job, threads=4)
    result_row("gpt2onnx", "int8", (4, 1, 32), 128, out, bandwidth_gbs=20.0)
    # -> {'runtime': 'gpt2onnx', 'precision': 'int8', 'batch_size': 1, ..., 'floor_ratio': 1.8, 'error': None}

Baselines (PyTorch, Optimum, OpenVINO GenAI) are rebuilt from the source model the
manifest names (`source_spec`) and need the export extra, OpenVINO also its own packages
(`missing_packages` names what is not installed, in the interpreter `baseline_python`
runs that baseline with); the Optimum and OpenVINO exports are cached under a fingerprint
of their inputs, in `cache_dir` (never in the bench's output folder). A result row holds
percentiles of the worker's timings and the bandwidth floor ratio, for which
`onnx_weight_bytes` counts the weight bytes a decode step reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence

from .. import cpu
from .env import PACKAGE_DIR, versions

_NEEDS = {"pytorch": ("torch", "transformers"), "optimum": ("torch", "transformers", "onnx", "optimum.onnxruntime"),
          "openvino": ("openvino_genai", "openvino", "optimum.intel", "nncf", "torch", "transformers", "tokenizers")}
_NEEDS["openvino-capped"] = _NEEDS["openvino"]
_PIP_NAMES = {"openvino_genai": "openvino-genai", "optimum.intel": "optimum-intel"}  # where the module name is not
OPENVINO_PYTHON_ENV = "GPT2ONNX_OPENVINO_PYTHON"
CACHE_ENV = "GPT2ONNX_CACHE"
_FIGURES = ("load_s", "tokenize_ms", "first_token_ms", "token_ms", "tokens_per_s", "peak_rss_mb", "floor_ratio")


# -- weights read per step -----------------------------------------------------------


def onnx_weight_bytes(path: str) -> int:
    """Bytes of initializers a decode step reads: all but those used only as a Gather table.

    That leaves out ``wpe`` and, when the LM head has its own weight, ``wte`` (also as
    int8 ``GatherBlockQuantized``, with its scales); a tied head reads ``wte`` in full,
    so it counts. Needs the `onnx` package.
    """
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    sizes: dict[str, int] = {}
    read: set[str] = set()

    def walk(graph) -> None:
        for init in graph.initializer:
            try:
                item = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                item = 4
            sizes[init.name] = int(np.prod(init.dims, dtype=np.int64)) * item
        for node in graph.node:
            for i, name in enumerate(node.input):
                gathered = (node.op_type == "Gather" and i == 0) or (
                    node.op_type == "GatherBlockQuantized" and i in (0, 2, 3))  # table, scales, zero points
                if not gathered:
                    read.add(name)
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(g)

    walk(model.graph)
    return sum(size for name, size in sizes.items() if name in read)


def model_weight_bytes(model_dir: str, manifest) -> int:
    try:
        return onnx_weight_bytes(os.path.join(model_dir, "model.onnx"))
    except ImportError:  # runtime-only install: estimate from the data file and dims
        d = manifest.dims
        data = manifest.files.get("model.onnx.data", {}).get("bytes", 0)
        tables = d.n_positions * d.n_embd * 4
        if manifest.precision == "int8":  # int8 exports carry an untied LM head: wte is only gathered
            tables += d.vocab_size * d.n_embd * 4
        return max(0, data - tables)


def model_bytes(manifest) -> int:
    """Bytes of the graph and its weights (model.onnx + model.onnx.data)."""
    return sum(f["bytes"] for name, f in manifest.files.items() if name.startswith("model.onnx"))


# -- baselines ------------------------------------------------------------------------


def baseline_python(baseline: str) -> str:
    """The interpreter a baseline's worker runs in.

    The parent's own, except for ``openvino`` (and ``openvino-capped``) when
    ``$GPT2ONNX_OPENVINO_PYTHON`` names another (a venv that has OpenVINO next to gpt2onnx's
    export extra).
    """
    if baseline in ("openvino", "openvino-capped"):
        return os.environ.get(OPENVINO_PYTHON_ENV) or sys.executable
    return sys.executable


def _find_missing(mods: Sequence[str]) -> list[str]:
    out = []
    for mod in mods:
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):
            out.append(mod)
    return out


def missing_packages(baseline: str) -> list[str]:
    """The packages (pip names) a baseline needs that its interpreter (`baseline_python`) lacks.

    Another interpreter is asked in a subprocess; one that cannot run is named as missing.
    """
    python = baseline_python(baseline)
    mods = _NEEDS[baseline]
    if python == sys.executable:
        missing = _find_missing(mods)
    else:
        probe = ("import importlib.util, json, sys\n"
                 "def gone(m):\n"
                 "    try:\n        return importlib.util.find_spec(m) is None\n"
                 "    except (ImportError, ValueError):\n        return True\n"
                 "print(json.dumps([m for m in sys.argv[1:] if gone(m)]))")
        try:
            p = subprocess.run([python, "-c", probe, *mods], capture_output=True, text=True, timeout=120)
            missing = json.loads(p.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, IndexError, json.JSONDecodeError):
            return [f"a working Python at ${OPENVINO_PYTHON_ENV}={python}"]
    return [_PIP_NAMES.get(m, m) for m in missing]


def source_spec(manifest) -> tuple[dict | None, str | None]:
    """The source the PyTorch baseline is rebuilt from, or why it cannot be."""
    from ..sources import hub_name

    src = manifest.source
    sid = src.id
    if not sid:
        return None, "the manifest names no source model to rebuild it from"
    if os.path.isdir(sid) or hub_name(sid) is None:
        if not os.path.isdir(sid):
            return None, (f"the source folder {sid!r} of this model no longer exists (relative to "
                          f"{os.getcwd()}); run from where it was exported, or pass --baselines none")
        sid = os.path.abspath(sid)
    return {"id": sid, "random_weights": src.random_weights, "seed": src.seed}, None


def cache_dir(kind: str) -> str:
    """Where the baselines' exports of `kind` ("optimum", "openvino") are cached.

    ``$GPT2ONNX_CACHE/<kind>`` when set, else the user's cache folder
    (``$XDG_CACHE_HOME/gpt2onnx/<kind>``, by default ``~/.cache/gpt2onnx/<kind>``). Never the
    bench's ``--out`` folder: that one holds records only (Optimum's export is ~0.8 GB for 124M,
    JSON files among it). Three lines of XDG here rather than a platformdirs dependency.
    """
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gpt2onnx")
    return os.path.join(root, kind)


def source_fingerprint(spec: dict, manifest) -> str:
    """What the Optimum export depends on; a changed source or tool gives a new cache entry."""
    files = []
    if os.path.isdir(spec["id"]):
        for name in sorted(os.listdir(spec["id"])):
            if name.endswith((".json", ".safetensors", ".bin")):
                st = os.stat(os.path.join(spec["id"], name))
                files.append([name, st.st_size, st.st_mtime_ns])
    v = versions()
    key = {"source": spec, "revision": manifest.source.revision, "files": files,
           "dims": manifest.raw["dims"], "tools": [v.get(k) for k in ("optimum", "optimum-onnx", "transformers", "torch",
                                                                    "onnxruntime")]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def optimum_isa() -> str:
    """Optimum's dynamic-quantization preset for this CPU."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    isa = cpu.isa_flags()
    return "avx512_vnni" if isa["avx512_vnni"] else ("avx512" if isa["avx512f"] else "avx2")


def worker_env(job: dict) -> dict[str, str]:
    """What a run's worker gets in its environment beyond the bench's own.

    >>> worker_env({"mode": "run", "runtime": "openvino-capped"})
    {'ONEDNN_MAX_CPU_ISA': 'AVX512_CORE_VNNI'}
    """
    if job.get("mode") == "run" and job.get("runtime") == "openvino-capped":
        from .env import CAPPED_ENV

        return dict(CAPPED_ENV)
    return {}


def call_worker(job: dict, threads: int, python: str | None = None) -> dict:
    """Run one job in a fresh ``python -m gpt2onnx.bench.worker`` (`python`: default this interpreter)."""
    env = dict(os.environ, **worker_env(job), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(PACKAGE_DIR), os.environ.get("PYTHONPATH"))
                                          if p))
    p = subprocess.run([python or sys.executable, "-m", "gpt2onnx.bench.worker"], input=json.dumps(job),
                       capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
        if isinstance(out, dict):
            return out
    except (IndexError, json.JSONDecodeError):
        pass
    err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    return {"error": f"worker exited with code {p.returncode}" + (f": {err[-1][:300]}" if err else "")}


# -- figures --------------------------------------------------------------------------


def _pct(values: list[float], qs: Sequence[int]) -> dict[str, float]:
    import numpy as np

    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in qs}


def result_row(runtime: str, precision: str, cfg: tuple[int, int, int], new_tokens: int, out: dict,
         bandwidth_gbs: float | None) -> dict:
    threads, batch, prompt = cfg
    row = {"runtime": runtime, "precision": precision, "batch_size": batch, "prompt_tokens": prompt,
           "new_tokens": new_tokens, "threads": threads}
    if "error" in out:
        return {**row, **dict.fromkeys(_FIGURES), "error": out["error"]}
    token = {**_pct(out["step_ms"], (50, 90, 99)), "mean": round(statistics.fmean(out["step_ms"]), 4)}
    floor = None
    if bandwidth_gbs and out.get("weight_bytes_per_token"):
        floor_ms = out["weight_bytes_per_token"] / (bandwidth_gbs * 1e9) * 1e3
        floor = round(token["p50"] / floor_ms, 3)
    return {**row, "load_s": round(out["load_s"], 3), "tokenize_ms": round(statistics.median(out["tokenize_ms"]), 4),
            "first_token_ms": _pct(out["first_token_ms"], (50, 90)), "token_ms": token,
            "tokens_per_s": round(batch * new_tokens / statistics.median(out["total_s"]), 3),
            "peak_rss_mb": round(out["peak_rss_mb"], 1), "floor_ratio": floor, "error": None}
