"""The batch-job scenario: tokens/s of a whole job, static vs continuous, per layout; shared heads, cache on/off.

For example::

    rec = run_job_bench("models/gpt2-int8", prompts=256, batch_size=8, workers=[1, 2])
    print(format_job_table(rec))

``gpt2onnx bench MODEL --scenario job [--workers 1,2] [--job-modes continuous]`` runs it.
A job is `prompts` requests with prompt lengths drawn from 8-512 tokens and
``max_new_tokens`` from 8-256 (log-uniform, seeded, each row cut to fit the context), EOS
ignored, greedy; the same job runs through `gpt2onnx.batch.run_batch` (JSONL in and out,
as a user runs it) with ``batching="static"`` and ``"continuous"``, and a uniform job of
the same size (every prompt 128 tokens, 128 new tokens) gives the reference rate.

The shared-head job (modes ``shared``, ``shared-nocache``, ``shared-openvino``; issue 22):
each prompt is a 384-token head drawn from one of 4 templates plus a 16-64-token tail, with
32-64 new tokens (scaled down for contexts under 1024), as a classification or extraction
job's instructions and examples are. ``shared`` runs it with the prefix cache (the
default), ``shared-nocache`` with ``prefix_cache_mb=0``, and ``shared-openvino`` the same
token ids through OpenVINO GenAI with ``enable_prefix_caching`` (`ovgenai.run_openvino_job`,
in batches of 8, in the interpreter the OpenVINO baseline uses).

A layout is processes x intra-op threads each: ``run_batch(workers=P, threads=T)``, e.g.
"1x2" and "2x1" on 2 cores. Each run is a fresh `gpt2onnx.bench.worker` process; its rate
is tokens / the whole `run_batch` call (the model load included, as a job pays it: for
124M under 1 s of a minutes-long job) and its peak RSS the sum of every process's own
(the bench worker's VmHWM + each job worker's, sampled). Runs are interleaved over
`repeats` rounds (round 1: every layout x mode, then round 2 ...); the medians are
reported, with the ratios continuous / static, continuous / uniform and each layout / the
first, taken within a round (machines shared with other jobs drift between rounds). Every
run also checks that all modes and layouts wrote the same text for every row.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from collections.abc import Sequence

import numpy as np

JOB_SEED = 4321
MODES = ("uniform", "static", "continuous", "shared", "shared-nocache", "shared-openvino")
DEFAULT_MODES = ("uniform", "static", "continuous", "shared", "shared-nocache")  # openvino: opt-in, as in the grid
SHARED = {"head": 384, "templates": 4, "tail": (16, 64), "new": (32, 64)}  # at a 1024-token context
_RUN = {"uniform": ("uniform", "continuous", True), "static": ("mixed", "static", True),  # kind, batching, cache
        "continuous": ("mixed", "continuous", True), "shared": ("shared", "continuous", True),
        "shared-nocache": ("shared", "continuous", False)}


def job_requests(tok, *, prompts: int, n_positions: int, kind: str, seed: int = JOB_SEED) -> list[dict]:
    """The job's requests: ``"mixed"``, ``"uniform"`` (128/128) or ``"shared"`` heads, deterministic."""
    from .measure import single_token_words

    words = single_token_words(tok)
    rng = np.random.default_rng(seed)
    if kind == "shared":
        return _shared_requests(words, rng, prompts, n_positions)
    uniform = kind == "uniform"
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


def _shared_requests(words, rng, prompts: int, n_positions: int) -> list[dict]:
    scale = min(1.0, n_positions / 1024)
    head = int(SHARED["head"] * scale)
    tail, new = ([max(1, int(x * scale)) for x in SHARED[k]] for k in ("tail", "new"))
    heads = ["".join(" " + words[k] for k in rng.integers(0, len(words), head)) for _ in range(SHARED["templates"])]
    out = []
    for i in range(prompts):
        n_tail = int(rng.integers(tail[0], tail[1] + 1))
        text = heads[int(rng.integers(0, len(heads)))] + "".join(" " + words[k] for k in rng.integers(0, len(words),
                                                                                                      n_tail))
        out.append({"id": i, "prompt": text, "max_new_tokens": int(rng.integers(new[0], new[1] + 1)),
                    "ignore_eos": True})
    return out


