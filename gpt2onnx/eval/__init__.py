"""Measure a model folder: WikiText-2 perplexity, LAMBADA, fidelity against fp32.

For example::

    from gpt2onnx.eval import evaluate
    evaluate("out/gpt2-int8", "wikitext2")["ppl"]
    evaluate("out/gpt2-int8", "lambada", limit=500)["accuracy"]
    evaluate("out/gpt2-int8", "fidelity", reference="out/gpt2-fp32")

``wikitext2`` and ``lambada`` need only the runtime (onnxruntime + numpy + tokenizers):
each window or passage is one run of the model folder's session from an empty cache,
with ``logits_to_keep`` set to the positions scored. ``fidelity`` compares with a
reference model: another model folder (runtime only) or a PyTorch source (imports torch).
The definitions, and where to get the data files, are in docs/quality.md.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import DataError, Gpt2OnnxError, InvalidRequestError
from ..graphio import open_folder
from . import fidelity
from .data import (DATA_ENV, LAMBADA_FILE, WIKITEXT2_FILE, data_info, data_path, read_lambada, read_text,
                   wikitext2_text)
from .tasks import lambada, perplexity, token_byte_lengths
from .gate import gate_text

TASKS = ("wikitext2", "lambada", "fidelity")
STRIDE = 512  # the Hugging Face perplexity guide's stride (for a 1024-token context)
MAX_LENGTH = 1024  # longest window, even for models with a longer context
FIDELITY_PROMPTS = 16  # greedy-continuation prompts of the fidelity task
GATE_TEXT = "gpt2onnx/data/gate_text.txt"  # fidelity's text without --data: the exporter's gate text, shipped
# `gpt2onnx eval`'s --limit when none is given (the Python API scores everything): what a
# first look needs in about a minute on 2 cores at 124M; --limit 0 scores all (docs/quality.md).
DEFAULT_LIMITS = {"wikitext2": 20, "lambada": 500, "fidelity": 4}  # fidelity: the gate's GATE_WINDOWS


def fidelity_verdict(figures: dict, manifest, vocab_size: int) -> list[str]:
    """What missed the gate, by the exporter's own rule (`gpt2onnx.eval.gate`): one model, one verdict.

    For example::

        fidelity_verdict(figures, gen.manifest, gen.vocab_size)   # -> []
    """
    return fidelity_gate(figures, manifest, vocab_size)[2]


def fidelity_gate(figures: dict, manifest, vocab_size: int) -> tuple[dict, str, list[str]]:
    """(thresholds applied, why those, what missed them), by the exporter's `gate_for` + `check`."""
    from .gate import check, gate_for

    gate, why = gate_for(figures, vocab_size, manifest.source.random_weights, manifest.precision)
    return gate, why, check(figures, gate)


ARCHITECTURE = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")  # a reference must match all


def _same_model(ref_dims: dict, dims, reference: str, model_dir: str) -> None:
    """Refuse a reference of another architecture (a distilgpt2 for a gpt2, say): its figures mean nothing."""
    diff = [f"{k} {ref_dims[k]} vs {getattr(dims, k)}" for k in ARCHITECTURE if ref_dims[k] != getattr(dims, k)]
    if diff:
        raise InvalidRequestError(
            f"the fidelity reference {reference!r} is another model than {model_dir!r} ({', '.join(diff)}, "
            "reference vs model); pass the model's own fp32 export or the source it was exported from")


def _check_limit(limit) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidRequestError(f"limit must be a positive integer, got {limit!r}")


def _reference(reference: str | None, manifest, threads: int | None):
    """(session, description, architecture dims) of the fidelity reference."""
    from ..artifact import MANIFEST

    if reference is not None and os.path.isfile(os.path.join(os.fspath(reference), MANIFEST)):
        ref = open_folder(reference, threads)
        desc = {"reference": os.path.abspath(reference), "reference_precision": ref.manifest.precision}
        return ref.session, desc, {k: getattr(ref.manifest.dims, k) for k in ARCHITECTURE}
    from .. import sources

    src_info = manifest.source
    random_weights, seed = False, 0
    if reference is None:
        if not src_info.id:
            raise InvalidRequestError("the model folder does not record its source; pass --reference SOURCE_OR_DIR")
        reference = src_info.id
        random_weights, seed = src_info.random_weights, int(src_info.seed or 0)
    try:
        import torch
    except ImportError:
        raise InvalidRequestError("a PyTorch reference needs torch and transformers (pip install 'gpt2onnx[export]'); "
                                  "or pass --reference with an fp32 model folder") from None
    if threads:
        torch.set_num_threads(threads)
    try:
        src = sources.load(reference, random_weights=random_weights, seed=seed)
    except Gpt2OnnxError as e:
        raise type(e)(f"fidelity reference: {e}") from None
    desc = {"reference": reference, "reference_precision": "fp32 (PyTorch)",
            "reference_random_weights": random_weights}
    return fidelity.TorchSession(src.model), desc, {k: int(getattr(src.config, k)) for k in ARCHITECTURE}


