"""The batch-job scenario: tokens/s of a whole job of mixed prompts, static vs continuous batching.

>>> rec = run_job_bench("models/gpt2-int8", prompts=256, batch_size=8)   # doctest: +SKIP
>>> print(format_job_table(rec))                                          # doctest: +SKIP

``gpt2onnx bench MODEL --scenario job`` runs it. A job is `prompts` requests with prompt
lengths drawn from 8-512 tokens and ``max_new_tokens`` from 8-256 (log-uniform, seeded,
each row cut to fit the context), EOS ignored, greedy; the same job runs through
`gpt2onnx.batch.iter_results` with ``batching="static"`` and ``"continuous"``, and a
uniform job of the same size (every prompt 128 tokens, 128 new tokens) gives the
reference rate. Each run is a fresh `gpt2onnx.bench.worker` process (load excluded from
the rate, peak RSS its own); runs are interleaved over `repeats` rounds and the medians
reported with the ratios continuous / static and continuous / uniform. Every run also
checks that static and continuous wrote the same text for every row.
"""

from __future__ import annotations

import hashlib
import statistics
import time

import numpy as np

JOB_SEED = 4321
MODES = ("uniform", "static", "continuous")


def job_requests(tok, *, prompts: int, n_positions: int, uniform: bool, seed: int = JOB_SEED) -> list[dict]:
    """The job's requests: mixed (or uniform 128/128) prompt lengths and max_new_tokens, deterministic."""
    from .worker import single_token_words

    words = single_token_words(tok)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(prompts):
        if uniform:
            n, new = 128, 128
        else:
            n = int(np.exp(rng.uniform(np.log(8), np.log(512))))
            new = int(np.exp(rng.uniform(np.log(8), np.log(256))))
        n = min(n, n_positions // 2)  # small test models: keep room for the new tokens
        new = max(1, min(new, n_positions - n))
        text = "".join(" " + words[k] for k in rng.integers(0, len(words), n))  # n single-token words: n tokens
        out.append({"id": i, "prompt": text, "max_new_tokens": new, "ignore_eos": True})
    return out


def measure_job(job: dict) -> dict:
    """Worker side: load, run the job once in the given mode; tokens, seconds, a digest of the texts."""
    from .. import load
    from ..batch import iter_results

    gen = load(job["model_dir"], threads=job["threads"])
    reqs = job_requests(gen.tokenizer, prompts=job["prompts"], n_positions=gen.n_positions,
                        uniform=job["mode_name"] == "uniform")
    batching = "static" if job["mode_name"] == "static" else "continuous"
    t0 = time.perf_counter()
    rows = list(iter_results(gen, reqs, batch_size=job["batch_size"], batching=batching))
    seconds = time.perf_counter() - t0
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed: {errors[0]}")
    digest = hashlib.sha256("\x00".join(r["text"] for r in rows).encode()).hexdigest()[:16]
    return {"tokens": sum(r["generated_tokens"] for r in rows), "seconds": seconds, "texts_sha256": digest}


def run_job_bench(model_dir: str, *, prompts: int = 256, batch_size: int = 8, threads: int | None = None,
                  repeats: int = 1, progress: bool = False) -> dict:
    """Run the job scenario (parent side); returns ``{"settings", "runs", "summary"}`` (JSON-ready)."""
    from .. import artifact, cpu
    from ..errors import InvalidRequestError
    from .runs import call_worker

    for name, v, lo in (("prompts", prompts, 2), ("batch_size", batch_size, 1), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidRequestError(f"{name} must be an integer >= {lo}, got {v!r}")
    artifact.verify(model_dir, check_hashes=False)
    threads = threads or cpu.physical_cores()
    runs = []
    for r in range(repeats):
        for mode in MODES:
            if progress:
                print(f"job bench: round {r + 1}/{repeats}, {mode}", flush=True)
            out = call_worker({"mode": "batch-job", "mode_name": mode, "model_dir": model_dir, "prompts": prompts,
                               "batch_size": batch_size, "threads": threads}, threads)
            if "error" in out:
                raise InvalidRequestError(f"the {mode} job failed: {out['error']}")
            runs.append(dict(out, mode=mode, round=r, tokens_per_s=out["tokens"] / out["seconds"]))
    rate = {m: statistics.median(x["tokens_per_s"] for x in runs if x["mode"] == m) for m in MODES}
    rss = {m: max(x["peak_rss_mb"] for x in runs if x["mode"] == m) for m in MODES}
    same = len({x["texts_sha256"] for x in runs if x["mode"] != "uniform"}) == 1
    return {"settings": {"model_dir": model_dir, "prompts": prompts, "batch_size": batch_size, "threads": threads,
                         "repeats": repeats},
            "runs": runs,
            "summary": {"tokens_per_s": rate, "peak_rss_mb": rss, "static_equals_continuous": same,
                        "continuous_vs_static": rate["continuous"] / rate["static"],
                        "continuous_vs_uniform": rate["continuous"] / rate["uniform"]}}


def format_job_table(rec: dict) -> str:
    """The job scenario as a few lines for the terminal."""
    s, st = rec["summary"], rec["settings"]
    lines = [f"batch job: {st['prompts']} prompts (8-512 tokens, 8-256 new), batch size {st['batch_size']}, "
             f"{st['threads']} threads, median of {st['repeats']} round(s)",
             "mode         tokens/s  peak RSS MB"]
    lines += [f"{m:<12} {s['tokens_per_s'][m]:>8.1f}  {s['peak_rss_mb'][m]:>11.0f}" for m in MODES]
    lines.append(f"continuous / static {s['continuous_vs_static']:.2f}x, continuous / uniform "
                 f"{s['continuous_vs_uniform']:.2f}x; static and continuous texts identical: "
                 f"{'yes' if s['static_equals_continuous'] else 'NO'}")
    return "\n".join(lines)
