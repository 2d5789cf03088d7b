"""CPU-time comparison of model folders (e.g. fp32 vs int8 KV cache), robust to a loaded machine.

Each measurement runs in a fresh process at 1 thread and reads `time.process_time`, so other
jobs on the machine slow the wall clock but hardly the figures; folders alternate within
each round (interleaved rounds), medians are reported. Scenarios:

- b1: one 32-token prompt, 128 new tokens: first token (prefill) and decode CPU ms/token;
- b8: 8 x 128-token prompts, 128 new tokens: first token, decode CPU ms/step, tokens/s
  (1024 tokens / the CPU time of the whole generate) and the process's peak RSS (ru_maxrss).

    nice -n 19 python bench/kv_cache_cpu.py models/int8-kvfp32 models/int8-kvint8 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from importlib import resources


def child(folder: str, scenario: str) -> dict:
    import resource
    import time

    import gpt2onnx

    gen = gpt2onnx.load(folder, threads=1, verify_hashes=False)
    ids = gen.tokenizer.encode((resources.files("gpt2onnx") / "data" / "gate_text.txt").read_text("utf-8")).ids

    def req(start: int, n: int, new: int):
        r = gen.prepare("x", max_new_tokens=new, ignore_eos=True, do_sample=False)
        return dataclasses.replace(r, input_ids=tuple(ids[start:start + n]))

    rows, plen = (1, 32) if scenario == "b1" else (8, 128)
    list(gen.stream_batch([req(5000 + 40 * i, 16, 4) for i in range(min(rows, 2))]))  # warm-up, small
    stamps = []
    t0 = time.process_time()
    for row, _ in gen.stream_batch([req(300 * i, plen, 128) for i in range(rows)]):
        if row == 0:
            stamps.append(time.process_time())
    total = time.process_time() - t0
    return {"first_token_ms": 1e3 * (stamps[0] - t0), "decode_ms": 1e3 * (stamps[-1] - stamps[0]) / (len(stamps) - 1),
            "tokens_per_s": rows * 128 / total, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kv_cache": gen.manifest.kv_cache.dtype}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "SCENARIO"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    import statistics

    runs: dict = {}
    for r in range(a.rounds):
        order = a.folders if r % 2 == 0 else a.folders[::-1]
        for folder in order:
            for scenario in ("b1", "b8"):
                out = subprocess.run([sys.executable, __file__, "x", "--child", folder, scenario], check=True,
                                     capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                runs.setdefault((folder, scenario), []).append(res)
                print(r, folder, scenario, json.dumps(res), file=sys.stderr, flush=True)
    for (folder, scenario), rs in runs.items():
        med = {k: round(statistics.median(x[k] for x in rs), 2) for k in rs[0] if k != "kv_cache"}
        print(json.dumps({"folder": folder, "scenario": scenario, "kv_cache": rs[0]["kv_cache"], "runs": len(rs),
                          **med}))


if __name__ == "__main__":
    main()
