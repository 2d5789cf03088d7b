"""The model step: one onnxruntime session, its IO binding and the in-place KV cache.

>>> engine = Engine(model_dir, manifest, threads=2)                    # doctest: +SKIP
>>> cache = engine.cache(batch=2, max_len=64)                          # doctest: +SKIP
>>> logits = engine.step(engine.bind(cache), ids, lengths, positions)   # doctest: +SKIP

This is the only module that talks to onnxruntime at generation time. `runtime.Generator`
decides *what* to run (rows, sampling, stopping); a `Batch` here runs its steps.

Batch invariance: a row's tokens must not depend on its neighbours, so every row must
take the same kernel path alone as in any batch. onnxruntime's 8-bit MatMulNBits computes
the rows of its input in pairs; an odd M leaves the last row to a 1-row kernel whose last
bits differ (measured on onnxruntime 1.32, 1 and 2 threads: at M = 3, 5, 7 ... only the
last row differs from the paired result, whatever its partner). Near-ties make that bit
visible in the chosen token. So when a graph holds such a kernel (`needs_row_pairs`), a
`Batch` gives every MatMul an even M:

- prefill: a prompt of odd length S gets one trailing pad token (S + 1 rows per
  sequence; the pad's key/value is overwritten by the first decoded token), and the LM
  head keeps the last 2 positions (M = 2 per row); the logits of the last real
  position are taken;
- decode: a `Batch` has an even number of slots; a free slot (a finished row's, or the
  spare of an odd batch) is a scratch row: one token at position 0, rewritten every
  step, so its attention costs nothing.

fp32 graphs (MLAS SGEMM) and int4 graphs whose every MatMulNBits is 4-bit at block 32
give a row the same bits at any M (measured on the 124M architecture: prompts of 1-33
tokens, alone and beside 1-4 partners, first or last, prefill and decode, 1 and 2
threads: no bit differed; the same probe finds the int8 difference in 20 of 20 cases),
so they run a lone row alone: single-stream decode without the scratch row's cost.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

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
    # No CPU arena: it keeps the prefill's peak activations for the session's life. Measured on
    # 124M int8, b8 x 128-token prompts: peak RSS 478 -> 443 MB, decode not slower.
    so.enable_cpu_mem_arena = False
    return so


def needs_row_pairs(manifest) -> bool:
    """Whether a folder's graph holds a MatMul whose rows depend on M's parity (see the module doc).

    fp32: no. int8 of the ``qgemm`` scheme (u8 x s8 integer GEMM, activations quantized per row;
    the whole-graph probe tests/row_probe.py finds no bit that differs): no. int4 with 4-bit
    weights at block 32 everywhere (the token table too): no. Anything else quantized (8-bit
    MatMulNBits, 4-bit at other block sizes, an 8-bit head): yes.
    """
    if manifest.precision == "fp32":
        return False
    q = manifest.quantization or {}
    if q.get("scheme") == "qgemm":  # every MatMul on the integer GEMM, rows quantized alone (exporter/qgemm.py)
        return False
    return not (q.get("bits") == 4 and q.get("block_size") == 32 and q.get("lm_head") == "int4"
                and q.get("table_block_size") == 32)


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
        self.pairs = needs_row_pairs(manifest)  # every MatMul needs an even number of rows
        self.cache_dtype = manifest.kv_cache.numpy_dtype  # "float32", or "int8" for an --kv-cache int8 folder

    def cache(self, batch: int, max_len: int) -> "KVCache":
        """An empty cache for `batch` rows of up to `max_len` positions."""
        return KVCache.zeros(batch, self.n_layer, self.n_head, self.head_dim, max_len, self.cache_dtype)

    def bind(self, cache: "KVCache", keep: int = 1) -> "Binding":
        """An IO binding over `cache` (past and present share each buffer) and a logits buffer.

        `keep`: positions of each row that go through the LM head (the last ones).
        Made once per batch shape and reused for every step: binding 2 x n_layer cache
        buffers and wrapping every output per step cost ~0.4 ms a token on 124M.
        """
        import onnxruntime as ort

        io = self.session.io_binding()
        keep_value = np.array(keep, np.int64)  # kept alive by the Binding: the OrtValue does not copy it
        try:
            # An OrtValue: logits_to_keep is an overridable initializer, which bind_cpu_input cannot find.
            io.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(keep_value))
            for name, out_name, value in zip(self.past_names, self.present_names, cache.values):
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(out_name, value)  # same buffer: GroupQueryAttention appends in place
        except RuntimeError as e:  # a graph damaged with verify_hashes=False: an input name is gone
            raise ArtifactError(f"{self.model_dir}/model.onnx lacks an input its manifest names "
                                f"({str(e).splitlines()[0][:120]}); check the folder with 'gpt2onnx inspect'") from None
        binding = Binding(io, cache.batch, self.vocab_size, keep)
        binding.keep_value = keep_value
        return binding

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
    """Slots for the rows of one generate call: KV cache, lengths, binding; an even M where the graph needs it.

    A slot holds one row or is free. Free slots ride along in decode steps as scratch rows
    (token 0 at position 0), which keeps M even (`Engine.pairs`) and lets a new row be
    prefilled into a freed slot while the others go on decoding (continuous batching).

    >>> b = Batch(engine, slots=2, max_len=20)                 # doctest: +SKIP
    >>> logits = b.prefill([[1, 2, 3], [4, 5, 6, 7, 8]])       # doctest: +SKIP
    >>> logits = b.decode(np.array([9, 9]))                    # doctest: +SKIP
    """

    def __init__(self, engine: Engine, slots: int, max_len: int):
        self.engine = engine
        self.max_len = max_len + 1  # room for a prompt's pad token
        self.cache = engine.cache(self.width(slots), self.max_len)  # np.zeros: pages are touched only when written
        self.lengths = np.zeros(self.cache.batch, np.int64)  # tokens in each slot; 0 = free
        self.binding = engine.bind(self.cache)

    @property
    def slots(self) -> int:
        return self.cache.batch

    def width(self, rows: int) -> int:
        """Slots that `rows` rows take: even where the graph needs row pairs."""
        return rows + rows % 2 if self.engine.pairs else rows

    def prefill(self, prompts) -> np.ndarray:
        """Fill slots 0..n-1 with `prompts` (equal lengths together, else one by one); returns (n, V) last logits."""
        n = len(prompts)
        if n >= 2 and len({len(p) for p in prompts}) == 1:
            cache = self.cache if n == self.cache.batch else self.cache.rows(n)
            self.lengths[:n] = len(prompts[0])
            return self._prefill(cache, np.array(prompts, np.int64))
        return np.stack([self.admit(b, p) for b, p in enumerate(prompts)])

    def admit(self, slot: int, prompt) -> np.ndarray:
        """Prefill one prompt into free `slot`; returns its (V,) last logits."""
        self.lengths[slot] = len(prompt)
        return self._prefill(self.cache.row(slot), np.array([prompt], np.int64))[0]

    def _prefill(self, cache: "KVCache", ids: np.ndarray) -> np.ndarray:
        """Prefill (B, S) prompts into `cache` (B rows); with row pairs, B x even tokens and the LM head on 2 positions."""
        b, s = ids.shape
        pairs = self.engine.pairs
        pad = s % 2 if pairs else 0
        if pad:  # the pad token: any id; its key/value at position S is overwritten by the next step
            ids = np.concatenate([ids, ids[:, -1:]], axis=1)
        pos = np.tile(np.arange(ids.shape[1]), (b, 1))
        keep = 2 if pairs else 1
        logits = self.engine.step(self.engine.bind(cache, keep=keep), ids, np.full(b, ids.shape[1]), pos, last=False)
        return logits[:, -1 - pad].copy()  # (B, V): the last real position

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per slot (ignored for free slots); returns (slots, V) logits, valid until the next step."""
        busy = self.lengths > 0
        ids = np.where(busy, np.asarray(tokens, np.int64), 0)[:, None]  # a free slot: token 0 at position 0
        pos = np.where(busy, self.lengths, 0)[:, None]
        self.lengths[busy] += 1
        return self.engine.step(self.binding, ids, np.maximum(self.lengths, 1), pos)

    def free(self, slot: int) -> None:
        """The slot's row is done: its cache pages go back to the OS (a slot reused by a short
        row must not keep the memory of a long one)."""
        self.cache.release(slot, slot + 1)
        self.lengths[slot] = 0

    def compact(self, slots) -> None:
        """Keep only `slots` (ascending; renumbered from 0), in place; the batch shrinks to `width` of them."""
        slots = [int(s) for s in slots]
        assert slots == sorted(slots), slots  # in place: row i is written only after it was read
        lengths = self.lengths[slots]
        n = self.width(len(slots))
        self.cache.move_down(slots, int(lengths.max(initial=0)) + 1)
        self.cache.release(len(slots), self.cache.batch)
        self.cache = self.cache.rows(n)
        self.lengths = np.zeros(n, np.int64)
        self.lengths[:len(slots)] = lengths
        self.binding = self.engine.bind(self.cache)


