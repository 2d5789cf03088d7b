"""Measure a model folder: WikiText-2 perplexity, LAMBADA, fidelity against fp32.

>>> from gpt2onnx.eval import evaluate
>>> evaluate("out/gpt2-int8", "wikitext2")["ppl"]                          # doctest: +SKIP
>>> evaluate("out/gpt2-int8", "lambada", limit=500)["accuracy"]             # doctest: +SKIP
>>> evaluate("out/gpt2-int8", "fidelity", reference="out/gpt2-fp32")        # doctest: +SKIP

``wikitext2`` and ``lambada`` need only the runtime (onnxruntime + numpy + tokenizers):
each window or passage is one run of the model folder's session from an empty cache,
with ``logits_to_keep`` set to the positions scored. ``fidelity`` compares with a
reference model: another model folder (runtime only) or a PyTorch source (imports torch).
The definitions, and where to get the data files, are in docs/quality.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import numpy as np

from . import fidelity
from .errors import Gpt2OnnxError, InvalidRequestError

TASKS = ("wikitext2", "lambada", "fidelity")
WIKITEXT2_FILE = "wiki.test.raw"
LAMBADA_FILE = "lambada_test.jsonl"
# sha256 of the original files (wikitext-2-raw-v1.zip's test file; OpenAI's LAMBADA test set).
KNOWN_SHA256 = {
    WIKITEXT2_FILE: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    LAMBADA_FILE: "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
}
WHERE = {
    WIKITEXT2_FILE: "wiki.test.raw from wikitext-2-raw-v1.zip "
                    "(e.g. https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip)",
    LAMBADA_FILE: "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
}
STRIDE = 512  # the Hugging Face perplexity guide's stride (for a 1024-token context)
MAX_LENGTH = 1024  # longest window, even for models with a longer context
FIDELITY_PROMPTS = 16  # greedy-continuation prompts of the fidelity task


class DataError(Gpt2OnnxError):
    """An evaluation data file is missing or malformed."""


# -- data files -----------------------------------------------------------------------

def _candidates(name: str) -> list[str]:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    places = []
    if os.environ.get("GPT2ONNX_DATA"):
        places.append(os.environ["GPT2ONNX_DATA"])
    places += [os.getcwd(), os.path.join(os.getcwd(), "..", "shared", "data"),
               os.path.join(repo, "..", "shared", "data")]
    return [os.path.normpath(os.path.join(p, name)) for p in places]


def data_path(name: str, path: str | None = None) -> str:
    """Where the data file `name` is: `path` if given, else the first of the usual places.

    The usual places: ``$GPT2ONNX_DATA``, the current folder, ``../shared/data`` next to
    the current folder and next to the gpt2onnx checkout.
    """
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist; get {WHERE.get(name, name)} and pass its path")
        return path
    for p in _candidates(name):
        if os.path.isfile(p):
            return p
    raise DataError(f"{name} not found (looked in $GPT2ONNX_DATA, ., ../shared/data); "
                    f"download {WHERE.get(name, name)} and pass --data PATH")


def read_text(path: str) -> str:
    """A UTF-8 text file with newlines normalized as Python's text mode does; refuses empty files."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path!r} ({e.strerror}); check the path and its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                        "pass the original file, not a re-encoded or compressed copy") from None
    if not text.strip():
        raise DataError(f"{path} is empty; download the file again")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def wikitext2_text(raw: str) -> str:
    """The text the Hugging Face perplexity guide scores, rebuilt from ``wiki.test.raw``.

    The guide scores ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1")["test"]["text"])``.
    The dataset's rows are the file's lines (newline kept), blank lines (" \\n") as "".
    """
    parts = raw.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return "\n\n".join(line if line.strip() else "" for line in lines)


def read_lambada(path: str) -> list[str]:
    """The passages of a LAMBADA JSONL file (one ``{"text": ...}`` per line)."""
    texts = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}); expected one {{\"text\": ...}} object "
                            "per line (lambada_test.jsonl)") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path} line {n} has no \"text\" string; expected one {{\"text\": ...}} object per line")
        if " " not in row["text"].strip():
            raise DataError(f"{path} line {n} has no space-separated last word to predict")
        texts.append(row["text"])
    return texts


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _data_info(name: str, path: str) -> dict:
    digest = _sha256(path)
    known = KNOWN_SHA256.get(name)
    return {"data": os.path.abspath(path), "data_sha256": digest,
            "data_is_original": (digest == known) if os.path.basename(path) == name else None}


