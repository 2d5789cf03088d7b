"""Generator: run an exported model folder with onnxruntime + numpy + tokenizers only.

>>> import gpt2onnx
>>> gen = gpt2onnx.load("out/gpt2-int8")                                   # doctest: +SKIP
>>> [r.text for r in gen.generate(["Hello,", "The sky"], max_new_tokens=8)]  # doctest: +SKIP
>>> for step in gen.generate_tokens("Once upon a time", max_new_tokens=20):  # doctest: +SKIP
...     print(step.text, end="", flush=True)

One request path: `Generator.prepare` checks a prompt and its parameters, tokenizes it
and fits it to the context once, giving a `Request`; every entry (generate, streaming,
batch jobs, Azure ML, MLflow, Ray) runs Requests through `generate_batch` /
`stream_batch`. The model step itself (session, IO binding, KV cache) is `_engine`.

One `Generator` may be shared by many threads: every call keeps its state on its own
stack and onnxruntime sessions allow concurrent `run` calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import artifact, cpu, sampling
from . import tokenizer as _tokenizer
from ._engine import Batch, Engine
from .errors import InvalidRequestError
from .params import GenerationParams
from .textstream import TextStream


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's output."""

    text: str  # prompt + completion when return_full_text, else the completion only
    token_ids: tuple[int, ...]  # generated token ids (the stop-string token included)
    prompt_tokens: int  # prompt length in tokens, after any truncation
    finish_reason: str  # "length", "eos" or "stop"

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepResult:
    """One streamed token: its id, the text it makes safe to print, and the finish reason on the last."""

    token_id: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Request:
    """A checked, tokenized prompt with its parameters. Make with `Generator.prepare`.

    >>> req = gen.prepare("Hello", max_new_tokens=5)     # doctest: +SKIP
    >>> req.input_ids, req.params.max_new_tokens          # doctest: +SKIP
    ((15496,), 5)
    """

    prompt: str
    input_ids: tuple[int, ...]  # after truncation; an empty prompt is (bos,)
    params: GenerationParams


def load(model_dir: str, *, threads: int | None = None, verify_hashes: bool = True) -> "Generator":
    """Load a model folder written by `gpt2onnx export`.

    Args:
        model_dir: the model folder.
        threads: intra-op threads; default: the physical cores this process may use
            (CPU affinity and cgroup quota respected).
        verify_hashes: compare every file's sha256 with the manifest (sizes are always
            checked); pass False to skip reading the weights twice on large models.

    Raises:
        ArtifactError: the folder is missing, damaged, or of a newer format.
    """
    return Generator(model_dir, threads=threads, verify_hashes=verify_hashes)


