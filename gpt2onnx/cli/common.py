"""What several commands share: the generation-parameter flags."""

from __future__ import annotations

import argparse
import json

from ..errors import InvalidRequestError


def param_overrides(a) -> dict:
    """CLI flags and --params JSON -> GenerationParams keys (flags win)."""
    out = {}
    if getattr(a, "params", None):
        try:
            out = json.loads(a.params)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"--params is not valid JSON ({e.msg}); pass e.g. '{{\"top_p\": 0.9}}'") from None
        if not isinstance(out, dict):
            raise InvalidRequestError("--params must be a JSON object, e.g. '{\"top_p\": 0.9}'")
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if getattr(a, key, None) is not None:
            out[key] = getattr(a, key)
    if getattr(a, "do_sample", False):
        out["do_sample"] = True
    if getattr(a, "stop", None):
        out["stop"] = a.stop
    if getattr(a, "ignore_eos", False):
        out["ignore_eos"] = True
    if getattr(a, "truncation", False):
        out["truncation"] = True
    return out


def add_param_flags(p: argparse.ArgumentParser) -> None:
    """The generation flags; an unset flag means GenerationParams' default, which --help shows."""
    from ..params import GenerationParams

    d = GenerationParams()
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int,
                   help=f"tokens to generate (default: {d.max_new_tokens})")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help=f"sampling temperature; 0 = greedy (default: {d.temperature})")
    p.add_argument("--top-k", dest="top_k", type=int, help=f"sample from the k likeliest; 0 = off (default: {d.top_k})")
    p.add_argument("--top-p", dest="top_p", type=float, help=f"nucleus sampling mass (default: {d.top_p})")
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float,
                   help=f"penalty of tokens already seen; 1 = none (default: {d.repetition_penalty})")
    p.add_argument("--seed", type=int, help="sampling seed (default: fresh entropy)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_new_tokens")
    p.add_argument("--truncation", action="store_true", help="drop prompt tokens from the left to fit the context")
    p.add_argument("--params", metavar="JSON", help="generation parameters as JSON (Hugging Face names)")
