"""A/B of two gpt2onnx source trees on the same batch jobs, in CPU time at 1 thread (issue 22).

    nice -n 19 python bench/chunked_prefill_ab.py MODEL_DIR --a /work/main --b . --rounds 3 [--prompts 256]

Each run is a fresh process at ``threads=1`` whose CPU time (``getrusage``: user + system)
is the figure, so other jobs on a shared machine slow the wall clock but hardly the
result; trees and jobs alternate within each round (interleaved), medians are reported
with the B / A ratio of each round. Jobs (inputs written once, the same for both trees):

- ``mixed``: the job scenario's mixed job (`gpt2onnx.bench.jobbench`, 8-512 tokens,
  8-256 new) through ``run_batch`` (continuous, batch 8), and ``uniform`` (128/128):
  tokens per CPU second, continuous / uniform, peak RSS (VmHWM);
- ``steps``: the mixed job through the decode loop itself (`_scheduler.run`, 8 slots),
  the CPU clock read at every step: a decoding row's per-token time is the CPU time
  between two of its tokens; its median and p99 over all rows (rows being admitted all
  along), and p99 / median;
- ``shared`` / ``shared-nocache``: the shared-head job, prefix cache on / off (tree B only,
  or any tree whose ``run_batch`` takes ``prefix_cache_mb``).

Texts of every run are hashed: A and B must write the same rows (greedy, EOS ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
job = json.loads(sys.argv[1])
import gpt2onnx
from gpt2onnx.batch import run_batch

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

out = {}
if job["kind"] == "steps":
    from gpt2onnx._scheduler import run
    gen = gpt2onnx.load(job["model"], threads=1, verify_hashes=False, **job.get("load", {}))
    reqs = [gen.prepare(r["prompt"], max_new_tokens=r["max_new_tokens"], ignore_eos=True)
            for r in map(json.loads, open(job["input"]))]
    rows = (gen._row(i, r) for i, r in enumerate(reqs))
    last, gaps, texts = {}, [], {}
    c0 = cpu()
    for seq, tok, reason, piece in run(gen._engine, [], rows, slots=8, max_len=gen.n_positions,
                                       eos_token_id=gen.eos_token_id):
        now = cpu()
        if seq.index in last:
            gaps.append(now - last[seq.index])
        last[seq.index] = now
        texts[seq.index] = texts.get(seq.index, "") + piece
    out = {"cpu_s": cpu() - c0, "gaps_ms": [1e3 * g for g in gaps],
           "texts": "\x00".join(texts[i] for i in range(len(reqs)))}
else:
    kw = {} if job.get("prefix_cache_mb") is None else {"prefix_cache_mb": job["prefix_cache_mb"]}
    c0, t0 = cpu(), time.perf_counter()
    s = run_batch(job["model"], job["input"], job["output"], batch_size=8, threads=1, progress=False, **kw)
    out = {"cpu_s": cpu() - c0, "wall_s": time.perf_counter() - t0, "tokens": s.tokens,
           "prefix": [getattr(s, "prefix_cache_" + k, None) for k in ("hits", "misses", "saved_tokens")],
           "texts": "\x00".join(json.loads(l)["text"] for l in open(job["output"]))}
out["peak_rss_mb"] = peak_mb()
print(json.dumps(out))
"""


def child(tree: str, job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if os.path.exists(job.get("output", "")):
        os.remove(job["output"])
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, env=env,
                       cwd=tempfile.gettempdir())
    if p.returncode:
        raise RuntimeError(f"{tree} {job['kind']}: {p.stderr.strip().splitlines()[-1]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["texts"] = hashlib.sha256(out["texts"].encode()).hexdigest()[:16]
    return out


def write_inputs(model: str, folder: str, prompts: int) -> dict[str, str]:
    from gpt2onnx import artifact, tokenizer
    from gpt2onnx.bench.jobbench import job_requests

    dims = artifact.read_manifest(model).dims
    tok = tokenizer.load(model, vocab_size=dims.vocab_size)
    paths = {}
    for kind in ("mixed", "uniform", "shared"):
        paths[kind] = os.path.join(folder, f"{kind}.jsonl")
        with open(paths[kind], "w", encoding="utf-8") as f:
            for r in job_requests(tok, prompts=prompts, n_positions=dims.n_positions, kind=kind):
                f.write(json.dumps(r) + "\n")
    return paths


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--a", required=True, help="source tree A (before)")
    ap.add_argument("--b", required=True, help="source tree B (after)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--jobs", default="mixed,uniform,steps,shared,shared-nocache")
    ap.add_argument("--b-load", default="{}", help="B's extra gpt2onnx.load keywords for steps, as JSON")
    ap.add_argument("--out", help="write every run as JSON here")
    a = ap.parse_args(argv)
    jobs = a.jobs.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpt2onnx-ab-") as d:
        inputs = write_inputs(a.model, d, a.prompts)
        for r in range(a.rounds):
            for job in jobs:
                for name, tree in (("A", a.a), ("B", a.b)):
                    if job.startswith("shared") and name == "A":
                        continue
                    spec = {"kind": job, "model": a.model, "output": os.path.join(d, f"out-{name}.jsonl"),
                            "input": inputs["shared" if job.startswith("shared") else
                                            "uniform" if job == "uniform" else "mixed"]}
                    if job == "shared-nocache":
                        spec["prefix_cache_mb"] = 0
                    if job == "steps" and name == "B":
                        spec["load"] = json.loads(a.b_load)
                    out = child(tree, spec)
                    out.update(round=r, job=job, tree=name)
                    runs.append(out)
                    print(json.dumps({k: v for k, v in out.items() if k != "gaps_ms"}), file=sys.stderr, flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(runs, f)
    for job in jobs:
        for name in ("A", "B"):
            sel = [x for x in runs if x["job"] == job and x["tree"] == name]
            if not sel:
                continue
            line = f"{job:<15} {name}: cpu {statistics.median(x['cpu_s'] for x in sel):8.1f} s"
            if "tokens" in sel[0]:
                line += f"  {statistics.median(x['tokens'] / x['cpu_s'] for x in sel):7.1f} tok/cpu-s"
            if "gaps_ms" in sel[0]:
                g = [v for x in sel for v in x["gaps_ms"]]
                line += f"  per-token cpu ms median {pct(g, 50):.1f} p99 {pct(g, 99):.1f} ({pct(g, 99) / pct(g, 50):.2f}x)"
            line += f"  peak RSS {max(x['peak_rss_mb'] for x in sel):.0f} MB  texts {sorted({x['texts'] for x in sel})}"
            if sel[0].get("prefix") and sel[0]["prefix"][0] is not None:
                line += f"  prefix {sel[0]['prefix']}"
            print(line)
        pair = [(x, y) for x in runs for y in runs if x["job"] == y["job"] == job and x["round"] == y["round"]
                and x["tree"] == "A" and y["tree"] == "B"]
        if pair:
            print(f"{job:<15} A cpu / B cpu per round: " + ", ".join(f"{x['cpu_s'] / y['cpu_s']:.3f}" for x, y in pair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
