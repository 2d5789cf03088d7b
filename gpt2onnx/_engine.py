"""The model step: one onnxruntime session, its IO binding and the in-place KV cache.

>>> engine = Engine(model_dir, manifest, threads=2)                    # doctest: +SKIP
>>> cache = engine.cache(batch=2, max_len=64)                          # doctest: +SKIP
>>> logits = engine.step(engine.bind(cache), ids, lengths, positions)   # doctest: +SKIP

This is the only module that talks to onnxruntime at generation time. `runtime.Generator`
decides *what* to run (rows, sampling, stopping); a `Batch` here runs its steps.

Batch invariance: a row's tokens must not depend on its neighbours, so every row must
take the same kernel path alone as in any batch. onnxruntime's MatMulNBits (int8, int4)
computes the rows of its input in pairs; an odd M leaves the last row to a 1-row kernel
whose last bits differ (measured on onnxruntime 1.32, 1 and 2 threads: at M = 3, 5, 7 ...
only the last row differs from the paired result, whatever its partner). Near-ties make
that bit visible in the chosen token. So a `Batch` gives every MatMul an even M:

- prefill: a prompt of odd length S gets one trailing pad token (S + 1 rows per
  sequence; the pad's key/value is overwritten by the first decoded token), and the LM
  head keeps the last 2 positions (M = 2 per row); the logits of the last real
  position are taken;
- decode: an odd number of active rows gets a scratch row (one token at position 0,
  rewritten every step, so its attention costs nothing).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ArtifactError

def session_options(threads: int):
    """onnxruntime options of every gpt2onnx session: `threads` intra-op, sequential, quiet."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


