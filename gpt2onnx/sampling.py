"""Choose the next token from the logits: greedy, temperature, top-k, top-p, penalties.

Pure numpy, one row at a time, in the order transformers applies its processors::

    logits (V,) ──ignore_eos──repetition penalty──┬── greedy: argmax
                                                  └── sample: temperature──top-k──top-p──softmax──draw

Each step is equivalent to transformers' `RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (with
`min_tokens_to_keep=1`); `tests/runtime/test_sampling.py` compares the distributions.

Why the code is shaped the way it is (V = 50,257 and this runs every decode step):

- top-k uses `np.argpartition` (O(V)) rather than a full sort, and top-p then runs on
  the k candidates only. That is exact: after top-k every other token has probability
  0, so it neither counts toward nor survives the nucleus.
- top-p without top-k first tries the most likely 1,024 tokens and widens only when
  they hold less than `top_p` of the mass; a full argsort is the rare fallback.
- the temperature-scaled scores are shifted so their maximum is 0, `(x - max) / t`.
  Softmax is unchanged by the shift, and a tiny temperature cannot overflow to inf.
- Every row has its own `np.random.Generator`, so a seeded prompt draws the same tokens
  alone or inside any batch.

One documented difference: when several tokens tie with the k-th best score,
transformers keeps all of them and this module keeps exactly k (ties broken by
`argpartition`, deterministically). With real-valued logits ties have probability ~0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import GenerationParams

NUCLEUS_FIRST_TRY = 1024  # candidates examined first for top-p without top-k
# The smallest positive float32: a positive temperature or penalty below it would round to 0
# in float32 and turn the division into 0/0 = NaN; clamped, it is as extreme as a float32 allows.
MIN_DIVISOR = float(np.finfo(np.float32).smallest_subnormal)


def make_rng(seed: int | None) -> np.random.Generator:
    """Return the random generator of one row: seeded, or fresh entropy for None.

    Args:
        seed: `GenerationParams.seed`.

    >>> make_rng(7).random() == make_rng(7).random()
    True
    """
    return np.random.default_rng(seed)


def process_logits(
    logits: np.ndarray,
    params: GenerationParams,
    *,
    history: np.ndarray,
    eos_token_id: int | None,
) -> np.ndarray:
    """Apply the parameters to one row of logits, as transformers' processors would.

    Args:
        logits: (V,) logits of the next token.
        params: The row's parameters.
        history: Token ids seen so far (prompt + generated), for the repetition penalty.
        eos_token_id: The end-of-text id, suppressed when `params.ignore_eos`; None
            when the model has none.

    Returns:
        (V,) float32 scores, -inf for removed tokens; a new array. For greedy
        parameters the warpers (temperature, top-k, top-p) are not applied, as in
        transformers. When sampling, the scores equal transformers' up to a constant
        added to the whole row, so their softmax is the same distribution.

    >>> p = GenerationParams(do_sample=True, top_k=2)
    >>> process_logits(np.array([1, 3, 2, 0], np.float32), p, history=np.array([], np.int64),
    ...                eos_token_id=None).tolist()
    [-inf, 0.0, -1.0, -inf]
    """
    scores = np.array(logits, dtype=np.float32)  # a copy: the caller's array is not touched
    _penalize(scores, params, np.asarray(history), eos_token_id)
    if params.greedy:
        return scores
    ids, z, _ = _candidates(scores, params)
    if ids is None:
        return z
    out = np.full_like(scores, -np.inf)
    out[ids] = z
    return out


def next_tokens(
    logits: np.ndarray,
    params: Sequence[GenerationParams],
    rngs: Sequence[np.random.Generator],
    histories: Sequence[np.ndarray],
    *,
    eos_token_id: int | None,
) -> np.ndarray:
    """Choose the next token of every row of a batch.

    Greedy rows take the argmax of their processed scores (the first one on ties, like
    `torch.argmax`); sampling rows draw from the softmax of their processed scores with
    their own generator, one uniform number per draw.

    Args:
        logits: (B, V) logits of the last position of each row.
        params: B parameter sets, one per row.
        rngs: B generators (see `make_rng`); only sampling rows consume them.
        histories: B arrays of the token ids seen so far (prompt + generated).
        eos_token_id: The end-of-text id, or None.

    Returns:
        (B,) int64 token ids.

    >>> logits = np.array([[0, 5, 1], [9, 0, 0]], np.float32)
    >>> next_tokens(logits, [GenerationParams()] * 2, [make_rng(0)] * 2,
    ...             [np.array([1]), np.array([0])], eos_token_id=None).tolist()
    [1, 0]
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {logits.shape}")
    b = logits.shape[0]
    if not len(params) == len(rngs) == len(histories) == b:
        raise ValueError(
            f"need one params, rng and history per row: {b} rows, {len(params)} params, "
            f"{len(rngs)} rngs, {len(histories)} histories"
        )
    out = np.empty(b, dtype=np.int64)
    for i in range(b):
        out[i] = _next_token(logits[i], params[i], rngs[i], histories[i], eos_token_id)
    return out


