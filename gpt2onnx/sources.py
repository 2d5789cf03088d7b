"""Where an export starts: a hub id, a local `save_pretrained` folder, or random weights.

This module imports torch and transformers (the ``[export]`` extra); the runtime never
imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ModelDownloadError, UnsupportedModelError, first_line

# The published GPT-2 sizes. Their configs are written here so `--random-weights`
# needs no network: all share vocab 50257 and context 1024.
KNOWN = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}
PREFIXES = ("openai-community/", "distilbert/")
# How messages name the random-weights option: the Python argument (the CLI rewords it as
# its --random-weights flag, see `cli_hint`).
RANDOM_WEIGHTS_HINT = "random_weights=True"
RANDOM_WEIGHTS_FLAG = "--random-weights"


def cli_hint(message: str) -> str:
    """A message of this module as the command line says it (its flag, not the Python argument).

    >>> cli_hint("pass random_weights=True to benchmark")
    'pass --random-weights to benchmark'
    """
    return message.replace(RANDOM_WEIGHTS_HINT, RANDOM_WEIGHTS_FLAG)


@dataclass
class Source:
    """A loaded source model (torch) and where it came from."""

    model: Any  # transformers.GPT2LMHeadModel, fp32, eval mode
    config: Any  # transformers.GPT2Config
    name: str  # "gpt2", "gpt2-medium", ... or the folder's name
    kind: str  # "hub", "local" or "random"
    id: str  # what the user passed
    revision: str | None  # the hub commit, when known
    random_weights: bool
    seed: int | None
    folder: str | None  # local folder (for its tokenizer files), if any


def hub_name(source: str) -> str | None:
    """'openai-community/gpt2' -> 'gpt2'; None when `source` is not a known GPT-2 id."""
    s = source
    for p in PREFIXES:
        if s.startswith(p):
            s = s[len(p):]
    return s if s in KNOWN else None


def _check_config(config, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt2":
        raise UnsupportedModelError(
            f"{where} is a {model_type or 'unknown'!s} model, not GPT-2; gpt2onnx exports only GPT-2 "
            "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 and fine-tunes of them)"
        )


def _read_local_config(folder: str):
    from transformers import GPT2Config

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UnsupportedModelError(f"{folder!r} has no config.json; pass a folder written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path} is not valid JSON ({e.__class__.__name__}); re-save the model") from None
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{path} is not a model config; re-save the model with save_pretrained")
    config = GPT2Config.from_dict(raw) if raw.get("model_type") == "gpt2" else None
    if config is None:
        _check_config(type("C", (), {"model_type": raw.get("model_type")})(), repr(folder))
    return config


def _check_hub_reachable(source: str) -> None:
    """Fail in seconds, not after minutes of retries, when the Hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        raise ModelDownloadError(
            f"{source!r} is not in the local Hugging Face cache and {url.hostname} cannot be reached; "
            f"pass a local save_pretrained folder, or {RANDOM_WEIGHTS_HINT} to benchmark without weights"
        ) from None


def load(source: str, *, random_weights: bool = False, seed: int = 0) -> Source:
    """Load a GPT-2 in fp32 for export.

    Args:
        source: a hub id (``gpt2`` ... ``gpt2-xl``, ``distilgpt2``, optionally with the
            ``openai-community/`` prefix) or a local folder written by ``save_pretrained``.
        random_weights: build the architecture with seeded random weights instead of
            loading weights (for benchmarking where the weights are not available).
        seed: the seed of the random weights.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    source = os.fspath(source)
    name = hub_name(source)
    is_dir = os.path.isdir(source)
    if not is_dir and name is None:
        if os.path.sep in source or source.startswith("."):
            raise UnsupportedModelError(f"source folder {source!r} does not exist; pass a save_pretrained folder "
                                        "or one of: " + ", ".join(KNOWN))
        raise UnsupportedModelError(
            f"unknown source {source!r}: pass a local save_pretrained folder or a GPT-2 hub id "
            f"({', '.join(KNOWN)})"
        )
    if random_weights:
        config = _read_local_config(source) if is_dir else GPT2Config(**KNOWN[name])
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
        return Source(model, config, name or os.path.basename(os.path.abspath(source)),
                      "random", source, None, True, seed, source if is_dir else None)
    if is_dir:
        config = _read_local_config(source)
        if not any(os.path.isfile(os.path.join(source, f)) for f in
                   ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")):
            raise UnsupportedModelError(
                f"{source!r} has a config but no weights (model.safetensors or pytorch_model.bin); "
                f"save the model with save_pretrained, or pass {RANDOM_WEIGHTS_HINT}"
            )
    try:
        if not is_dir:
            from transformers import AutoConfig

            try:  # a model already in the local Hugging Face cache needs no network
                config = AutoConfig.from_pretrained(source, local_files_only=True)
                local_only = True
            except OSError:
                _check_hub_reachable(source)
                config, local_only = AutoConfig.from_pretrained(source), False
            _check_config(config, repr(source))
        model = GPT2LMHeadModel.from_pretrained(source, config=config, torch_dtype=torch.float32,
                                                local_files_only=not is_dir and local_only).eval()
    except UnsupportedModelError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        where = "local folder" if is_dir else "Hugging Face Hub"
        error = UnsupportedModelError if is_dir else ModelDownloadError
        raise error(
            f"could not load {source!r} from the {where} ({first_line(e)}); "
            f"pass a local save_pretrained folder, or {RANDOM_WEIGHTS_HINT} to benchmark without weights"
        ) from None
    revision = getattr(config, "_commit_hash", None)
    return Source(model, config, name or os.path.basename(os.path.abspath(source)),
                  "local" if is_dir else "hub", source, revision, False, None, source if is_dir else None)


def numpy_weights(model) -> dict:
    """The model's parameters as float32 numpy arrays, named without the `transformer.` prefix.

    The arrays share memory with the torch tensors (no copy).
    """
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of older checkpoints, not weights
        out[k.removeprefix("transformer.")] = v.detach().float().numpy()
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["wte.weight"]
    return out
