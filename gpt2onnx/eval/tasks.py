"""The measurements of `gpt2onnx.eval`: strided perplexity and LAMBADA over one session.

For example::

    perplexity(session, ids, max_length=1024, stride=512)["ppl"]

Sessions are anything `gpt2onnx.eval.GraphSpec` accepts: an onnxruntime
session of a gpt2onnx graph, or a `fidelity.TorchSession`.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DataError
from ..graphio import GraphSpec, log_softmax
from . import fidelity


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
    spec = GraphSpec.of(session)
    wins = list(fidelity.windows(ids.size, max_length, stride))[:limit]
    nll_total, hf_nll, hf_n, n_scored, n_bytes = 0.0, 0.0, 0, 0, 0
    with fidelity.progress_bar(len(wins), "wikitext2", progress) as bar:
        for w in wins:
            seq = ids[w.begin:w.end]
            target = seq[-w.n_scored:]
            logits = fidelity.last_logits(session, seq, w.n_scored, spec)  # (n, V)
            nll = 0.0
            for a in range(0, w.n_scored, 256):
                lp = log_softmax(logits[a:a + 256])
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
    spec = GraphSpec.of(session)
    correct, nll_total, n_target, truncated = 0, 0.0, 0, 0
    with fidelity.progress_bar(len(texts), "lambada", progress, unit="passages") as bar:
        for text in texts:
            context, word = text.rsplit(" ", 1)
            ctx = tokenizer.encode(context, add_special_tokens=False).ids or [bos_token_id]
            tgt = tokenizer.encode(" " + word, add_special_tokens=False).ids
            room = n_positions - len(tgt) + 1  # the input is context + target[:-1]
            if len(ctx) > room:
                ctx, truncated = ctx[len(ctx) - room:], truncated + 1
            # Input: context + target[:-1]; its last len(target) positions predict the target tokens.
            rows = fidelity.logits_at_end(session, np.asarray(ctx + tgt[:-1], np.int64), len(tgt), spec)
            lp = log_softmax(rows)
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
