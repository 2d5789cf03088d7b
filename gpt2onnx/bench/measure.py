"""What every benchmark process shares: the prompts, the timing of one run, peak RSS, the source model.

>>> Timing
tuple[float, list[float], float]

`gpt2onnx.bench.worker` (one measurement per process), `ovgenai` (the OpenVINO GenAI
baseline inside a worker) and `jobbench` (the batch-job scenario) take these from here, so
that no two of them import each other.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

PROMPT_SEED = 1234  # prompts are the same in every process and run

# Timed separately for one repeat: t0 before tokenizing, a timestamp as each step's
# tokens appear, t_end after generation returns.
Timing = tuple[float, list[float], float]


def single_token_words(tok) -> list[str]:
    """Words that the tokenizer encodes, with their leading space, as exactly one token."""
    vocab = tok.get_vocab()
    cands = sorted(t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha())
    out = []
    for w in cands:
        if len(tok.encode(" " + w).ids) == 1:
            out.append(w)
        if len(out) >= 256:
            break
    return out


def make_prompts(tok, *, n_tokens: int, batch: int, seed: int = PROMPT_SEED) -> list[str]:
    """`batch` deterministic random prompts of exactly `n_tokens` tokens each.

    Each prompt is a random sequence of single-token words (" the", " of", ...), so
    its text re-encodes to exactly one token per word in every runtime.
    """
    words = single_token_words(tok)
    if not words:
        raise RuntimeError("the tokenizer has no single-token words to build prompts from")
    import numpy as np

    prompts = []
    for row in range(batch):
        rng = np.random.default_rng(seed + row)
        text = "".join(" " + words[i] for i in rng.integers(0, len(words), n_tokens))
        got = len(tok.encode(text).ids)
        if got != n_tokens:
            raise RuntimeError(f"prompt of row {row} encodes to {got} tokens, not {n_tokens}")
        prompts.append(text)
    return prompts


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    Linux: VmHWM, the high-water mark of this process's own memory. Not ru_maxrss:
    a child that subprocess starts with vfork + exec inherits the parent's peak in
    ru_maxrss (the parent holds the 1 GiB bandwidth array, and its own imports).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def measure(job: dict, tokenize: Callable[[], object], once: Callable[[], Timing]) -> dict:
    """Warm up, then time `repeats` runs; raw samples (the parent takes percentiles)."""
    for _ in range(job["warmup"]):
        once()
    tok_ms, first, steps, totals = [], [], [], []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        tokenize()
        tok_ms.append(1e3 * (time.perf_counter() - t))
        t0, stamps, t_end = once()
        if len(stamps) != job["new_tokens"]:
            raise RuntimeError(f"generated {len(stamps)} steps, expected {job['new_tokens']}")
        first.append(1e3 * (stamps[0] - t0))
        steps += [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
        totals.append(t_end - t0)
    return {"tokenize_ms": tok_ms, "first_token_ms": first, "step_ms": steps, "total_s": totals}


def load_source(spec: dict):
    from .. import sources

    return sources.load(spec["id"], random_weights=spec["random_weights"], seed=spec["seed"] or 0)
