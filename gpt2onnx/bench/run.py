"""Measure a model folder on this machine, against PyTorch, Optimum and OpenVINO GenAI in the same run.

For example::

    from gpt2onnx.bench import run_bench, format_table
    rec = run_bench("models/gpt2-int8", batch_sizes=[1, 8], out_dir="results")
    print(format_table(rec))

This module checks the arguments, runs the grid (threads x batch size x prompt length, every
runtime in turn, each in a fresh `gpt2onnx.bench.worker` process so its load time and peak RSS
are its own) and writes the record (`gpt2onnx.bench.record`) to
``<out>/<date>-<sku or host>-<model>-<precision>.json``, with each decode step's bandwidth
floor (`floor_ratio`). `gpt2onnx.bench.env` captures the machine and its bandwidth,
`gpt2onnx.bench.runs` decides which baselines run and makes each run's row,
`gpt2onnx.bench.table` prints a record. What is measured, exactly: bench/README.md, "What is
measured".

AMX: the record's ``environment.amx_usable`` says whether this run could use AMX
(`gpt2onnx.bench.env.amx_usable`); False under the no-AMX preload of ``../shared/tools``. A
row whose worker's AMX state differs from the bench's is an error, never a figure.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone

from .. import artifact, cpu
from . import record
from . import skus as _skus
from .env import BANDWIDTH_MIB, environment, measure_bandwidth
from .runs import (baseline_python, cache_dir, call_worker, missing_packages, model_bytes, model_weight_bytes,
                   optimum_isa, result_row, source_fingerprint, source_spec)
from ..errors import InvalidRequestError

BASELINES = ("pytorch", "optimum", "openvino", "openvino-capped")
DEFAULT_BASELINES = ("pytorch", "optimum")  # openvino is opt-in: its packages are installed apart
_HINTS = {"pytorch": "pip install 'gpt2onnx[export]'", "optimum": "pip install 'gpt2onnx[export]'",
          "openvino": "bash scripts/install_openvino.sh", "openvino-capped": "bash scripts/install_openvino.sh"}
_OPENVINO = ("openvino", "openvino-capped")  # one optimum-intel export serves both


# -- inputs ---------------------------------------------------------------------------


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,8' -> [1, 8]; positive, distinct integers.

    >>> parse_int_list("1, 8", "--batch-sizes")
    [1, 8]
    >>> parse_int_list("1,x", "--batch-sizes")
    Traceback (most recent call last):
    gpt2onnx.errors.InvalidRequestError: --batch-sizes must be positive integers separated by commas, e.g. 1,8; got '1,x'
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise InvalidRequestError(f"{what} must be positive integers separated by commas, e.g. 1,8; got {text!r}")
    return _check_ints([int(p) for p in parts], what)


def _check_ints(values, what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise InvalidRequestError(f"{what} must be a non-empty list of positive integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidRequestError(f"{what} must be positive integers, got {v!r}")
    if len(set(values)) != len(values):
        raise InvalidRequestError(f"{what} lists a value twice: {list(values)}")
    return list(values)


def _check_int(value, what: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InvalidRequestError(f"{what} must be an integer >= {lo}, got {value!r}")
    return value


def _check_baselines(baselines) -> list[str]:
    if isinstance(baselines, str):
        baselines = [b.strip() for b in baselines.split(",") if b.strip()]
    out = []
    for b in baselines:
        if b == "none":
            continue
        if b not in BASELINES:
            raise InvalidRequestError(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)} (or none)")
        if b not in out:
            out.append(b)
    return out


def _check_out_dir(out_dir: str) -> str:
    out_dir = os.fspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InvalidRequestError(f"cannot write results to {out_dir!r} ({e.strerror or e}); "
                                  "pass a writable --out folder") from None
    return out_dir


# -- the run --------------------------------------------------------------------------


def _amx_text(usable: bool | None) -> str:
    return {None: "no AMX in the CPU", True: "AMX on", False: "AMX off"}[usable]


def record_path(rec: dict, out_dir: str) -> str:
    """``<out_dir>/<date>-<sku or host>-<model>-<precision>.json`` for a record made on this host."""
    date = re.sub(r"[-:]", "", rec["created"])  # 20240501T120000Z
    parts = [date, rec["sku"] or socket.gethostname(), rec["model"]["name"], rec["model"]["precision"]]
    return os.path.join(out_dir, "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", p) for p in parts) + ".json")


def run_bench(model_dir: str, *, sku: str | None = None, batch_sizes: Sequence[int] = (1, 8),
              prompt_tokens: Sequence[int] = (32, 128), new_tokens: int = 128, threads: Sequence[int] | None = None,
              baselines: Sequence[str] = DEFAULT_BASELINES, repeats: int = 3, warmup: int = 1,
              out_dir: str | None = "results",
              progress: bool = True, bandwidth_mib: int = BANDWIDTH_MIB) -> dict:
    """Benchmark a model folder and its baselines; write and return the record.

    Args:
        model_dir: a folder written by `gpt2onnx export`.
        sku: the Azure VM size this runs on (default: env ``GPT2ONNX_SKU``; never guessed);
            the machine is checked against the catalog and mismatches printed.
        batch_sizes, prompt_tokens: the grid; prompts are exactly that many tokens.
        new_tokens: tokens generated per row (EOS ignored), at least 2.
        threads: intra-op thread counts to run (default: the physical cores).
        baselines: any of ``pytorch``, ``optimum`` (fp32 and Optimum's int8), ``openvino``
            (OpenVINO GenAI on optimum-intel's int8 export; run with ``$GPT2ONNX_OPENVINO_PYTHON``
            when set, see `gpt2onnx.bench.runs.baseline_python`), ``openvino-capped`` (the same
            as on Cascade Lake: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``, ``INFERENCE_PRECISION_HINT=f32``).
        repeats, warmup: timed and untimed runs per runtime and configuration.
        out_dir: where the record is written (None: not written); nothing else goes there:
            Optimum and OpenVINO exports are cached in `gpt2onnx.bench.runs.cache_dir`
            (``$GPT2ONNX_CACHE``, else ``~/.cache/gpt2onnx``).
        progress: a progress bar on stderr.
        bandwidth_mib: size of the array for the bandwidth measurement.

    Raises:
        ArtifactError: the model folder is missing or damaged.
        InvalidRequestError: a bad argument, an unknown SKU, or an unwritable `out_dir`.

    For example::

        rec = run_bench("models/gpt2-int8", batch_sizes=[1], baselines=["pytorch"])
        [r["runtime"] for r in rec["results"]]
        # -> ['gpt2onnx', 'pytorch']
    """
    return run_with_path(model_dir, sku=sku, batch_sizes=batch_sizes, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                threads=threads, baselines=baselines, repeats=repeats, warmup=warmup, out_dir=out_dir,
                progress=progress, bandwidth_mib=bandwidth_mib)[0]


def run_with_path(model_dir, *, sku, batch_sizes, prompt_tokens, new_tokens, threads, baselines, repeats, warmup, out_dir,
         progress, bandwidth_mib) -> tuple[dict, str | None]:
    from ..progress import Progress

    model_dir = os.path.abspath(os.fspath(model_dir))
    manifest = artifact.verify(model_dir, check_hashes=False)  # the gpt2onnx worker checks hashes when it loads
    batch_sizes = _check_ints(batch_sizes, "batch sizes")
    prompt_tokens = _check_ints(prompt_tokens, "prompt tokens")
    threads = [threads] if isinstance(threads, int) and not isinstance(threads, bool) else threads
    threads = _check_ints(threads, "threads") if threads is not None else [cpu.physical_cores()]
    new_tokens = _check_int(new_tokens, "new tokens (a decode step to time needs >= 2)", 2)
    repeats, warmup = _check_int(repeats, "repeats", 1), _check_int(warmup, "warmup", 0)
    bandwidth_mib = _check_int(bandwidth_mib, "bandwidth_mib", 1)
    baselines = _check_baselines(baselines)
    context = manifest.dims.n_positions
    if max(prompt_tokens) + new_tokens > context:
        raise InvalidRequestError(f"prompt tokens {max(prompt_tokens)} + new tokens {new_tokens} exceed the model's "
                                  f"context of {context}; use shorter prompts or fewer new tokens")
    sku = sku or os.environ.get("GPT2ONNX_SKU") or None
    if sku is not None:
        sku = _skus.get(sku).name
    if out_dir is not None:
        out_dir = _check_out_dir(out_dir)

    precision = manifest.precision
    runtimes: list[tuple[str, str]] = [("gpt2onnx", precision)]
    runtimes += [("pytorch", "fp32")] * ("pytorch" in baselines)
    runtimes += [("optimum", "fp32"), ("optimum", "int8")] * ("optimum" in baselines)
    runtimes += [(b, "int8") for b in _OPENVINO if b in baselines]
    skip: dict[str, str] = {}  # baseline -> why it is not run
    source, why = source_spec(manifest) if baselines else (None, None)
    for b in baselines:
        missing = missing_packages(b)
        if missing:
            skip[b] = f"not run: needs {', '.join(missing)} ({_HINTS[b]})"
        elif source is None:
            skip[b] = f"not run: {why}"
    configs = [(t, b, p) for t in threads for b in batch_sizes for p in prompt_tokens]
    optimum_prep = "optimum" in baselines and "optimum" not in skip
    if "openvino" in baselines and "openvino" not in skip and os.environ.get("ONEDNN_MAX_CPU_ISA"):
        skip["openvino"] = (f"not run: ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} is set, so OpenVINO "
                            "would not run with its defaults; unset it, or use --baselines openvino-capped")
    openvino_prep = any(b in baselines and b not in skip for b in _OPENVINO)

    bar = Progress("gpt2onnx bench", total=1 + optimum_prep + openvino_prep + len(configs) * len(runtimes),
                   unit="runs", enabled=progress)
    try:
        bar.set_postfix("memory bandwidth")
        bandwidth = measure_bandwidth(threads=max(threads), mib=bandwidth_mib)
        bar.update()
        env = environment(memory_bandwidth_gbs=bandwidth)
        if sku and progress:  # early, so a wrong --sku can be stopped (format_table then leaves them out)
            for w in _skus.check_cpu(sku, env):
                bar.write(f"warning: {w}")
        optimum_dirs = {}
        if optimum_prep:
            bar.set_postfix("Optimum export + int8 (cached)")
            cache = os.path.join(cache_dir("optimum"), source_fingerprint(source, manifest))
            prep = call_worker({"mode": "prepare-optimum", "source": source, "cache_dir": cache,
                                 "isa": optimum_isa()}, max(threads))
            if "error" in prep:
                skip["optimum"] = f"Optimum export failed: {prep['error']}"
            else:
                optimum_dirs = {"fp32": (prep["fp32_dir"], "model.onnx"),
                                "int8": (prep["int8_dir"], "model_quantized.onnx")}
            bar.update()
        ov_dir = None
        if openvino_prep:
            bar.set_postfix("optimum-intel export to OpenVINO int8 (cached)")
            cache = os.path.join(cache_dir("openvino"), source_fingerprint(source, manifest))
            prep = call_worker({"mode": "prepare-openvino", "source": source, "cache_dir": cache}, max(threads),
                               python=baseline_python("openvino"))
            if "error" in prep:
                skip.update({b: f"OpenVINO export failed: {prep['error']}" for b in _OPENVINO if b not in skip})
            else:
                ov_dir = prep["ov_dir"]
                env["versions"].update({k: v for k, v in prep["versions"].items() if k not in env["versions"]})
            bar.update()
        ours_bytes = model_weight_bytes(model_dir, manifest)
        rows = []
        for cfg in configs:
            t, b, p = cfg
            for runtime, prec in runtimes:
                bar.set_postfix(f"t{t} b{b} p{p} {runtime} {prec}")
                if runtime in skip:
                    out = {"error": skip[runtime]}
                else:
                    job = {"mode": "run", "runtime": runtime, "model_dir": model_dir, "threads": t,
                           "batch_size": b, "prompt_tokens": p, "new_tokens": new_tokens,
                           "warmup": warmup, "repeats": repeats, "source": source}
                    if runtime == "optimum":
                        job["optimum_dir"], job["optimum_file"] = optimum_dirs[prec]
                    elif runtime in _OPENVINO:
                        job["ov_dir"] = ov_dir
                    out = call_worker(job, t, python=baseline_python(runtime))
                    if out.get("amx_usable", env["amx_usable"]) != env["amx_usable"]:  # never a mixed record
                        out = {"error": f"the worker's AMX state ({_amx_text(out['amx_usable'])}) is not the "
                                        f"bench's ({_amx_text(env['amx_usable'])}); give every process the same "
                                        "LD_PRELOAD (see bench/README.md, 'As on Cascade Lake')"}
                    if runtime == "gpt2onnx" and "error" not in out:
                        out["weight_bytes_per_token"] = ours_bytes
                rows.append(result_row(runtime, prec, cfg, new_tokens, out, bandwidth))
                bar.update()
    finally:
        bar.close()

    rec = {
        "schema": record.SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sku": sku, "projection": False, "environment": env,
        "model": {"name": manifest.name, "precision": precision, "kv_cache": manifest.kv_cache.dtype,
                  "random_weights": manifest.source.random_weights,
                  "n_params": manifest.n_params, "size_bytes": model_bytes(manifest),
                  "weight_bytes_per_token": int(ours_bytes)},
        "settings": {"threads": threads, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                     "batch_sizes": batch_sizes, "prompt_tokens": prompt_tokens},
        "results": rows,
    }
    path = None
    if out_dir is not None:
        path = record_path(rec, out_dir)
        record.dump(rec, path)
    else:
        record.validate(rec, source="bench record")
    return rec, path