def measure_job(job: dict) -> dict:
    """Worker side: run the job once through `run_batch` in the given mode and layout.

    Returns tokens, seconds (the whole `run_batch` call: model load included, as a job
    pays it), a digest of the texts, and the peak RSS of the processes it started.
    """
    import json
    import tempfile

    from .. import artifact, tokenizer
    from ..batch import run_batch

    dims = artifact.read_manifest(job["model_dir"]).dims
    tok = tokenizer.load(job["model_dir"], vocab_size=dims.vocab_size)
    kind, batching, cache = _RUN[job["mode_name"]]
    reqs = job_requests(tok, prompts=job["prompts"], n_positions=dims.n_positions, kind=kind)
    with tempfile.TemporaryDirectory(prefix="gpt2onnx-job-") as d, _ChildrenRss() as children:
        src, dst = os.path.join(d, "in.jsonl"), os.path.join(d, "out.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in reqs)
        t0, c0 = time.perf_counter(), time.process_time()
        s = run_batch(job["model_dir"], src, dst, batch_size=job["batch_size"], threads=job["threads"],
                      workers=job.get("workers", 1), batching=batching, progress=False,
                      **({} if cache else {"prefix_cache_mb": 0}))
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        with open(dst, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed: {errors[0]}")
    digest = hashlib.sha256("\x00".join(r["text"] for r in rows).encode()).hexdigest()[:16]
    return {"tokens": sum(r["generated_tokens"] for r in rows), "seconds": seconds, "texts_sha256": digest,
            "cpu_s": cpu_s, "children_peak_rss_mb": children.total_mb(),
            "prefix_cache": {"hits": s.prefix_cache_hits, "misses": s.prefix_cache_misses,
                             "saved_tokens": s.prefix_cache_saved_tokens}}


class _ChildrenRss:
    """Samples the peak RSS (VmHWM) of this process's descendants (the job's worker processes) every 0.2 s."""

    def __enter__(self):
        self.peak: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def total_mb(self) -> float:
        return sum(self.peak.values())

    def _run(self) -> None:
        while True:
            for pid in _descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/status", encoding="ascii") as f:
                        hwm = next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:")), 0.0)
                except (OSError, ValueError):
                    continue
                self.peak[pid] = max(self.peak.get(pid, 0.0), hwm)
            if self.stop.wait(0.2):
                return


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def layouts(workers: Sequence[int], threads: int | None) -> list[tuple[int, int]]:
    """(processes, threads per process) for each worker count: threads default to physical cores // processes.

    >>> layouts([1, 2], 1)
    [(1, 1), (2, 1)]
    """
    from .. import cpu

    return [(w, threads or max(1, cpu.physical_cores() // w)) for w in workers]


def run_job_bench(model_dir: str, *, prompts: int = 256, batch_size: int = 8, threads: int | None = None,
                  repeats: int = 1, progress: bool = False, workers: Sequence[int] = (1,),
                  modes: Sequence[str] = DEFAULT_MODES, cache_dir: str | None = None) -> dict:
    """Run the job scenario (parent side); returns ``{"settings", "runs", "summary"}`` (JSON-ready).

    Every round runs each layout (``workers`` processes x `threads` each, default
    physical cores // workers) in each of `modes`, interleaved. ``shared-openvino`` runs
    once per round in one process with the first layout's threads; its OpenVINO export
    is cached under `cache_dir` (default: a temporary folder).
    """
    from .. import artifact
    from ..batch.pool import check_workers
    from ..errors import InvalidRequestError
    from .runs import call_worker

    for name, v, lo in (("prompts", prompts, 2), ("batch_size", batch_size, 1), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidRequestError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes):
        raise InvalidRequestError(f"job modes must be some of {', '.join(MODES)}, got {modes!r}")
    modes = [m for m in MODES if m in modes]
    if isinstance(workers, (str, int)) or not workers or len(set(workers)) != len(workers):
        raise InvalidRequestError(f"workers must be a list of distinct process counts, e.g. [1, 2]; got {workers!r}")
    for w in workers:
        check_workers(w, threads)
    manifest = artifact.verify(model_dir, check_hashes=False)
    shapes = layouts(workers, threads)
    names = [f"{w}x{t}" for w, t in shapes]
    runs, load = [], [round(x, 2) for x in os.getloadavg()]
    ov = _prepare_openvino(manifest, cache_dir, shapes[0][1]) if "shared-openvino" in modes else None
    for r in range(repeats):
        for (w, t), layout in zip(shapes, names):
            for mode in modes:
                if mode == "shared-openvino":
                    if layout == names[0]:
                        runs.append(_openvino_run(ov, model_dir, prompts, batch_size, t, r, layout))
                    continue
                if progress:
                    print(f"job bench: round {r + 1}/{repeats}, {layout} (processes x threads), {mode}", flush=True)
                out = call_worker({"mode": "batch-job", "mode_name": mode, "model_dir": model_dir, "prompts": prompts,
                                   "batch_size": batch_size, "threads": t, "workers": w}, t)
                if "error" in out:
                    raise InvalidRequestError(f"the {layout} {mode} job failed: {out['error']}")
                runs.append(dict(out, mode=mode, layout=layout, workers=w, threads=t, round=r,
                                 tokens_per_s=out["tokens"] / out["seconds"]))
    return {"settings": {"model_dir": model_dir, "prompts": prompts, "batch_size": batch_size, "layouts": names,
                         "shared_job": dict(SHARED, note="at a 1024-token context; scaled down for shorter ones"),
                         "openvino": ov and {"versions": ov["versions"]},
                         "modes": modes, "repeats": repeats, "timing": "whole run_batch call, model load included",
                         "load_average_1_5_15min": {"start": load, "end": [round(x, 2) for x in os.getloadavg()]}},
            "runs": runs, "summary": summarize(runs, names, modes)}


def summarize(runs: list[dict], names: list[str], modes: list[str]) -> dict:
    """Medians per layout and mode, ratios between modes, and layout / first layout from the same round."""
    def pick(layout, mode):
        return [x for x in runs if x["layout"] == layout and x["mode"] == mode]

    def same_round(a: list[dict], b: list[dict], key: str = "tokens_per_s") -> float | None:
        r = [x[key] / y[key] for x in a for y in b if x["round"] == y["round"]]
        return statistics.median(r) if r else None

    have = {lay: [m for m in modes if pick(lay, m)] for lay in names}
    rate = {lay: {m: statistics.median(x["tokens_per_s"] for x in pick(lay, m)) for m in have[lay]} for lay in names}
    rss = {lay: {m: max(x["peak_rss_mb"] for x in pick(lay, m)) for m in have[lay]} for lay in names}
    texts = {m: {x["texts_sha256"] for x in runs if x["mode"] == m} for m in modes if m != "shared-openvino"}
    out = {"tokens_per_s": rate, "peak_rss_mb": rss,
           "texts_identical": all(len(v) == 1 for v in texts.values()) and all(
               a not in modes or b not in modes or texts[a] == texts[b]
               for a, b in (("static", "continuous"), ("shared", "shared-nocache")))}
    for a, b in (("continuous", "static"), ("continuous", "uniform")):
        if a in modes and b in modes:
            out[f"{a}_vs_{b}"] = {lay: rate[lay][a] / rate[lay][b] for lay in names}
    for a, b in (("shared", "shared-nocache"), ("shared", "shared-openvino")):  # interleaved: same-round ratios
        if a in modes and b in modes:
            out[f"{a}_vs_{b}"] = {lay: same_round(pick(lay, a), pick(names[0], b) if b == "shared-openvino"
                                                  else pick(lay, b)) for lay in names}
    if "shared" in modes and "shared-nocache" in modes:
        out["shared_vs_shared-nocache_cpu"] = {lay: same_round(pick(lay, "shared-nocache"), pick(lay, "shared"),
                                                               "cpu_s") for lay in names}
        out["prefix_cache"] = {lay: pick(lay, "shared")[0].get("prefix_cache") for lay in names}
    base = names[0]
    out["vs_" + base] = {lay: {m: same_round(pick(lay, m), pick(base, m)) for m in have[lay]} for lay in names[1:]}
    return out


def format_job_table(rec: dict) -> str:
    """The job scenario as a few lines for the terminal."""
    s, st = rec["summary"], rec["settings"]
    lines = [f"batch job: {st['prompts']} prompts (mixed: 8-512 tokens, 8-256 new; shared: a 384-token head of 4 + "
             f"16-64, 32-64 new), batch size {st['batch_size']}, median of {st['repeats']} round(s), {st['timing']}; "
             f"load average {st['load_average_1_5_15min']['start'][0]} at the start, "
             f"{st['load_average_1_5_15min']['end'][0]} at the end",
             "layout (processes x threads)  mode             tokens/s  peak RSS MB (all processes)"]
    for lay in st["layouts"]:
        lines += [f"{lay:<29} {m:<15} {v:>9.1f}  {s['peak_rss_mb'][lay][m]:>11.0f}"
                  for m, v in s["tokens_per_s"][lay].items()]
    for a, b in (("continuous", "static"), ("continuous", "uniform"), ("shared", "shared-nocache"),
                 ("shared", "shared-openvino"), ("shared", "shared-nocache_cpu")):
        key = f"{a}_vs_{b}"
        if key in s:
            what = "CPU time: nocache / cache" if b.endswith("_cpu") else f"{a} / {b}"
            lines.append(f"{what}: " + ", ".join(f"{lay} {v:.2f}x" for lay, v in s[key].items() if v is not None))
    for lay, c in s.get("prefix_cache", {}).items():
        if c:
            lines.append(f"{lay} shared: prefix cache {c['hits']} blocks hit, {c['misses']} missed, "
                         f"{c['saved_tokens']} prompt tokens saved")
    base = st["layouts"][0]
    for lay, by_mode in s["vs_" + base].items():
        lines.append(f"{lay} / {base} (same round, median): " + ", ".join(f"{m} {v:.2f}x" for m, v in by_mode.items()))
    lines.append(f"texts identical across modes and layouts: {'yes' if s['texts_identical'] else 'NO'}")
    return "\n".join(lines)


def _prepare_openvino(manifest, cache_dir: str | None, threads: int) -> dict:
    """The OpenVINO export of the folder's source (cached), in the OpenVINO baseline's interpreter."""
    import tempfile

    from ..errors import InvalidRequestError
    from .runs import baseline_python, call_worker, missing_packages, source_fingerprint, source_spec

    missing = missing_packages("openvino")
    if missing:
        raise InvalidRequestError(f"shared-openvino needs {', '.join(missing)} (bash scripts/install_openvino.sh)")
    source, why = source_spec(manifest)
    if source is None:
        raise InvalidRequestError(f"shared-openvino cannot rebuild the source model: {why}")
    root = cache_dir or tempfile.mkdtemp(prefix="gpt2onnx-ov-")
    prep = call_worker({"mode": "prepare-openvino", "source": source, "cache_dir": os.path.join(
        root, "openvino", source_fingerprint(source, manifest))}, threads, python=baseline_python("openvino"))
    if "error" in prep:
        raise InvalidRequestError(f"the OpenVINO export failed: {prep['error']}")
    return prep


def _openvino_run(ov: dict, model_dir: str, prompts: int, batch_size: int, threads: int, r: int, layout: str) -> dict:
    from ..errors import InvalidRequestError
    from .runs import baseline_python, call_worker

    out = call_worker({"mode": "openvino-job", "model_dir": model_dir, "ov_dir": ov["ov_dir"], "prompts": prompts,
                       "batch_size": batch_size, "threads": threads}, threads, python=baseline_python("openvino"))
    if "error" in out:
        raise InvalidRequestError(f"the OpenVINO GenAI shared-head job failed: {out['error']}")
    return dict(out, mode="shared-openvino", layout=layout, workers=1, threads=threads, round=r,
                tokens_per_s=out["tokens"] / out["seconds"], texts_sha256=None)
