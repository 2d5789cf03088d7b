"""The model step: one onnxruntime session, its IO binding and the in-place KV cache.

>>> engine = Engine(model_dir, manifest, threads=2)                    # doctest: +SKIP
>>> cache = engine.cache(batch=2, max_len=64)                          # doctest: +SKIP
>>> logits = engine.step(engine.bind(cache), ids, lengths, positions)   # doctest: +SKIP

This is the only module that talks to onnxruntime at generation time. `runtime.Generator`
decides *what* to run (rows, sampling, stopping); this module runs one step of it.

The KV cache is one preallocated buffer per layer, (B, H, max_len, D), bound as both
the graph's past input and its present output: GroupQueryAttention appends the new
keys/values in place, so nothing is copied per step::

    past_key_values.{i}.key ──┐            ┌──> present.{i}.key
                              └─ buffer i ─┘    (same memory; the graph writes at each row's length)
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ArtifactError

_ONE = np.array(1, np.int64)


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

    def bind(self, cache: "KVCache") -> "Binding":
        """An IO binding over `cache` (past and present share each buffer) and a logits buffer.

        Made once per batch shape and reused for every step: binding 2 x n_layer cache
        buffers and wrapping every output per step cost ~0.4 ms a token on 124M.
        """
        import onnxruntime as ort

        io = self.session.io_binding()
        try:
            # An OrtValue: logits_to_keep is an overridable initializer, which bind_cpu_input cannot find.
            io.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(_ONE))
            for name, out_name, value in zip(self.past_names, self.present_names, cache.values):
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(out_name, value)  # same buffer: GroupQueryAttention appends in place
        except RuntimeError as e:  # a graph damaged with verify_hashes=False: an input name is gone
            raise ArtifactError(f"{self.model_dir}/model.onnx lacks an input its manifest names "
                                f"({str(e).splitlines()[0][:120]}); check the folder with 'gpt2onnx inspect'") from None
        return Binding(io, cache.batch, self.vocab_size)

    def step(self, binding: "Binding", ids: np.ndarray, lengths: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """One model step; returns the last position's logits (B, V), a view valid until the next step.

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
        return binding.logits[:, -1, :]


class Binding:
    """A session's IO binding for one cache, with a preallocated (B, 1, V) logits output."""

    def __init__(self, io, batch: int, vocab_size: int):
        import onnxruntime as ort

        self.io = io
        self.logits = np.empty((batch, 1, vocab_size), np.float32)
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

    def select(self, rows: np.ndarray) -> "KVCache":
        """A compacted copy holding only `rows`."""
        return KVCache([np.ascontiguousarray(a[rows]) for a in self.arrays])