# -- the measurements -----------------------------------------------------------------

def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of each token of a byte-level BPE (one vocabulary character per byte)."""
    n = tokenizer.get_vocab_size()
    out = np.zeros(n, np.int64)
    for i in range(n):
        tok = tokenizer.id_to_token(i)
        out[i] = len(tok) if tok is not None else 0
    return out


def perplexity(session, token_ids, *, max_length: int, stride: int, limit: int | None = None,
               token_bytes: np.ndarray | None = None, progress: bool = False) -> dict:
    """Strided sliding-window perplexity, as in the Hugging Face guide for GPT-2.

    Each window of up to `max_length` tokens starts `stride` after the previous one and
    scores only the tokens after the previous window's end (see `fidelity.windows`).

    Returns:
        ``ppl``: the guide's figure: exp(sum over windows of mean-nll x (trg_len - 1) /
        sum of (trg_len - 1)). The guide weights each window by trg_len - 1 although,
        after the first window, the loss averages trg_len tokens (the label shift drops
        the window's first token, which is context there); ``ppl_exact`` weights every
        scored token once. Also ``nll_per_token`` (nats, exact), ``bits_per_byte``
        (total nll in bits / UTF-8 bytes of the scored tokens; None if `token_bytes` is
        not given), ``tokens_scored``, ``bytes_scored``, ``windows``.
    """
    ids = np.asarray(token_ids, np.int64).ravel()
    if ids.size < 2:
        raise DataError("the text is shorter than 2 tokens; nothing to score")
    spec = fidelity.SessionSpec.of(session)
    wins = list(fidelity.windows(ids.size, max_length, stride))[:limit]
    nll_total, hf_nll, hf_n, n_scored, n_bytes = 0.0, 0.0, 0, 0, 0
    with fidelity.progress_bar(len(wins), "wikitext2", progress) as bar:
        for w in wins:
            seq = ids[w.begin:w.end]
            target = seq[-w.n_scored:]
            logits = fidelity.last_logits(session, seq, w.n_scored, spec)  # (n, V)
            nll = 0.0
            for a in range(0, w.n_scored, 256):
                lp = fidelity.log_softmax(logits[a:a + 256])
                nll -= float(lp[np.arange(len(lp)), target[a:a + 256]].sum())
            nll_total += nll
            n_scored += w.n_scored
            hf_nll += nll / w.n_scored * w.hf_weight
            hf_n += w.hf_weight
            if token_bytes is not None:
                n_bytes += int(token_bytes[target].sum())
            bar.update(1)
    return {
        "ppl": math.exp(hf_nll / hf_n) if hf_n > 0 else math.exp(nll_total / n_scored),
        "ppl_exact": math.exp(nll_total / n_scored),
        "nll_per_token": nll_total / n_scored,
        "bits_per_byte": nll_total / math.log(2) / n_bytes if n_bytes else None,
        "tokens_scored": n_scored,
        "bytes_scored": n_bytes if token_bytes is not None else None,
        "tokens_total": int(ids.size),
        "windows": len(wins),
        "max_length": max_length,
        "stride": stride,
    }


def lambada(session, tokenizer, texts: list[str], *, n_positions: int, bos_token_id: int,
            progress: bool = False) -> dict:
    """LAMBADA last-word accuracy (greedy, whole word) and target-word perplexity.

    Each passage splits at its last space: context = the text before it, target =
    " " + the last word, tokenized apart (as lm-evaluation-harness's lambada_openai). A
    passage is correct iff greedy decoding of len(target) tokens after the context gives
    exactly the target tokens; one teacher-forced run decides that (greedy follows the
    target for as long as every argmax matches). An empty context becomes the BOS token;
    a context too long for the model loses tokens from the left (counted in ``truncated``).

    Returns:
        ``accuracy``; ``ppl_word`` = exp(total target nll / passages), the per-word figure
        lm-evaluation-harness reports as lambada_openai ``perplexity``; ``ppl_token`` =
        exp(total target nll / target tokens); ``passages``, ``target_tokens``, ``truncated``.
    """
    spec = fidelity.SessionSpec.of(session)
    correct, nll_total, n_target, truncated = 0, 0.0, 0, 0
    with fidelity.progress_bar(len(texts), "lambada", progress) as bar:
        for text in texts:
            context, word = text.rsplit(" ", 1)
            ctx = tokenizer.encode(context, add_special_tokens=False).ids or [bos_token_id]
            tgt = tokenizer.encode(" " + word, add_special_tokens=False).ids
            room = n_positions - len(tgt) + 1  # the input is context + target[:-1]
            if len(ctx) > room:
                ctx, truncated = ctx[len(ctx) - room:], truncated + 1
            # Input: context + target[:-1]; its last len(target) positions predict the target tokens.
            rows = fidelity.logits_at_end(session, np.asarray(ctx + tgt[:-1], np.int64), len(tgt), spec)
            lp = fidelity.log_softmax(rows)
            t = np.asarray(tgt)
            nll_total -= float(lp[np.arange(len(t)), t].sum())
            n_target += len(t)
            correct += bool((rows.argmax(-1) == t).all())
            bar.update(1)
    n = len(texts)
    return {
        "accuracy": correct / n,
        "correct": correct,
        "ppl_word": math.exp(nll_total / n),
        "ppl_token": math.exp(nll_total / n_target),
        "passages": n,
        "target_tokens": n_target,
        "truncated": truncated,
    }


# -- the entry point ------------------------------------------------------------------

def _check_limit(limit) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidRequestError(f"limit must be a positive integer, got {limit!r}")


def _reference(reference: str | None, manifest: dict, threads: int | None):
    """(session, description, vocab_size, n_positions) of the fidelity reference."""
    from .artifact import MANIFEST

    if reference is not None and os.path.isfile(os.path.join(os.fspath(reference), MANIFEST)):
        from .runtime import load

        ref = load(reference, threads=threads)
        desc = {"reference": os.path.abspath(reference), "reference_precision": ref.manifest["precision"]}
        return ref.session, desc, ref.vocab_size, ref.n_positions
    from . import sources

    src_info = manifest.get("source") or {}
    random_weights, seed = False, 0
    if reference is None:
        if not src_info.get("id"):
            raise InvalidRequestError("the model folder does not record its source; pass --reference SOURCE_OR_DIR")
        reference = src_info["id"]
        random_weights, seed = bool(src_info.get("random_weights")), int(src_info.get("seed") or 0)
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
    return fidelity.TorchSession(src.model), desc, int(src.config.vocab_size), int(src.config.n_positions)


def evaluate(model_dir: str, task: str, *, data: str | None = None, reference: str | None = None,
             limit: int | None = None, progress: bool = True, threads: int | None = None) -> dict:
    """Evaluate a model folder on one task.

    Args:
        model_dir: a folder written by ``gpt2onnx export``.
        task: ``"wikitext2"`` (perplexity on the WikiText-2 raw test set), ``"lambada"``
            (last-word accuracy and perplexity on OpenAI's LAMBADA test set) or
            ``"fidelity"`` (agreement with an fp32 reference on WikiText-2).
        data: the data file (default: ``wiki.test.raw`` / ``lambada_test.jsonl`` in
            ``$GPT2ONNX_DATA``, ``.`` or ``../shared/data``).
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

    >>> r = evaluate("out/gpt2", "wikitext2", limit=8, progress=False)   # doctest: +SKIP
    >>> sorted(r)[:3]                                                     # doctest: +SKIP
    ['bits_per_byte', 'bytes_scored', 'data']
    """
    from .runtime import load

    if task not in TASKS:
        raise InvalidRequestError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    _check_limit(limit)
    name = LAMBADA_FILE if task == "lambada" else WIKITEXT2_FILE
    path = data_path(name, data)
    t0 = time.perf_counter()
    gen = load(model_dir, threads=threads)
    m = gen.manifest
    out = {"task": task, "model": os.path.abspath(os.fspath(model_dir)), "precision": m["precision"],
           "random_weights": bool((m.get("source") or {}).get("random_weights"))}
    out.update(_data_info(name, path))
    if task == "lambada":
        texts = read_lambada(path)[:limit]
        out.update(lambada(gen.session, gen.tokenizer, texts, n_positions=gen.n_positions,
                           bos_token_id=gen.bos_token_id, progress=progress))
    else:
        text = wikitext2_text(read_text(path))
        ids = np.asarray(gen.tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
        if task == "wikitext2":
            max_length = min(gen.n_positions, MAX_LENGTH)
            lengths = token_byte_lengths(gen.tokenizer)
            if int(lengths[ids].sum()) != len(text.encode("utf-8")):
                lengths = None  # not a byte-level BPE: bytes per token unknown
            out.update(perplexity(gen.session, ids, max_length=max_length, stride=min(STRIDE, max_length // 2),
                                  limit=limit, token_bytes=lengths, progress=progress))
        else:
            ref, desc, ref_vocab, ref_positions = _reference(reference, m, threads)
            if ref_vocab != gen.vocab_size:
                raise InvalidRequestError(f"the reference has a vocabulary of {ref_vocab}, the model {gen.vocab_size}; "
                                          "compare models of the same family")
            window = min(gen.n_positions, ref_positions, MAX_LENGTH)
            out.update(desc)
            out.update(fidelity.measure(ref, gen.session, ids, window=window, stride=window // 2, limit=limit,
                                        progress=progress))
            plen = min(64, window // 4)
            prompts = fidelity.spaced_prompts(ids, count=FIDELITY_PROMPTS, length=plen)
            out.update(fidelity.greedy_agreement(ref, gen.session, prompts, new_tokens=min(32, window - plen)))
            out["gate_missed"] = fidelity.check(out)
            out["window"], out["stride"] = window, window // 2
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# -- the command line -----------------------------------------------------------------

def format_result(r: dict) -> str:
    """A few human-readable lines for an `evaluate` result."""
    head = f"{r['task']}  {r['model']} ({r['precision']}{', RANDOM WEIGHTS' if r.get('random_weights') else ''})"
    original = {True: "original file", False: "NOT the original file (sha256 differs)", None: "sha256 not checked"}
    lines = [head, f"data       {r['data']} ({original[r['data_is_original']]})"]
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
        lines += [f"reference  {r['reference']} ({r['reference_precision']})",
                  f"top-1      {r['top1_agreement']:.4f} agreement over {r['positions']:,} positions",
                  f"KL         mean {r['mean_kl']:.3g}, p99 {r['p99_kl']:.3g}, max {r['max_kl']:.3g} nats "
                  "(ref || model)",
                  f"perplexity {r['ppl']:.4f} vs {r['ppl_ref']:.4f} (ratio {r['ppl_ratio']:.4f})",
                  f"greedy     {r['greedy_identical']:.3f} of {r['greedy_prompts']} continuations identical "
                  f"({r['greedy_new_tokens']} tokens), mean matching prefix {r['greedy_prefix_mean']:.1f}",
                  f"int8 gate  {gate}"]
    lines.append(f"time       {r['seconds']:.1f} s")
    return "\n".join(lines)


def _cli(args) -> int:
    r = evaluate(args.model_dir, args.task, data=args.data, reference=args.reference, limit=args.limit,
                 progress=not args.json and not args.quiet, threads=args.threads)
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0


def add_parser(subparsers) -> None:
    """Register ``gpt2onnx eval`` on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="measure a model folder: WikiText-2 perplexity, LAMBADA, or fidelity "
                                           "against an fp32 reference")
    p.add_argument("model_dir")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data", metavar="PATH", help=f"data file (default: {WIKITEXT2_FILE} or {LAMBADA_FILE} in "
                                                  "$GPT2ONNX_DATA, . or ../shared/data)")
    p.add_argument("--reference", metavar="SOURCE_OR_DIR",
                   help="fidelity: fp32 model folder, or hub id / save_pretrained folder (needs torch); "
                        "default: the model's recorded source")
    p.add_argument("--limit", type=int, metavar="N", help="first N windows (wikitext2, fidelity) or passages (lambada)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
