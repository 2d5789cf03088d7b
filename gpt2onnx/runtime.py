"""Generator: run an exported model folder with onnxruntime + numpy + tokenizers only.

For example::

    import gpt2onnx
    gen = gpt2onnx.load("out/gpt2-int8")
    [r.text for r in gen.generate(["Hello,", "The sky"], max_new_tokens=8)]
    for step in gen.generate_tokens("Once upon a time", max_new_tokens=20):
        print(step.text, end="", flush=True)

One request path: `Generator.prepare` checks a prompt and its parameters, tokenizes it
and fits it to the context once, giving a `Request`; every entry (generate, streaming,
batch jobs, Azure ML, MLflow, Ray) runs Requests through `generate_batch` /
`stream_batch`, or `generate_iterable` (continuous batching). The decode loop (sampling,
stopping, admission) is `_scheduler`; the slots and the model step (session, IO binding)
are `_engine`; the KV cache is `_kvcache`.

Prompts are prefilled in blocks of ``prefill_block`` tokens at fixed positions
(`_prefill`); with ``prefix_cache_mb`` > 0 (the default of batch jobs), the keys and values
of full blocks are kept in a prefix cache bounded in memory (`_prefix`, one per Generator,
least recently used out first) and a prompt that starts with cached blocks skips them.
Tokens are the same with the cache as without it.

One `Generator` may be shared by many threads: every call keeps its state on its own
stack, onnxruntime sessions allow concurrent `run` calls, and the prefix cache locks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

from . import cpu, graphio
from ._engine import Engine
from ._prefix import PrefixCache, PrefixStats, capacity_bytes
from ._scheduler import Sequence as Seq
from ._scheduler import run
from .errors import InvalidRequestError
from .params import GenerationParams, resolve
from .request import GenerationResult, Request, StepResult
from .textstream import TextStream


def load(model_dir: str, *, threads: int | None = None, verify_hashes: bool = True,
         prefill_block: int | None = None) -> "Generator":
    """Load a model folder written by `gpt2onnx export`.

    Args:
        model_dir: the model folder.
        threads: intra-op threads; default: the physical cores this process may use
            (CPU affinity and cgroup quota respected).
        verify_hashes: compare every file's sha256 with the manifest (sizes are always
            checked); pass False to skip reading the weights twice on large models.
        prefill_block: prompt tokens per prefill call and per prefix-cache block (even);
            a decoding row waits at most one block while another row's prompt goes in.
            Default: 64 (an eighth of a context shorter than 512).

    Raises:
        ArtifactError: the folder is missing, damaged, or of a newer format.
    """
    return Generator(model_dir, threads=threads, verify_hashes=verify_hashes, prefill_block=prefill_block)


class Generator:
    """Text generation over one onnxruntime session. Build with `gpt2onnx.load`."""

    def __init__(self, model_dir: str, *, threads: int | None = None, verify_hashes: bool = True,
                 prefill_block: int | None = None):
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
        if prefill_block is not None and (isinstance(prefill_block, bool) or not isinstance(prefill_block, int)
                                          or prefill_block < 2 or prefill_block % 2):
            raise InvalidRequestError(f"prefill_block must be an even number of tokens >= 2, got {prefill_block!r}")
        self.threads = threads or cpu.physical_cores()
        folder = graphio.open_folder(model_dir, self.threads, verify_hashes=verify_hashes)
        cpu.warn_oversubscribed(self.threads)
        self.model_dir, self.manifest, self.tokenizer = folder.path, folder.manifest, folder.tokenizer
        self.n_positions, self.vocab_size = self.manifest.dims.n_positions, self.manifest.dims.vocab_size
        self.eos_token_id = self.manifest.eos_token_id
        self.bos_token_id = self.manifest.bos_token_id
        self._engine = Engine(self.model_dir, self.manifest, threads=self.threads, session=folder.session,
                              block=prefill_block)
        self._prefix: PrefixCache | None = None  # made at the first call that asks for one
        self._prefix_lock = threading.Lock()

    # -- public API -------------------------------------------------------------------

    def prepare(self, prompt: str, params: GenerationParams | dict | None = None, **overrides) -> Request:
        """Check, tokenize and fit one prompt to the context: the `Request` every path runs.

        An empty prompt starts from ``<|endoftext|>``. A prompt that does not fit the
        context with ``max_new_tokens`` is refused, or loses tokens from the left with
        ``truncation=True``.

        Raises:
            InvalidRequestError: a bad prompt or parameter, or a prompt too long.
        """
        params = resolve(params, overrides)  # a GenerationParams alone is used as it is
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

        For example::

            gen.generate("Hello", max_new_tokens=5)[0].finish_reason   # -> 'length'
        """
        params = resolve(params, overrides)  # a GenerationParams alone is used as it is
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.generate_batch([self._prepare_at(i, p, params) for i, p in enumerate(self._prompt_list(prompts))])

    def generate_batch(self, requests: Sequence[Request | tuple[str, GenerationParams]], *,
                       prefix_cache_mb: float = 0) -> list[GenerationResult]:
        """Generate for `Request`s (or (prompt, params) pairs) in one batch; each row may have its own params.

        `prefix_cache_mb`: see `generate_iterable`.
        """
        prefix = self.prefix_cache(prefix_cache_mb)
        rows = self._rows(requests)
        for _ in self._steps(rows, prefix):
            pass
        return [row.result() for row in rows]

    def stream_batch(self, requests: Sequence[Request | tuple[str, GenerationParams]]
                     ) -> Iterator[tuple[int, StepResult]]:
        """Stream a batch: yields (row index, StepResult) as each row's tokens are produced.

        All active rows advance one token per model step, so the events of one step come
        together; a row's last event carries its finish reason.
        """
        rows = self._rows(requests)  # checked at the call, not at the first next()
        return ((r.index, StepResult(tok, text, reason)) for r, tok, reason, text in self._steps(rows))

    def generate_iterable(self, requests: Iterable[Request], *, batch_size: int = 8, prefix_cache_mb: float = 0
                          ) -> Iterator[tuple[int, GenerationResult]]:
        """Continuous batching: yields (index in `requests`, result) as each row finishes.

        Up to `batch_size` rows decode together; when one finishes, the next request takes
        its slot and its prompt goes in one block per step of the others, so the batch stays
        full. Results come in finishing order (CTranslate2's `generate_iterable` yields in input
        order; `gpt2onnx.batch.iter_results` gives input order here); each is exactly what the
        request gives alone.

        `prefix_cache_mb` > 0: full prompt blocks are kept in this Generator's prefix cache
        (at most that many MiB, least recently used out first; shared by its calls) and
        reused by prompts that start with them (batch jobs default to
        `gpt2onnx.batch.core.PREFIX_CACHE_MB`). 0: no cache for this call.

        For example::

            reqs = (gen.prepare(p, max_new_tokens=20) for p in prompts)
            for i, result in gen.generate_iterable(reqs, batch_size=8):
                print(i, result.text)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}")
        prefix = self.prefix_cache(prefix_cache_mb)

        def rows() -> Iterator[Seq]:
            for i, r in enumerate(requests):
                if not isinstance(r, Request):
                    raise InvalidRequestError(f"request {i}: expected a Request (Generator.prepare), "
                                              f"got {type(r).__name__}")
                yield self._row(i, r)

        for row, _, reason, _ in run(self._engine, [], rows(), slots=batch_size, max_len=self.n_positions,
                                     eos_token_id=self.eos_token_id, prefix=prefix):
            if reason is not None:
                yield row.index, row.result()

    def prefix_cache(self, mb: float) -> PrefixCache | None:
        """This Generator's prefix cache with a budget of `mb` MiB (made, or its budget changed); None for 0."""
        budget = capacity_bytes(mb)
        if budget == 0:
            return None
        with self._prefix_lock:
            if self._prefix is None:
                self._prefix = PrefixCache(block=self._engine.block, capacity_bytes=budget)
            else:
                self._prefix.resize(budget)
            return self._prefix

    def prefix_cache_stats(self) -> PrefixStats:
        """Hits, misses, saved prompt tokens, entries, bytes and evictions of the prefix cache since load."""
        return self._prefix.stats() if self._prefix is not None else PrefixStats()

    def _steps(self, rows: list[Seq], prefix: PrefixCache | None = None):
        max_len = int(max(len(r.request.input_ids) + r.request.params.max_new_tokens for r in rows))
        return run(self._engine, rows, None, slots=len(rows), max_len=max_len, eos_token_id=self.eos_token_id,
                   prefix=prefix)

    def _row(self, index: int, request: Request) -> Seq:
        return Seq(index, request, TextStream(self._decode, stop=request.params.stop))

    def generate_tokens(self, prompt: str, params: GenerationParams | None = None,
                        **overrides) -> Iterator[StepResult]:
        """Stream one prompt's tokens as they are produced.

        The `text` of each step never splits a multi-byte UTF-8 character and never
        shows a piece of a stop string; join them for the completion.
        """
        request = self.prepare(prompt, params, **overrides)  # a bad request fails here, at the call
        return (step for _, step in self.stream_batch([request]))

    # -- internals --------------------------------------------------------------------

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

    def _rows(self, requests) -> list[Seq]:
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
            out.append(self._row(i, r))
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
