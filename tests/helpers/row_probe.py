"""The whole-graph row probe: does a row's output depend on its company? (issue #21)

One target row runs alone and beside 1-4 partner rows (first or last in the batch), with
prompts of 1-33 tokens: the prefill, then decode steps, through the runtime's own `Batch`
with the even-M rule switched off (``Engine.pairs = False``), so every M the graph can see
is tried. Partners either share the target's length (one batched prefill, M = rows x
tokens) or have other lengths (prefilled one by one, then decoded together). The target
is fed the same tokens in both runs; its logits must be equal bit for bit, at every step.

    python tests/helpers/row_probe.py MODEL_DIR [--threads 1,2] [--lengths 1-33] [--steps 3]

prints the number of cases and lists those where a bit differed (exit status 1 if any).
`probe` is the same from Python (tests/runtime/test_qgemm_rows.py).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np


def _run(engine, prompts: list[list[int]], target: int, steps: int, forced: list[int] | None):
    """The target row's logits at the prefill and each decode step, and the tokens it was fed."""
    from gpt2onnx._engine import Batch

    batch = Batch(engine, slots=len(prompts), max_len=max(map(len, prompts)) + steps + 1)
    logits = batch.prefill(list(range(len(prompts))), prompts)
    out, fed = [logits[target].copy()], []
    for i in range(steps):
        tokens = logits.argmax(-1)
        tokens[target] = forced[i] if forced else tokens[target]
        fed.append(int(tokens[target]))
        logits = batch.decode(tokens)
        out.append(logits[target].copy())
    return out, fed


def probe(model_dir: str, *, threads=(1, 2), lengths=range(1, 34), partners=(1, 2, 3, 4), steps: int = 3,
          seed: int = 0) -> tuple[int, list[dict]]:
    """(cases run, cases where the target row's logits differ alone vs in company)."""
    from gpt2onnx._engine import Engine
    from gpt2onnx.artifact import read_manifest

    manifest = read_manifest(model_dir)
    rng = np.random.default_rng(seed)
    vocab = min(manifest.dims.vocab_size, 50000)
    cases, bad = 0, []
    for t in threads:
        engine = Engine(model_dir, manifest, threads=t)
        engine.pairs = False  # every M: the probe is what decides whether the graph needs pairs
        for s in lengths:
            target = rng.integers(0, vocab, s).tolist()
            alone, fed = _run(engine, [target], 0, steps, None)
            for n, where, mix in itertools.product(partners, ("first", "last"), ("same", "mixed")):
                others = [rng.integers(0, vocab, s if mix == "same" else int(rng.integers(1, 34))).tolist()
                          for _ in range(n)]
                rows = [target] + others if where == "first" else others + [target]
                idx = 0 if where == "first" else n
                got, _ = _run(engine, rows, idx, steps, fed)
                cases += 1
                diff = [i for i, (a, b) in enumerate(zip(alone, got)) if not np.array_equal(a, b)]
                if diff:
                    bad.append({"threads": t, "tokens": s, "partners": n, "where": where, "lengths": mix,
                                "steps_differing": diff,
                                "max_abs": float(max(np.abs(alone[i] - got[i]).max() for i in diff))})
    return cases, bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--lengths", default="1-33", help="prompt lengths, FIRST-LAST")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    lo, hi = (int(x) for x in a.lengths.split("-"))
    cases, bad = probe(a.model_dir, threads=[int(x) for x in a.threads.split(",")], lengths=range(lo, hi + 1),
                       steps=a.steps)
    for b in bad:
        print(b)
    print(f"{len(bad)} of {cases} cases differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
