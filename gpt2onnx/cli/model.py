"""The model commands: ``export``, ``inspect``, ``generate``."""

from __future__ import annotations

import json
import sys

from .common import add_param_flags, param_overrides


def _export(a) -> int:
    from ..artifact import summary
    from ..errors import ModelDownloadError, UnsupportedModelError
    from ..exporter import export
    from ..sources import cli_hint

    try:  # --random-weights-fallback: the export itself falls back at its load step (its steps counted once)
        m = export(a.source, a.outdir, precision=a.precision, force=a.force, random_weights=a.random_weights,
                   seed=a.seed, tokenizer=a.tokenizer, progress=not a.quiet,
                   accept_fidelity_miss=a.accept_fidelity_miss, kv_cache=a.kv_cache,
                   random_weights_fallback=a.random_weights_fallback)
    except ModelDownloadError as e:
        raise ModelDownloadError(cli_hint(str(e))) from None
    except UnsupportedModelError as e:
        raise type(e)(cli_hint(str(e))) from None
    print(summary(m))
    print(f"wrote {a.outdir} in {m.export_seconds:.1f} s")
    return 0


def _inspect(a) -> int:
    from ..artifact import SELF_HASH, summary, verify

    m = verify(a.model_dir, check_hashes=not a.no_hash)
    if a.json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        print(summary(m))
        print("files      all present" + (", sizes and sha256 verified" if not a.no_hash else ", sizes verified"))
        own = ", its own sha256 verified" if SELF_HASH in m.raw else " (no manifest_sha256: an older export)"
        print(f"manifest   agrees with config.json and model.onnx{own}")
    return 0


def _generate(a) -> int:
    import time

    from ..params import GenerationParams
    from ..runtime import load

    t0 = time.perf_counter()
    gen = load(a.model_dir, threads=a.threads)
    load_s = time.perf_counter() - t0
    params = GenerationParams.from_dict(param_overrides(a))
    random = gen.manifest.source.random_weights
    if random and not a.json:
        print("note: this model has RANDOM WEIGHTS; the text is meaningless (benchmarking only)", file=sys.stderr)
    t1 = time.perf_counter()
    first = None
    if a.stream and not a.json:
        steps = gen.generate_tokens(a.prompt, params)  # a bad prompt fails here, before anything is printed
        if params.return_full_text:
            print(a.prompt, end="", flush=True)
        n, reason = 0, None
        for step in steps:
            first = first or time.perf_counter()
            n += 1
            reason = step.finish_reason
            print(step.text, end="", flush=True)
        print()
    else:
        r = gen.generate(a.prompt, params)[0]
        n, reason = r.generated_tokens, r.finish_reason
        if a.json:
            print(json.dumps({"text": r.text, "token_ids": list(r.token_ids), "prompt_tokens": r.prompt_tokens,
                              "generated_tokens": n, "finish_reason": reason, "random_weights": bool(random)}))
        else:
            print(r.text)
    total = time.perf_counter() - t1
    if a.timing:
        ttft = f"first token {1e3 * (first - t1):.0f} ms, " if first else ""
        print(f"[{gen.manifest.precision} {gen.manifest.name}, {gen.threads} threads] load {load_s:.2f} s, "
              f"{ttft}{n} tokens in {total:.2f} s = {n / total:.1f} tokens/s "
              f"({1e3 * total / max(n, 1):.1f} ms/token incl. prompt), finish: {reason}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """Register ``export``, ``inspect`` and ``generate``."""
    e = sub.add_parser("export",
                       help="export GPT-2 to an ONNX model folder (fp32, int8 or int4), verified against PyTorch")
    e.add_argument("source", help="hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) or save_pretrained folder")
    e.add_argument("outdir", help="model folder to create")
    e.add_argument("--precision", choices=("fp32", "int8", "int4"), default="fp32", help="weight precision of the graph")
    e.add_argument("--kv-cache", choices=("auto", "fp32", "int8"), default="auto",
                   help="KV cache precision: int8 quarters the cache and speeds up batched decode (static "
                        "per-channel scales calibrated on real text, gated like a quantized precision; its "
                        "past/present tensors are then int8); auto = int8 for int8/int4 weights when it passes "
                        "the gate, else fp32")
    e.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    e.add_argument("--random-weights", action="store_true",
                   help="seeded random weights instead of loading them (benchmarks only: the text is meaningless)")
    e.add_argument("--random-weights-fallback", action="store_true",
                   help="when the weights of a hub id cannot be downloaded, say so and use --random-weights")
    e.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    e.add_argument("--tokenizer", metavar="DIR", help="folder with vocab.json + merges.txt or tokenizer.json")
    e.add_argument("--accept-fidelity-miss", action="store_true",
                   help="keep an int8/int4 (or int8 KV cache) export that misses its fidelity gate "
                        "(recorded in the manifest and card)")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.set_defaults(func=_export)

    i = sub.add_parser("inspect", help="print a model folder's manifest summary and verify its files")
    i.add_argument("model_dir")
    i.add_argument("--no-hash", action="store_true", help="check sizes only, skip sha256")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=_inspect)

    g = sub.add_parser("generate", help="generate text for a prompt")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    add_param_flags(g)
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.add_argument("--timing", action="store_true", help="print a latency line on stderr")
    g.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    g.set_defaults(func=_generate)