def evaluate(model_dir: str, task: str, *, data: str | None = None, reference: str | None = None,
             limit: int | None = None, progress: bool = True, threads: int | None = None) -> dict:
    """Evaluate a model folder on one task.

    Args:
        model_dir: a folder written by ``gpt2onnx export``.
        task: ``"wikitext2"`` (perplexity on the WikiText-2 raw test set), ``"lambada"``
            (last-word accuracy and perplexity on OpenAI's LAMBADA test set) or
            ``"fidelity"`` (agreement with an fp32 reference on WikiText-2).
        data: the data file (default: ``wiki.test.raw`` / ``lambada_test.jsonl`` in
            the folder ``$GPT2ONNX_DATA`` names, else in ``.``; fidelity: the shipped
            text of the exporter's gate, `GATE_TEXT`).
        reference: fidelity only: an fp32 model folder, or a PyTorch source (hub id or
            save_pretrained folder; imports torch). Default: the source recorded in the
            model folder's manifest (random weights re-made from their seed).
        limit: the first `limit` windows (wikitext2, fidelity) or passages (lambada).
        progress: show a progress bar on stderr.
        threads: intra-op threads (default: the runtime's default).

    Returns:
        A JSON-ready dict: the task's figures plus ``task``, ``model``, ``precision``,
        ``data``, ``data_sha256``, ``seconds``.

    Raises:
        DataError: the data file is missing or malformed.
        ArtifactError: the model folder is damaged.

    For example::

        r = evaluate("out/gpt2", "wikitext2", limit=8, progress=False)
        sorted(r)[:3]   # -> ['bits_per_byte', 'bytes_scored', 'data']
    """
    if task not in TASKS:
        raise InvalidRequestError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    _check_limit(limit)
    name = LAMBADA_FILE if task == "lambada" else WIKITEXT2_FILE
    gate = task == "fidelity" and data is None  # the shipped gate text: nothing to download
    path = None if gate else data_path(name, data)
    t0 = time.perf_counter()
    gen = open_folder(model_dir, threads)
    m = gen.manifest
    n_positions = m.dims.n_positions
    out = {"task": task, "model": os.path.abspath(os.fspath(model_dir)), "precision": m.precision,
           "kv_cache": m.kv_cache.dtype, "random_weights": m.source.random_weights}
    out.update(gate_text_info() if gate else data_info(name, path))
    if task == "lambada":
        texts = read_lambada(path)[:limit]
        out.update(lambada(gen.session, gen.tokenizer, texts, n_positions=n_positions,
                           bos_token_id=m.bos_token_id, progress=progress))
    else:
        text = gate_text() if gate else wikitext2_text(read_text(path))
        ids = np.asarray(gen.tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
        if task == "wikitext2":
            max_length = min(n_positions, MAX_LENGTH)
            lengths = token_byte_lengths(gen.tokenizer)
            if int(lengths[ids].sum()) != len(text.encode("utf-8")):
                lengths = None  # not a byte-level BPE: bytes per token unknown
            out.update(perplexity(gen.session, ids, max_length=max_length, stride=min(STRIDE, max_length // 2),
                                  limit=limit, token_bytes=lengths, progress=progress))
        else:
            ref, desc, ref_dims = _reference(reference, m, threads)
            _same_model(ref_dims, m.dims, str(desc["reference"]), os.fspath(model_dir))
            window = min(n_positions, ref_dims["n_positions"], MAX_LENGTH)
            out.update(desc)
            from .gate import DECISIVE_MARGIN

            out.update(fidelity.measure(ref, gen.session, ids, window=window, stride=window // 2, limit=limit,
                                        progress=progress, margin=DECISIVE_MARGIN))
            plen = min(64, window // 4)
            prompts = fidelity.spaced_prompts(ids, count=FIDELITY_PROMPTS, length=plen)
            out.update(fidelity.greedy_agreement(ref, gen.session, prompts, new_tokens=min(32, window - plen)))
            out["gate"], out["gated"], out["gate_missed"] = fidelity_gate(out, m, m.dims.vocab_size)
            out["window"], out["stride"] = window, window // 2
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def gate_text_info() -> dict:
    """The `data` fields of a result on the shipped gate text (as the exporter reads it)."""
    import hashlib

    return {"data": GATE_TEXT, "data_sha256": hashlib.sha256(gate_text().encode("utf-8")).hexdigest(),
            "data_is_original": None, "data_shipped": True}


def format_result(r: dict) -> str:
    """A few human-readable lines for an `evaluate` result."""
    head = f"{r['task']}  {r['model']} ({r['precision']}{', RANDOM WEIGHTS' if r.get('random_weights') else ''})"
    original = {True: "original file", False: "NOT the original file (sha256 differs)", None: "sha256 not checked"}
    where = "shipped with gpt2onnx: the WikiText-2 test tail the exporter gates on" if r.get("data_shipped") else \
        original[r["data_is_original"]]
    lines = [head, f"data       {r['data']} ({where})"]
    if r["task"] == "wikitext2":
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a"
        lines += [f"perplexity {r['ppl']:.4f} (Hugging Face guide accounting; every token once: {r['ppl_exact']:.4f})",
                  f"bits/byte  {bpb}",
                  f"scored     {r['tokens_scored']:,} of {r['tokens_total']:,} tokens in {r['windows']} windows "
                  f"(length {r['max_length']}, stride {r['stride']})"]
    elif r["task"] == "lambada":
        lines += [f"accuracy   {r['accuracy']:.4f} ({r['correct']} of {r['passages']} passages, greedy whole word)",
                  f"perplexity {r['ppl_word']:.3f} per word, {r['ppl_token']:.3f} per target token"
                  + (f" ({r['truncated']} contexts truncated)" if r["truncated"] else "")]
    else:
        gate = "passed" if not r["gate_missed"] else "MISSED: " + "; ".join(r["gate_missed"])
        if r.get("gated"):  # which gate applied: the exporter's, chosen for this model
            limits = ", ".join(f"top1_agreement >= {v}" if k == "top1_agreement" else f"mean_kl <= {v}"
                               if k == "mean_kl" else f"{k} within [{1 / v:.4g}, {v}]" for k, v in r["gate"].items())
            gate += f" (the exporter's gate, {r['gated']}: {limits})"
        lines += [f"reference  {r['reference']} ({r['reference_precision']})",
                  f"top-1      {r['top1_agreement']:.4f} agreement over {r['positions']:,} positions; "
                  + (f"{r['decisive_top1_agreement']:.4f}" if r.get("decisive_top1_agreement") is not None else "n/a")
                  + f" on the {r.get('decisive_share', 0):.1%} decisive ones (fp32 margin >= "
                  f"{r.get('decisive_margin', 0):g} nats)",
                  f"KL         mean {r['mean_kl']:.3g}, p99 {r['p99_kl']:.3g}, max {r['max_kl']:.3g} nats "
                  "(ref || model)",
                  f"perplexity {r['ppl']:.4f} vs {r['ppl_ref']:.4f} (ratio {r['ppl_ratio']:.4f})",
                  f"greedy     {r['greedy_identical']:.3f} of {r['greedy_prompts']} continuations identical "
                  f"({r['greedy_new_tokens']} tokens), mean matching prefix {r['greedy_prefix_mean']:.1f}",
                  f"{r['precision'] + ' gate':<10} {gate}"]
    lines.append(f"time       {r['seconds']:.1f} s")
    return "\n".join(lines)




__all__ = ["DATA_ENV", "LAMBADA_FILE", "TASKS", "WIKITEXT2_FILE", "DataError", "data_path", "evaluate",
           "fidelity_gate", "fidelity_verdict", "format_result", "lambada", "perplexity", "read_lambada",
           "read_text", "wikitext2_text"]