def _next_token(
    row: np.ndarray,
    params: GenerationParams,
    rng: np.random.Generator,
    history: np.ndarray,
    eos_token_id: int | None,
) -> int:
    if row.dtype != np.float32:
        row = row.astype(np.float32)
    if params.repetition_penalty != 1.0 or (params.ignore_eos and eos_token_id is not None):
        row = row.copy()  # the one V-sized copy per step, and only when something changes
        _penalize(row, params, np.asarray(history), eos_token_id)
    if params.greedy:
        return int(np.argmax(row))
    ids, _, w = _candidates(row, params)
    if w is None:  # nothing left with a finite score; fall back to the first best
        return int(np.argmax(row))
    cdf = np.cumsum(w, dtype=np.float64)
    # side="right" skips zero-weight tokens: their cdf equals the one before them.
    j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if j >= len(cdf):  # u * total rounded up to total; take the last token with weight
        j = int(np.flatnonzero(w)[-1])
    return int(ids[j]) if ids is not None else j


def _penalize(
    scores: np.ndarray, params: GenerationParams, history: np.ndarray, eos_token_id: int | None
) -> None:
    """ignore_eos, then the repetition penalty, in place on a (V,) float32 row."""
    if params.ignore_eos and eos_token_id is not None:
        scores[eos_token_id] = -np.inf
    if params.repetition_penalty != 1.0 and history.size:
        # Repeated ids gather the same original score and write the same value back, so
        # each token is penalized once without np.unique.
        s = scores[history]
        p = np.float32(max(params.repetition_penalty, MIN_DIVISOR))
        with np.errstate(over="ignore"):  # a tiny penalty sends repeated tokens to +inf: they win, as intended
            scores[history] = np.where(s < 0, s * p, s / p)


def _candidates(
    scores: np.ndarray, params: GenerationParams
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Temperature, top-k and top-p on a (V,) row.

    Returns:
        (ids, z, w): the surviving token ids (None = all V, in order), their scaled
        scores `(x - max) / t` as float32, and their unnormalized probabilities
        `exp(z)` (None when no score is finite).
    """
    v = scores.shape[0]
    k = params.top_k if 0 < params.top_k < v else 0  # top_k >= V filters nothing
    ids = None
    x = scores
    if k:
        ids = np.argpartition(scores, v - k)[v - k :]  # the k best, unordered
        ids = ids[np.argsort(-scores[ids], kind="stable")]  # (k,) best first
        x = scores[ids]
    m = x[0] if k else x.max()
    if not np.isfinite(m):
        return ids, np.full_like(x, -np.inf), None
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the best to -inf: greedy, as intended
        z = (x - m) / np.float32(max(params.temperature, MIN_DIVISOR))  # max is exactly 0
    w = np.exp(z)
    if params.top_p < 1.0:
        if ids is None:
            ids, z, w = _nucleus_of_vocab(z, w, params.top_p)
        else:
            n = _nucleus_size(w, w.sum(dtype=np.float64), params.top_p)
            ids, z, w = ids[:n], z[:n], w[:n]
    return ids, z, w


def _nucleus_of_vocab(
    z: np.ndarray, w: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """top-p over the whole vocabulary, sorting only as many tokens as needed."""
    v = z.shape[0]
    total = w.sum(dtype=np.float64)
    n = min(NUCLEUS_FIRST_TRY, v)
    while True:
        ids = np.argpartition(z, v - n)[v - n :] if n < v else np.arange(v)
        ids = ids[np.argsort(-z[ids], kind="stable")]  # (n,) best first
        cand = w[ids]
        # Exact once the n best hold >= top_p of the mass: every later token then has
        # at least top_p of mass before it and is removed.
        if n == v or cand.sum(dtype=np.float64) >= top_p * total:
            keep = _nucleus_size(cand, total, top_p)
            ids = ids[:keep]
            return ids, z[ids], cand[:keep]
        n = min(4 * n, v)


def _nucleus_size(w_desc: np.ndarray, total: float, top_p: float) -> int:
    """How many of the best-first weights top-p keeps.

    transformers removes a token when the probability of it and all less likely tokens
    is <= 1 - top_p; equivalently a token survives when the probability of the more
    likely tokens is < top_p. The best token always survives (min_tokens_to_keep=1).
    """
    cdf = np.cumsum(w_desc, dtype=np.float64)
    return min(int(np.searchsorted(cdf, top_p * total, side="left")) + 1, len(w_desc))