class Engine:
    """One session over a model folder's graph, with the KV-cache I/O names from its manifest."""

    def __init__(self, model_dir: str, manifest, *, threads: int):
        import onnxruntime as ort

        self.model_dir = model_dir
        d = manifest.dims
        self.n_layer, self.n_head, self.head_dim, self.vocab_size = d.n_layer, d.n_head, d.head_dim, d.vocab_size
        try:
            self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {model_dir}/model.onnx ({str(e).splitlines()[0][:160]}); "
                                "re-export the model folder") from None
        self.past_names = manifest.past_names
        self.present_names = manifest.present_names

    def cache(self, batch: int, max_len: int) -> "KVCache":
        """An empty cache for `batch` rows of up to `max_len` positions."""
        return KVCache.zeros(batch, self.n_layer, self.n_head, self.head_dim, max_len)

    def bind(self, cache: "KVCache", keep: int = 1) -> "Binding":
        """An IO binding over `cache` (past and present share each buffer) and a logits buffer.

        `keep`: positions of each row that go through the LM head (the last ones).
        Made once per batch shape and reused for every step: binding 2 x n_layer cache
        buffers and wrapping every output per step cost ~0.4 ms a token on 124M.
        """
        io = self.session.io_binding()
        io.bind_cpu_input("logits_to_keep", np.array(keep, np.int64))
        for name, out_name, value in zip(self.past_names, self.present_names, cache.values):
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(out_name, value)  # same buffer: GroupQueryAttention appends in place
        return Binding(io, cache.batch, self.vocab_size, keep)

    def step(self, binding: "Binding", ids: np.ndarray, lengths: np.ndarray, pos: np.ndarray,
             last: bool = True) -> np.ndarray:
        """One model step; returns the last position's logits (B, V) (all kept ones, (B, keep, V), if
        not `last`), a view valid until the next step.

        Args:
            ids: (B, S) new tokens of each row.
            lengths: (B,) each row's length after this step; the graph reads only the
                sums of the mask built from them.
            pos: (B, S) position ids of the new tokens.
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
        return binding.logits[:, -1, :] if last else binding.logits


class Batch:
    """The rows of one generate call: their KV cache, lengths and binding; every MatMul sees an even M.

    >>> b = Batch(engine, [3, 5], max_len=20)               # doctest: +SKIP
    >>> logits = b.prefill([[1, 2, 3], [4, 5, 6, 7, 8]])     # doctest: +SKIP
    >>> logits = b.decode(np.array([9, 9]))                  # doctest: +SKIP
    """

    def __init__(self, engine: Engine, lengths, max_len: int):
        self.engine = engine
        self.lengths = np.asarray(lengths, np.int64)  # each active row's length (prompt + tokens fed)
        self.max_len = max_len + 1  # room for a prompt's pad token
        self.cache = engine.cache(_even(len(self.lengths)), self.max_len)  # np.zeros: paged in lazily
        self.binding = engine.bind(self.cache)

    def prefill(self, prompts) -> np.ndarray:
        """Feed every row's prompt (equal lengths together, else row by row); returns (B, V) last logits."""
        eng, n = self.engine, len(prompts)
        if n >= 2 and len({len(p) for p in prompts}) == 1:
            cache = self.cache if n == self.cache.batch else self.cache.rows(n)
            return self._prefill(cache, np.array(prompts, np.int64))
        logits = np.empty((n, eng.vocab_size), np.float32)
        for b, p in enumerate(prompts):
            logits[b] = self._prefill(self.cache.row(b), np.array([p], np.int64))[0]
        return logits

    def _prefill(self, cache: "KVCache", ids: np.ndarray) -> np.ndarray:
        """Prefill (B, S) prompts into `cache` (B rows): B x even tokens, the LM head on 2 positions each."""
        b, s = ids.shape
        if s % 2:  # the pad token: any id; its key/value at position S is overwritten by the next step
            ids = np.concatenate([ids, ids[:, -1:]], axis=1)
        pos = np.tile(np.arange(ids.shape[1]), (b, 1))
        logits = self.engine.step(self.engine.bind(cache, keep=2), ids, np.full(b, ids.shape[1]), pos, last=False)
        return logits[:, -1 - s % 2]  # (B, V): the last real position

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one new token per active row; returns (B, V) logits, valid until the next step."""
        m = len(self.lengths)
        pos = self.lengths[:, None]
        self.lengths = self.lengths + 1
        ids, lengths = np.asarray(tokens, np.int64)[:, None], self.lengths
        if m % 2:  # the scratch row: token 0 at position 0, length 1
            ids, pos = np.concatenate([ids, [[0]]]), np.concatenate([pos, [[0]]])
            lengths = np.concatenate([lengths, [1]])
        return self.engine.step(self.binding, ids, lengths, pos)[:m]

    def keep(self, rows) -> None:
        """Keep only `rows` (indices of the active rows), compacting the cache."""
        rows = np.asarray(rows)
        self.lengths = self.lengths[rows]
        self.cache = self.cache.select(rows, _even(len(rows)))
        self.binding = self.engine.bind(self.cache)


def _even(n: int) -> int:
    return n + n % 2


class Binding:
    """A session's IO binding for one cache, with a preallocated (B, keep, V) logits output."""

    def __init__(self, io, batch: int, vocab_size: int, keep: int = 1):
        import onnxruntime as ort

        self.io = io
        self.logits = np.empty((batch, keep, vocab_size), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))


class KVCache:
    """Per-layer key/value buffers (B, H, max_len, D) shared by the graph's past and present."""

    def __init__(self, arrays: list[np.ndarray]):
        import onnxruntime as ort

        self.arrays = arrays
        self.batch = arrays[0].shape[0]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # no copy

    @classmethod
    def zeros(cls, batch: int, n_layer: int, n_head: int, head_dim: int, max_len: int) -> "KVCache":
        # np.zeros maps fresh pages lazily: only the positions written are touched.
        return cls([np.zeros((batch, n_head, max_len, head_dim), np.float32) for _ in range(2 * n_layer)])

    def row(self, r: int) -> "KVCache":
        """A view of one row (writes go into this cache)."""
        return KVCache([a[r:r + 1] for a in self.arrays])

    def rows(self, n: int) -> "KVCache":
        """A view of the first `n` rows (contiguous: writes go into this cache)."""
        return KVCache([a[:n] for a in self.arrays])

    def select(self, rows: np.ndarray, batch: int) -> "KVCache":
        """A compacted copy with `rows` first, zero rows after them up to `batch` rows."""
        out = []
        for a in self.arrays:
            b = np.zeros((batch, *a.shape[1:]), a.dtype)  # calloc: untouched pages stay unmapped
            b[:len(rows)] = a[rows]
            out.append(b)
        return KVCache(out)
