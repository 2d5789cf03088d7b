"""Generator: run an exported model folder with onnxruntime + numpy + tokenizers only.

>>> import gpt2onnx
>>> gen = gpt2onnx.load("out/gpt2-int8")                                   # doctest: +SKIP
>>> [r.text for r in gen.generate(["Hello,", "The sky"], max_new_tokens=8)]  # doctest: +SKIP
>>> for step in gen.generate_tokens("Once upon a time", max_new_tokens=20):  # doctest: +SKIP
...     print(step.text, end="", flush=True)

One `Generator` may be shared by many threads: every call keeps its state on its own
stack and onnxruntime sessions allow concurrent `run` calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import artifact, cpu, sampling
from . import tokenizer as _tokenizer
from .errors import ArtifactError, InvalidRequestError
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
        import onnxruntime as ort

        model_dir = artifact.fspath(model_dir)
        self.manifest = artifact.verify(model_dir, check_hashes=verify_hashes)
        self.model_dir = model_dir
        d = self.manifest["dims"]
        self.n_layer, self.n_head, self.head_dim = d["n_layer"], d["n_head"], d["head_dim"]
        self.n_positions, self.vocab_size = d["n_positions"], d["vocab_size"]
        self.eos_token_id = int(self.manifest.get("eos_token_id", self.vocab_size - 1))
        self.bos_token_id = int(self.manifest.get("bos_token_id", self.eos_token_id))
        self.tokenizer = _tokenizer.load(model_dir, vocab_size=self.vocab_size)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or cpu.physical_cores()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {model_dir}/model.onnx ({str(e).splitlines()[0][:160]}); "
                                "re-export the model folder") from None
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]

    # -- public API -------------------------------------------------------------------

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
        return self.generate_batch([(p, params) for p in self._check_prompts(prompts)])

    def generate_batch(self, requests: Sequence[tuple[str, GenerationParams]]) -> list[GenerationResult]:
        """Generate for (prompt, params) pairs in one batch; each row may have its own params."""
        rows = self._rows(requests)
        streams = [TextStream(self._decode, stop=prm.stop) for _, _, prm in rows]
        out: list[list[int]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * len(rows)
        for i, tok, reason, _ in self._decode_loop(rows, streams):
            out[i].append(tok)
            if reason:
                reasons[i] = reason
        results = []
        for (prompt, ids, prm), s, toks, reason in zip(rows, streams, out, reasons):
            s.finish()
            text = s.text
            results.append(GenerationResult(prompt + text if prm.return_full_text else text,
                                            tuple(toks), len(ids), reason or "length"))
        return results

    def stream_batch(self, requests: Sequence[tuple[str, GenerationParams]]) -> Iterator[tuple[int, StepResult]]:
        """Stream a batch: yields (row index, StepResult) as each row's tokens are produced.

        All active rows advance one token per model step, so the events of one step come
        together; a row's last event carries its finish reason.
        """
        rows = self._rows(requests)  # checked at the call, not at the first next()
        streams = [TextStream(self._decode, stop=prm.stop) for _, _, prm in rows]
        return self._stream(rows, streams)

    def _stream(self, rows, streams) -> Iterator[tuple[int, StepResult]]:
        for r, tok, reason, text in self._decode_loop(rows, streams):
            if reason and not streams[r].stopped:
                text += streams[r].finish()
            yield r, StepResult(tok, text, reason)

    def generate_tokens(self, prompt: str, params: GenerationParams | None = None,
                        **overrides) -> Iterator[StepResult]:
        """Stream one prompt's tokens as they are produced.

        The `text` of each step never splits a multi-byte UTF-8 character and never
        shows a piece of a stop string; join them for the completion.
        """
        params = self._params(params, overrides)
        [prompt] = self._check_prompts([prompt])
        return (step for _, step in self.stream_batch([(prompt, params)]))  # a bad request fails here, at the call

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
    def _check_prompts(prompts) -> list[str]:
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise InvalidRequestError("the prompt list is empty; pass at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InvalidRequestError(f"prompt {i} must be a string, got {type(p).__name__}")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"prompt {i} is not valid Unicode (lone surrogate); "
                                          "send UTF-8 text") from None
        return list(prompts)

    def _rows(self, requests) -> list[tuple[str, list[int], GenerationParams]]:
        if not isinstance(requests, (list, tuple)) or not all(isinstance(r, tuple) and len(r) == 2 for r in requests):
            raise InvalidRequestError("requests must be a list of (prompt, GenerationParams) pairs")
        requests = list(requests)
        prompts = self._check_prompts([p for p, _ in requests])
        for i, (_, prm) in enumerate(requests):
            if not isinstance(prm, GenerationParams):
                raise InvalidRequestError(f"request {i}: params must be a GenerationParams, got {type(prm).__name__}")
        return [self._encode(i, p, prm) for i, (p, (_, prm)) in enumerate(zip(prompts, requests))]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _encode(self, index: int, prompt: str, params: GenerationParams) -> tuple[str, list[int], GenerationParams]:
        ids = self.tokenizer.encode(prompt).ids if prompt else [self.bos_token_id]
        room = self.n_positions - params.max_new_tokens
        if room < 1:
            raise InvalidRequestError(
                f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{self.n_positions} tokens; use max_new_tokens <= {self.n_positions - 1}"
            )
        if len(ids) > room:
            if not params.truncation:
                raise InvalidRequestError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} that exceeds "
                    f"the context of {self.n_positions} tokens; shorten it, lower max_new_tokens, or pass "
                    "truncation=true to drop tokens from the left"
                )
            ids = ids[-room:]
        return prompt, ids, params

    def _bind(self, cache: "_KVCache") -> "_Binding":
        """An IO binding over `cache` (past and present share each buffer) and a logits buffer.

        Made once per batch shape and reused for every step: binding 2 x n_layer cache
        buffers and wrapping every output per step cost ~0.4 ms a token on 124M.
        """
        io = self.session.io_binding()
        io.bind_cpu_input("logits_to_keep", _ONE)
        for name, out_name, value in zip(self._past_names, self._present_names, cache.values):
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(out_name, value)  # same buffer: GroupQueryAttention appends in place
        return _Binding(io, cache.batch, self.vocab_size)

    def _run(self, binding: "_Binding", ids: np.ndarray, lengths: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """One model step; returns the last position's logits (B,V), a view valid until the next step.

        `lengths` are the rows' lengths after this step; the graph reads only their sums
        from the mask, and writes the new keys/values into the cache in place.
        """
        io = binding.io
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        total = int(lengths.max())
        io.bind_cpu_input("attention_mask", (np.arange(total)[None] < lengths[:, None]).astype(np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # the folder was checked at load: a graph damaged with verify_hashes=False
            raise ArtifactError(f"onnxruntime failed running {self.model_dir}/model.onnx "
                                f"({str(e).splitlines()[0][:160]}); check the folder with 'gpt2onnx inspect'") from None
        return binding.logits[:, -1, :]

    def _decode_loop(self, rows, streams) -> Iterator[tuple[int, int, str | None, str]]:
        """Yield (row, token, finish_reason or None, new text) for every generated token of every row.

        The KV cache is one preallocated buffer per layer, (B, H, max_len, D), that the
        graph fills in place (no per-step copies). Each row's prompt is prefilled at its
        own length (no padding, and a row's tokens do not depend on its neighbours); then
        all active rows decode together, each at its own position. A finished row is
        dropped from the batch so the others do not pay for it.
        """
        n = len(rows)
        lengths = np.array([len(ids) for _, ids, _ in rows], np.int64)
        params = [prm for _, _, prm in rows]
        cache = _KVCache.zeros(n, self.n_layer, self.n_head, self.head_dim,
                         int(max(len(ids) + prm.max_new_tokens for _, ids, prm in rows)))
        binding = self._bind(cache)
        if len(set(lengths.tolist())) == 1:  # equal lengths: one batched prefill
            ids = np.array([ids for _, ids, _ in rows], np.int64)
            logits = self._run(binding, ids, lengths, np.tile(np.arange(ids.shape[1]), (n, 1)))
        else:
            logits = np.empty((n, self.vocab_size), np.float32)
            for r, (_, ids, _) in enumerate(rows):
                row = self._bind(cache.row(r))
                logits[r] = self._run(row, np.array([ids]), lengths[r:r + 1], np.arange(len(ids))[None])[0]
        rngs = [sampling.make_rng(p.seed) for p in params]
        histories = [list(toks) for _, toks, _ in rows]
        active = list(range(n))  # original row index of each batch row
        counts = [0] * n
        while active:
            nxt = sampling.next_tokens(logits, [params[r] for r in active], [rngs[r] for r in active],
                                       [np.asarray(histories[r], np.int64) for r in active],
                                       eos_token_id=self.eos_token_id)
            keep = []
            for b, r in enumerate(active):
                tok = int(nxt[b])
                histories[r].append(tok)
                counts[r] += 1
                piece = streams[r].push(tok)
                reason = None
                if tok == self.eos_token_id and not params[r].ignore_eos:
                    reason = "eos"
                elif streams[r].stopped:
                    reason = "stop"
                elif counts[r] >= params[r].max_new_tokens:
                    reason = "length"
                yield r, tok, reason, piece
                if reason is None:
                    keep.append(b)
            if not keep:
                return
            if len(keep) != len(active):
                sel = np.asarray(keep)
                cache = cache.select(sel)
                binding = self._bind(cache)
                lengths, nxt = lengths[sel], nxt[sel]
                active = [active[b] for b in keep]
            pos = lengths[:, None]
            lengths = lengths + 1
            logits = self._run(binding, nxt[:, None], lengths, pos)


_ONE = np.array(1, np.int64)


class _Binding:
    """A session's IO binding for one cache, with a preallocated (B, 1, V) logits output."""

    def __init__(self, io, batch: int, vocab_size: int):
        import onnxruntime as ort

        self.io = io
        self.logits = np.empty((batch, 1, vocab_size), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))


class _KVCache:
    """Per-layer key/value buffers (B, H, max_len, D) shared by the graph's past and present."""

    def __init__(self, arrays: list[np.ndarray]):
        import onnxruntime as ort

        self.arrays = arrays
        self.batch = arrays[0].shape[0]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # no copy

    @classmethod
    def zeros(cls, batch: int, n_layer: int, n_head: int, head_dim: int, max_len: int) -> "_KVCache":
        # np.zeros maps fresh pages lazily: only the positions written are touched.
        return cls([np.zeros((batch, n_head, max_len, head_dim), np.float32) for _ in range(2 * n_layer)])

    def row(self, r: int) -> "_KVCache":
        """A view of one row (writes go into this cache)."""
        return _KVCache([a[r:r + 1] for a in self.arrays])

    def select(self, rows: np.ndarray) -> "_KVCache":
        """A compacted copy holding only `rows`."""
        return _KVCache([np.ascontiguousarray(a[rows]) for a in self.arrays])