class Binding:
    """A session's IO binding for one cache, with a preallocated (B, keep, V) logits output."""

    def __init__(self, io, batch: int, vocab_size: int, keep: int = 1):
        import onnxruntime as ort

        self.io = io
        self.logits = np.empty((batch, keep, vocab_size), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))


class KVCache:
    """Per-layer key/value buffers (B, H, max_len, D) shared by the graph's past and present.

    float32, or int8 when the graph quantizes its cache (the manifest's ``kv_cache``): the
    graph quantizes what it appends and dequantizes what it reads, so to this class an
    int8 cache is bytes like any other (rows, views and compaction copy them as they are).
    """

    def __init__(self, arrays: list[np.ndarray]):
        import onnxruntime as ort

        self.arrays = arrays
        self.batch = arrays[0].shape[0]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # no copy

    @classmethod
    def zeros(cls, batch: int, n_layer: int, n_head: int, head_dim: int, max_len: int,
              dtype="float32") -> "KVCache":
        """Buffers whose memory is used only where written (fresh zero pages, no transparent huge pages).

        numpy asks for transparent huge pages on large arrays; then writing position 0 of one
        head commits the 2 MB around it, i.e. every (row, head) strip of a layer: a cache for
        8 slots x 1024 positions became 605 MB resident for rows of 256 tokens (measured: a
        continuous-batching job of 128-token prompts peaked at 816 MB; 4 kB pages fix it).
        An int8 zero reads as 0.0.
        """
        arrays = [np.zeros((batch, n_head, max_len, head_dim), dtype) for _ in range(2 * n_layer)]
        for a in arrays:
            _madvise(a, _MADV_NOHUGEPAGE)
        return cls(arrays)

    def row(self, r: int) -> "KVCache":
        """A view of one row (writes go into this cache)."""
        return KVCache([a[r:r + 1] for a in self.arrays])

    def rows(self, n: int) -> "KVCache":
        """A view of the first `n` rows (contiguous: writes go into this cache)."""
        return KVCache([a[:n] for a in self.arrays])

    def move_down(self, rows: list[int], used: int) -> None:
        """Copy row rows[i] to row i (rows ascending), the first `used` positions only (the rest
        were never written; copying them would page in the whole buffer)."""
        for a in self.arrays:
            for i, r in enumerate(rows):
                if r != i:
                    a[i, :, :used] = a[r, :, :used]

    def release(self, start: int, stop: int) -> None:
        """Give the memory of rows start..stop-1 back to the OS (their contents are not needed).

        A slot keeps the pages its longest row touched: without this, continuous batching
        over a mixed job grows every slot to the job's longest row (measured: peak RSS 1244
        MB vs 797 for static batching on 64 mixed prompts). Linux: `madvise(MADV_DONTNEED)`
        on the whole pages inside those rows (they read back as zeros; a free row's contents
        are never read: attention stops at each row's length). Elsewhere: nothing.
        """
        if start < stop:
            for a in self.arrays:
                _madvise(a[start:stop], _MADV_DONTNEED)  # contiguous: a C-order buffer or a leading-rows view


def _madvise(a: np.ndarray, advice: int) -> None:
    """madvise() the whole pages inside contiguous `a` (Linux; elsewhere nothing). Advice only: errors are ignored."""
    if _LIBC is None:
        return
    first = -(-a.ctypes.data // _PAGE) * _PAGE
    end = (a.ctypes.data + a.nbytes) // _PAGE * _PAGE
    if end > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), advice)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux: private anonymous pages are dropped and read back as zeros
_MADV_NOHUGEPAGE = 15