class Generator:
    """Text generation over one onnxruntime session. Build with `gpt2onnx.load`."""

    def __init__(self, model_dir: str, *, threads: int | None = None, verify_hashes: bool = True):
        model_dir = artifact.fspath(model_dir)
        self.manifest = artifact.verify(model_dir, check_hashes=verify_hashes)
        self.model_dir = model_dir
        d = self.manifest.dims
        self.n_layer, self.n_head, self.head_dim = d.n_layer, d.n_head, d.head_dim
        self.n_positions, self.vocab_size = d.n_positions, d.vocab_size
        self.eos_token_id = self.manifest.eos_token_id
        self.bos_token_id = self.manifest.bos_token_id
        self.tokenizer = _tokenizer.load(model_dir, vocab_size=self.vocab_size)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or cpu.physical_cores()
        cpu.warn_oversubscribed(self.threads)
        self.engine = Engine(model_dir, self.manifest, threads=self.threads)
        self.session = self.engine.session

    # -- public API -------------------------------------------------------------------

    def prepare(self, prompt: str, params: GenerationParams | dict | None = None, **overrides) -> Request:
        """Check, tokenize and fit one prompt to the context: the `Request` every path runs.

        An empty prompt starts from ``<|endoftext|>``. A prompt that does not fit the
        context with ``max_new_tokens`` is refused, or loses tokens from the left with
        ``truncation=True``.

        Raises:
            InvalidRequestError: a bad prompt or parameter, or a prompt too long.
        """
        params = self._params(params, overrides)
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError("prompt is not valid Unicode (lone surrogate); send UTF-8 text") from None
        room = self.n_positions - params.max_new_tokens
        if room < 1:
            raise InvalidRequestError(
                f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{self.n_positions} tokens; use max_new_tokens <= {self.n_positions - 1}"
            )
        ids = self.tokenizer.encode(prompt).ids if prompt else [self.bos_token_id]
        if len(ids) > room:
            if not params.truncation:
                raise InvalidRequestError(
                    f"prompt has {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} that exceeds "
                    f"the context of {self.n_positions} tokens; shorten it, lower max_new_tokens, or pass "
                    "truncation=true to drop tokens from the left"
                )
            ids = ids[-room:]
        return Request(prompt, tuple(ids), params)

    def generate(self, prompts: str | Sequence[str], params: GenerationParams | None = None,
                 **overrides) -> list[GenerationResult]:
        """Generate for one prompt or a batch; returns one result per prompt, in order.

        Args:
            prompts: a string or a list of strings. An empty string starts from
                ``<|endoftext|>``, as GPT-2 was trained.
            params: generation parameters (Hugging Face names); keyword overrides win.

        >>> gen.generate("Hello", max_new_tokens=5)[0].finish_reason   # doctest: +SKIP
        'length'
        """
        params = self._params(params, overrides)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.generate_batch([self._prepare_at(i, p, params) for i, p in enumerate(self._prompt_list(prompts))])

    def generate_batch(self, requests: Sequence[Request | tuple[str, GenerationParams]]) -> list[GenerationResult]:
        """Generate for `Request`s (or (prompt, params) pairs) in one batch; each row may have its own params."""
        rows = self._rows(requests)
        for _ in self._decode_loop(rows):
            pass
        return [row.result() for row in rows]

    def stream_batch(self, requests: Sequence[Request | tuple[str, GenerationParams]]
                     ) -> Iterator[tuple[int, StepResult]]:
        """Stream a batch: yields (row index, StepResult) as each row's tokens are produced.

        All active rows advance one token per model step, so the events of one step come
        together; a row's last event carries its finish reason.
        """
        rows = self._rows(requests)  # checked at the call, not at the first next()
        return ((r.index, StepResult(tok, text, reason)) for r, tok, reason, text in self._decode_loop(rows))

    def generate_tokens(self, prompt: str, params: GenerationParams | None = None,
                        **overrides) -> Iterator[StepResult]:
        """Stream one prompt's tokens as they are produced.

        The `text` of each step never splits a multi-byte UTF-8 character and never
        shows a piece of a stop string; join them for the completion.
        """
        request = self.prepare(prompt, params, **overrides)  # a bad request fails here, at the call
        return (step for _, step in self.stream_batch([request]))

    # -- internals --------------------------------------------------------------------

    def _params(self, params, overrides) -> GenerationParams:
        if params is None:
            return GenerationParams.from_dict(overrides)
        if not isinstance(params, GenerationParams):
            if isinstance(params, dict):
                return GenerationParams.from_dict({**params, **overrides})
            raise InvalidRequestError(f"params must be a GenerationParams or a dict, got {type(params).__name__}")
        return params.replace(**overrides) if overrides else params

    @staticmethod
    def _prompt_list(prompts) -> list:
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise InvalidRequestError("the prompt list is empty; pass at least one prompt")
        return list(prompts)

    def _prepare_at(self, index: int, prompt, params: GenerationParams) -> Request:
        """`prepare`, naming the prompt's place in a list in the error."""
        try:
            return self.prepare(prompt, params)
        except InvalidRequestError as e:
            msg = str(e)
            raise InvalidRequestError(f"prompt {index}{msg[len('prompt'):]}" if msg.startswith("prompt ")
                                      else f"prompt {index}: {msg}") from None

    def _rows(self, requests) -> list["_Row"]:
        if not isinstance(requests, (list, tuple)) or not requests or not all(
                isinstance(r, Request) or (isinstance(r, tuple) and len(r) == 2) for r in requests):
            raise InvalidRequestError("requests must be a non-empty list of Requests (Generator.prepare) "
                                      "or of (prompt, GenerationParams) pairs")
        out = []
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                if not isinstance(r[1], GenerationParams):
                    raise InvalidRequestError(f"request {i}: params must be a GenerationParams, "
                                              f"got {type(r[1]).__name__}")
                r = self._prepare_at(i, r[0], r[1])
            out.append(_Row(i, r, TextStream(self._decode, stop=r.params.stop), list(r.input_ids)))
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_loop(self, rows: list["_Row"]) -> Iterator[tuple["_Row", int, str | None, str]]:
        """Yield (row, token, finish_reason or None, new text) for every generated token of every row.

        Each row's prompt is prefilled at its own length (no padding, and a row's tokens
        do not depend on its neighbours); rows of equal length are prefilled together.
        Then all active rows decode together, each at its own position. A finished row is
        dropped from the batch so the others do not pay for it. The engine's `Batch` never
        runs a step with one row, so a row gives the same tokens alone or in any batch.
        """
        batch = Batch(self.engine, [len(r.request.input_ids) for r in rows],
                      int(max(len(r.request.input_ids) + r.request.params.max_new_tokens for r in rows)))
        logits = batch.prefill([r.request.input_ids for r in rows])
        active = list(rows)
        while active:
            nxt = sampling.next_tokens(logits, [r.request.params for r in active], [r.rng for r in active],
                                       [np.asarray(r.history, np.int64) for r in active],
                                       eos_token_id=self.eos_token_id)
            keep = []
            for b, row in enumerate(active):
                tok = int(nxt[b])
                piece, reason = row.push(tok, self.eos_token_id)
                yield row, tok, reason, piece
                if reason is None:
                    keep.append(b)
            if not keep:
                return
            if len(keep) != len(active):
                batch.keep(keep)
                nxt, active = nxt[keep], [active[b] for b in keep]
            logits = batch.decode(nxt)


@dataclass
class _Row:
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
