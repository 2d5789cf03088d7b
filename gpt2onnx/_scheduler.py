"""The decode loop: sequences in a batch's slots, one sampled token each per step, stopping, admission.

Each sequence's prompt is prefilled in blocks at fixed positions (`_prefill`; first blocks of
equal length together, blocks the prefix cache holds copied, not computed); then every
active sequence decodes one token per step, each at its own position. A finished sequence
frees its slot: with more to come (`more`), the next one takes it and its blocks run one
per decode step of the others, so none of them waits more than one block (while no
sequence decodes, all waiting prompts are prefilled at once); with none to come, the batch
is compacted so the others stop paying for it. A sequence's tokens never depend on
its neighbours (the `Batch` keeps every kernel on one path, and sampling is per sequence),
so it gives the same tokens alone, in any batch, or admitted mid-flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import sampling
from ._engine import Batch
from ._prefill import step as prefill_step
from .request import GenerationResult, Request
from .textstream import TextStream

_NO_HISTORY = np.zeros(0, np.int64)  # what sampling reads for a sequence without a repetition penalty


def run(engine, first: list["Sequence"], more: Iterator["Sequence"] | None, *, slots: int, max_len: int,
        eos_token_id: int, prefix=None) -> Iterator[tuple["Sequence", int, str | None, str]]:
    """Yield (sequence, token, finish_reason or None, new text) for every generated token.

    Args:
        first: sequences that start together (their first blocks run together when of equal length).
        more: sequences admitted one by one into freed slots, in order (None: no more).
        slots: sequences decoding at once; max_len: the longest prompt + new tokens of any.
        prefix: a `_prefix.PrefixCache` for this engine's blocks, or None.
    """
    batch = Batch(engine, max(slots, len(first)), max_len, prefix)
    fresh: dict[int, np.ndarray] = {}  # slot -> prefill logits of a sequence not sampled yet
    for s, q in enumerate(first):
        batch.start(s, q, q.request.input_ids)
    dec = None
    while True:
        while more is not None and (s := batch.free_slot()) is not None:
            seq = next(more, None)
            if seq is None:
                more = None
                break
            batch.start(s, seq, seq.request.input_ids)
        if batch.waiting():
            if any(batch.todo[s] is None for s in batch.busy()):  # rows decode: one block, then their step
                fresh.update(prefill_step(batch, group=False))
            else:  # nobody waits: every prompt now
                while batch.waiting():
                    fresh.update(prefill_step(batch, group=True))
        active = [s for s in batch.busy() if batch.todo[s] is None]
        if not active:
            return
        seqs = [batch.rows[s] for s in active]
        if fresh:
            logits = np.stack([fresh[s] if s in fresh else dec[s] for s in active])
            fresh.clear()
        else:
            logits = dec[:len(active)] if active[-1] == len(active) - 1 else dec[active]
        nxt = sampling.next_tokens(logits, [q.params for q in seqs], [q.rng for q in seqs],
                                   [q.history() if q.params.repetition_penalty != 1.0 else _NO_HISTORY for q in seqs],
                                   eos_token_id=eos_token_id)
        tokens = np.zeros(batch.slots, np.int64)
        for s, seq, tok in zip(active, seqs, nxt.tolist()):
            piece, reason = seq.push(tok, eos_token_id)
            yield seq, tok, reason, piece
            if reason is None:
                tokens[s] = tok
            else:
                batch.free(s)
        if not batch.busy():
            if more is None:
                return
            continue
        if more is None and batch.width(len(batch.busy())) < batch.slots:  # nothing to admit: shrink the batch
            kept = batch.compact()
            tokens = np.concatenate([tokens[kept], np.zeros(batch.slots - len(kept), np.int64)])
        dec = batch.decode(tokens)


@dataclass
class Sequence:
    """One request on its way through the decode loop: its generated tokens, text stream and sampler."""

    index: int  # place in the caller's list
    request: Request
    stream: TextStream
    tokens: list[int] = field(default_factory=list)  # generated ids
    finish_reason: str | None = None
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = sampling.make_rng(self.request.params.seed)

    @property
    def params(self):
        return self.request.params

    def history(self) -> np.ndarray:
        """Prompt + generated ids (what the repetition penalty reads)."""
        return np.array(self.request.input_ids + tuple(self.tokens), np.int64)

    def push(self, tok: int, eos_token_id: int) -> tuple[str, str | None]:
        """Take one generated token; returns the text it makes printable and the finish reason (or None)."""
        prm = self.request.params
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
