"""How closely a model follows an fp32 reference on real text: the figures the int8/int4 gate judges.

Random token ids (the exporter's parity check) cannot show what int8 does to trained GPT-2's
few huge activation channels, so fidelity is measured on real text, in the sliding windows of
the perplexity evaluation (docs/quality.md, "`fidelity` and the int8 gate")::

    tokens  |------------------------------ text ------------------------------|
    window 1 [=========== scored ===========]
    window 2            [ context only    |==== scored ====]
    window 3                              [ context only    |==== scored ====]
             <-stride->  (every token is scored once, with >= window - stride context)

At every scored position both sessions see the same window; with p the reference's
next-token distribution and q the model's:

- ``top1_agreement``: fraction of positions where argmax p == argmax q;
- ``decisive_top1_agreement``: the same where p's favourite leads its runner-up by at least
  `margin` nats (elsewhere a flip is a near-tie); ``decisive_share``: how many positions are;
- ``mean_kl`` / ``p99_kl``: KL(p || q) in nats; ``ppl_ratio``: perplexity model / reference.

The thresholds, the verdict and the gate text are `gpt2onnx.eval.gate`'s. A session is
anything with onnxruntime's ``run(None, feeds)`` and ``get_inputs()``: an
``InferenceSession`` of a gpt2onnx graph, or `TorchSession` around a PyTorch GPT-2 (the one
class that imports torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..graphio import GraphSpec, log_softmax

_CHUNK = 256  # rows of (rows, vocab) logits turned into float64 log-probs at once


def logits_at_end(session, ids: np.ndarray, keep: int, spec: GraphSpec | None = None) -> np.ndarray:
    """Logits of the last `keep` positions of one run over `ids` (S,) from an empty cache: (keep, V).

    Only those positions go through the LM head (``logits_to_keep``).
    """
    spec = spec or GraphSpec.of(session)
    s = len(ids)
    if not 1 <= keep <= s:
        raise ValueError(f"keep must be in [1, {s}], got {keep}")
    logits = session.run(None, spec.feeds(np.asarray(ids, np.int64)[None, :], 0 if keep == s else keep))[0][0]
    return logits[-keep:]  # (keep, V); a session without logits_to_keep returns all positions


def last_logits(session, ids: np.ndarray, n: int, spec: GraphSpec | None = None) -> np.ndarray:
    """Logits predicting the last `n` tokens of `ids` (S,): (n, V), ``n <= S - 1``.

    Row j is the next-token distribution for ``ids[S - n + j]`` given everything before it.
    """
    if not 1 <= n <= len(ids) - 1:
        raise ValueError(f"n must be in [1, {len(ids) - 1}], got {n}")
    return logits_at_end(session, ids, n + 1, spec)[:-1]


# -- the sliding windows --------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """One window of the strided evaluation (token indices into the text)."""

    begin: int
    end: int
    trg_len: int  # Hugging Face's trg_len: end - previous end
    n_scored: int  # tokens actually scored: the last min(trg_len, end - begin - 1)

    @property
    def hf_weight(self) -> int:
        """The weight the Hugging Face perplexity guide gives this window: trg_len - 1."""
        return self.trg_len - 1


def windows(n_tokens: int, max_length: int, stride: int) -> Iterator[Window]:
    """The windows of the Hugging Face perplexity guide, in order.

    ``begin`` steps by `stride`; each window is up to `max_length` tokens and scores the
    tokens after the previous window's end (``trg_len``). A token at the start of a
    window has no context in it, so the first window scores ``trg_len - 1`` tokens, and
    so does every window when ``stride == max_length``. Windows that score nothing
    (a 1-token tail) are skipped.

    >>> [(w.begin, w.end, w.n_scored) for w in windows(10, 4, 2)]
    [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        trg_len = end - prev_end
        n_scored = min(trg_len, end - begin - 1)
        if n_scored > 0:
            yield Window(begin, end, trg_len, n_scored)
        prev_end = end
        if end == n_tokens:
            break


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "windows"):
    """Progress over `total` units on stderr (a bar on a terminal, plain lines in a log)."""
    from ..progress import Progress

    return Progress(f"gpt2onnx eval {desc}", total=total, unit=unit, enabled=enabled)


# -- the measurements -----------------------------------------------------------------

