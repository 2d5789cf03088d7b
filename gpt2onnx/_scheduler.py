"""The decode loop: rows in slots, one sampled token per row per step, stopping, continuous admission.

>>> for row, token, reason, text in run(engine, rows, None, slots=len(rows), max_len=64,
...                                     eos_token_id=50256):                      # doctest: +SKIP
...     print(row.index, token, reason)

Each row's prompt is prefilled at its own length (rows of equal length together, when
they start together); then every active row decodes one token per step, each at its own
position. A finished row frees its slot: with more rows to come (`more`), the next one
is prefilled into it while the others go on (continuous batching); with none, the cache
is compacted so the others stop paying for it. A row's tokens never depend on its
neighbours (the engine gives every MatMul an even number of rows where the graph's kernels
need it, and sampling is per row), so a row gives the same tokens alone, in any batch, or
admitted mid-flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import sampling
from ._engine import Batch
from .request import GenerationResult, Request
from .textstream import TextStream


def run(engine, first: list["Row"], more: Iterator["Row"] | None, *, slots: int, max_len: int,
        eos_token_id: int) -> Iterator[tuple["Row", int, str | None, str]]:
    """Yield (row, token, finish_reason or None, new text) for every generated token of every row.

    Args:
        first: rows that start together (prefilled as one batch when of equal length).
        more: rows admitted one by one into freed slots, in order (None: no more).
        slots: rows decoding at once; max_len: the longest prompt + new tokens of any row.
    """
    batch = Batch(engine, max(slots, len(first)), max_len)
    occupant: list[Row | None] = [None] * batch.slots
    fresh: dict[int, np.ndarray] = {}  # slot -> prefill logits of a row admitted since the last step
    if first:
        for s, logits in enumerate(batch.prefill([r.request.input_ids for r in first])):
            occupant[s], fresh[s] = first[s], logits
    usable = max(slots, len(first))  # an odd batch's spare slot (when rows go in pairs) stays a scratch row
    dec = None
    while True:
        while more is not None and None in occupant[:usable]:
            row = next(more, None)
            if row is None:
                more = None
                break
            s = occupant.index(None)
            occupant[s], fresh[s] = row, batch.admit(s, row.request.input_ids)
        active = [s for s, r in enumerate(occupant) if r is not None]
        if not active:
            return
        rows = [occupant[s] for s in active]
        if fresh:
            logits = np.stack([fresh[s] if s in fresh else dec[s] for s in active])
            fresh.clear()
        else:
            logits = dec[:len(active)] if active[-1] == len(active) - 1 else dec[active]
        nxt = sampling.next_tokens(logits, [r.request.params for r in rows], [r.rng for r in rows],
                                   [np.asarray(r.history, np.int64) for r in rows], eos_token_id=eos_token_id)
        tokens = np.zeros(batch.slots, np.int64)
        for s, row, tok in zip(active, rows, nxt.tolist()):
            piece, reason = row.push(tok, eos_token_id)
            yield row, tok, reason, piece
            if reason is None:
                tokens[s] = tok
            else:
                occupant[s] = None
                batch.free(s)
        still = [s for s in active if occupant[s] is not None]
        if not still:
            if more is None:
                return
            continue
        if more is None and batch.width(len(still)) < batch.slots:  # nothing to admit: shrink the batch
            batch.compact(still)
            occupant = [occupant[s] for s in still] + [None] * (batch.slots - len(still))
            tokens = np.concatenate([tokens[still], np.zeros(batch.slots - len(still), np.int64)])
            usable = len(still)
        dec = batch.decode(tokens)


@dataclass
class Row:
    """One request on its way through the decode loop."""

    index: int  # place in the caller's list
    request: Request
    stream: TextStream
    history: list[int]  # prompt + generated ids (the repetition penalty reads it)
    tokens: list[int] = field(default_factory=list)  # generated ids
    finish_reason: str | None = None
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = sampling.make_rng(self.request.params.seed)

    def push(self, tok: int, eos_token_id: int) -> tuple[str, str | None]:
        """Take one generated token; returns the text it makes printable and the finish reason (or None)."""
        prm = self.request.params
        self.history.append(tok)
        self.tokens.append(tok)
        piece = self.stream.push(tok)
        if tok == eos_token_id and not prm.ignore_eos:
            self.finish_reason = "eos"
        elif self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= prm.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason and not self.stream.stopped:
            piece += self.stream.finish()
        return piece, self.finish_reason

    def result(self) -> GenerationResult:
        self.stream.finish()
        text = self.stream.text
        return GenerationResult(self.request.prompt + text if self.request.params.return_full_text else text,
                                tuple(self.tokens), len(self.request.input_ids), self.finish_reason or "length")