def measure(ref_session, session, token_ids, *, window: int, stride: int, limit: int | None = None,
            progress: bool = False, margin: float = 0.05) -> dict:
    """Compare `session` with `ref_session` on every scored position of real text.

    Args:
        ref_session: the fp32 reference (onnxruntime session or `TorchSession`).
        session: the model measured (e.g. the int8 graph).
        token_ids: the text as token ids, 1-D.
        window: tokens per window (at most the model's context).
        stride: step between windows; each window scores about `stride` new tokens.
        limit: use only the first `limit` windows.
        progress: show a progress bar on stderr.
        margin: log-prob lead (nats) of the reference's favourite over its runner-up
            that makes a position decisive (the gate passes ``gate.DECISIVE_MARGIN``).

    Returns:
        ``top1_agreement``, ``decisive_top1_agreement`` (None without decisive
        positions), ``decisive_share``, ``decisive_margin``, ``mean_kl``, ``p99_kl``,
        ``max_kl`` (nats, KL(ref || model)),
        ``ppl_ref``, ``ppl``, ``ppl_ratio`` (model / ref, on the same tokens), ``positions``
        and ``windows``.

    For example::

        figures = measure(fp32_session, int8_session, ids, window=512, stride=256)
        check(figures)   # -> []
    """
    ids = np.asarray(token_ids, np.int64).ravel()
    if ids.size < 2:
        raise ValueError("need at least 2 tokens to measure")
    ref_spec, spec = GraphSpec.of(ref_session), GraphSpec.of(session)
    wins = list(windows(ids.size, window, stride))[:limit]
    agree, kls, decisive = [], [], []
    nll_ref = nll = 0.0
    with progress_bar(len(wins), "fidelity", progress) as bar:
        for w in wins:
            seq = ids[w.begin:w.end]
            target = seq[-w.n_scored:]
            lp_all = last_logits(ref_session, seq, w.n_scored, ref_spec)
            lq_all = last_logits(session, seq, w.n_scored, spec)
            for a in range(0, w.n_scored, _CHUNK):
                lp, lq = log_softmax(lp_all[a:a + _CHUNK]), log_softmax(lq_all[a:a + _CHUNK])
                t = target[a:a + _CHUNK]
                rows = np.arange(len(t))
                nll_ref -= float(lp[rows, t].sum())
                nll -= float(lq[rows, t].sum())
                agree.append(lp.argmax(-1) == lq.argmax(-1))
                top2 = np.partition(lp, -2, axis=-1)[:, -2:]  # (rows, 2): runner-up, favourite
                decisive.append(top2[:, 1] - top2[:, 0] >= margin)
                kls.append(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0))  # rounding can dip below 0
            bar.update(1)
    agree_a, kl, dec = np.concatenate(agree), np.concatenate(kls), np.concatenate(decisive)
    n = int(agree_a.size)
    ppl_ref, ppl = float(np.exp(nll_ref / n)), float(np.exp(nll / n))
    return {
        "top1_agreement": float(agree_a.mean()),
        "decisive_top1_agreement": float(agree_a[dec].mean()) if dec.any() else None,
        "decisive_share": float(dec.mean()),
        "decisive_margin": float(margin),
        "mean_kl": float(kl.mean()),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "ppl_ref": ppl_ref,
        "ppl": ppl,
        "ppl_ratio": ppl / ppl_ref,
        "positions": n,
        "windows": len(wins),
    }


def greedy(session, prompts: np.ndarray, new_tokens: int, spec: GraphSpec | None = None) -> np.ndarray:
    """Greedy continuations of equal-length `prompts` (K, P) with the KV cache: (K, new_tokens)."""
    spec = spec or GraphSpec.of(session)
    prompts = np.asarray(prompts, np.int64)
    k, p = prompts.shape
    feeds = spec.feeds(prompts, 1)
    out = np.zeros((k, new_tokens), np.int64)
    for step in range(new_tokens):
        logits, *present = session.run(None, feeds)
        out[:, step] = logits[:, -1].argmax(-1)
        feeds = spec.feeds(out[:, step:step + 1], 1, past=present)
    return out


def greedy_agreement(ref_session, session, prompts: np.ndarray, *, new_tokens: int) -> dict:
    """How often greedy continuations of the same prompts are identical.

    Returns ``greedy_identical`` (fraction of the K continuations identical in all
    `new_tokens` tokens), ``greedy_prefix_mean`` (mean number of leading tokens that
    match), ``greedy_prompts`` and ``greedy_new_tokens``.
    """
    a, b = greedy(ref_session, prompts, new_tokens), greedy(session, prompts, new_tokens)
    same = a == b  # (K, N)
    prefix = np.where(same.all(1), new_tokens, np.argmin(same, axis=1))  # first mismatch
    return {
        "greedy_identical": float(same.all(1).mean()),
        "greedy_prefix_mean": float(prefix.mean()),
        "greedy_prompts": int(len(prompts)),
        "greedy_new_tokens": int(new_tokens),
    }


def spaced_prompts(token_ids, *, count: int, length: int) -> np.ndarray:
    """`count` prompts of `length` tokens taken at evenly spaced places in the text: (K, P)."""
    ids = np.asarray(token_ids, np.int64).ravel()
    if ids.size < length:
        raise ValueError(f"the text has {ids.size} tokens, fewer than one prompt of {length}")
    starts = np.linspace(0, ids.size - length, num=count).astype(int)
    return np.stack([ids[s:s + length] for s in starts])


class TorchSession:
    """A PyTorch GPT-2 behind onnxruntime's session interface (`run`, `get_inputs`).

    Lets a PyTorch model be the reference of `measure` / `greedy_agreement`. This is
    the only part of gpt2onnx's measurement code that imports torch.
    """

    @dataclass(frozen=True)
    class _Input:
        name: str
        shape: tuple

    def __init__(self, model):
        cfg = model.config
        self.model = model.eval()
        self.n_layer, self.n_head = int(cfg.n_layer), int(cfg.n_head)
        self.head_dim = int(cfg.n_embd) // self.n_head

    def get_inputs(self) -> list:
        names = ["input_ids", "attention_mask", "position_ids"]
        names += [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        shape = ("batch_size", self.n_head, "past_sequence_length", self.head_dim)
        return [self._Input(n, shape if n.startswith("past_") else ("batch_size", "sequence_length"))
                for n in names] + [self._Input("logits_to_keep", ())]

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        import warnings

        import torch
        from transformers import DynamicCache

        t = {k: torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in
             ("input_ids", "attention_mask", "position_ids")}
        past = [feeds[f"past_key_values.{i}.{kv}"] for i in range(self.n_layer) for kv in ("key", "value")]
        cache = None
        if past[0].shape[2] > 0:
            cache = DynamicCache.from_legacy_cache(tuple(
                (torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1])) for i in range(self.n_layer)))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model(**t, past_key_values=cache, use_cache=True)
            legacy = out.past_key_values.to_legacy_cache()
        keep = int(feeds.get("logits_to_keep", 0))
        logits = out.logits[:, -keep:] if keep else out.logits
        present = [x.float().numpy() for kv in legacy for x in kv[:2]]
        return [logits.float().numpy(), *present]
