"""The model step: one onnxruntime session, its IO binding, and the slots of a batch.

`runtime.Generator` decides *what* to run (requests, parameters); `_scheduler` runs the
decode loop (sampling, stopping, admission); a `Batch` here owns the slots, which row is
in each, and runs their steps through an `Engine`. Feeding rules come from `graphio`, the
cache buffers from `_kvcache`.

Batch invariance: a row's tokens must not depend on its neighbours, so a row must take
the same kernel path alone as in any batch. onnxruntime's 8-bit MatMulNBits computes the
rows of its input in pairs and an odd M leaves the last row to a 1-row kernel whose last
bits differ. So where a graph holds such a kernel (`needs_row_pairs`) a `Batch` gives
every MatMul an even M: a prompt of odd length gets one pad token and the LM head keeps 2
positions; a decode step has an even number of slots, a free one riding along as a
scratch row (token 0 at position 0). docs/architecture.md has the measurements.
"""

from __future__ import annotations

import os

import numpy as np

from . import graphio
from ._kvcache import KVCache
from .errors import ArtifactError, first_line

session_options = graphio.session_options  # the old home of the rule; kept for callers of 0.x


def needs_row_pairs(manifest) -> bool:
    """Whether a folder's graph holds a MatMul whose rows depend on M's parity (see the module doc).

    fp32: no. int4 with 4-bit weights at block 32 everywhere (the token table too): no.
    Anything else quantized (8-bit MatMulNBits, 4-bit at other block sizes, an 8-bit head): yes.
    """
    if manifest.precision == "fp32":
        return False
    q = manifest.quantization or {}
    return not (q.get("bits") == 4 and q.get("block_size") == 32 and q.get("lm_head") == "int4"
                and q.get("table_block_size") == 32)


class Engine:
    """One session over a model folder's graph, with the KV-cache I/O names from its manifest."""

    def __init__(self, model_dir: str, manifest, *, threads: int, session=None):
        self.model_dir = model_dir
        d = manifest.dims
        self.n_layer, self.n_head, self.head_dim, self.vocab_size = d.n_layer, d.n_head, d.head_dim, d.vocab_size
        self.session = session or graphio.open_session(os.path.join(model_dir, "model.onnx"), threads)
        self.past_names = manifest.past_names
        self.present_names = manifest.present_names
        self.pairs = needs_row_pairs(manifest)  # every MatMul needs an even number of rows
        self.cache_dtype = manifest.kv_cache.numpy_dtype  # "float32", or "int8" for an --kv-cache int8 folder

    def cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` positions."""
        return KVCache.zeros(batch, self.n_layer, self.n_head, self.head_dim, max_len, self.cache_dtype)

    def bind(self, cache: KVCache, keep: int = 1) -> "Binding":
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
                                f"({first_line(e, 120)}); check the folder with 'gpt2onnx inspect'") from None
        binding = Binding(io, cache.batch, self.vocab_size, keep)
        binding.keep_value = keep_value
        return binding

    def step(self, binding: "Binding", ids: np.ndarray, lengths: np.ndarray, pos: np.ndarray,
             last: bool = True) -> np.ndarray:
        """One model step; returns the last position's logits (B, V) (all kept ones, (B, keep, V), if
        not `last`), a view valid until the next step.

        Args:
            ids: (B, S) new tokens of each row.
            lengths: (B,) each row's length after this step (the attention mask's row sums).
            pos: (B, S) position ids of the new tokens.
        """
        io = binding.io
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("attention_mask", graphio.attention_mask(lengths))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # the folder was checked at load: a graph damaged with verify_hashes=False
            raise ArtifactError(f"onnxruntime failed running {self.model_dir}/model.onnx "
                                f"({first_line(e)}); check the folder with 'gpt2onnx inspect'") from None
        return binding.logits[:, -1, :] if last else binding.logits


class Batch:
    """The slots of one generate call: which row is in each, their KV cache, lengths and binding.

    A slot holds one row (any object: the scheduler's `Sequence`) or is free. Free slots
    ride along in decode steps as scratch rows (token 0 at position 0), which keeps M even
    where the graph needs it (`Engine.pairs`) and lets a new row be prefilled into a freed
    slot while the others go on decoding (continuous batching).

    >>> b = Batch(engine, slots=2, max_len=20)                      # doctest: +SKIP
    >>> logits = b.prefill(["a", "b"], [[1, 2, 3], [4, 5, 6]])      # doctest: +SKIP
    >>> logits = b.decode(np.array([9, 9]))                         # doctest: +SKIP
    """

    def __init__(self, engine: Engine, slots: int, max_len: int):
        self.engine = engine
        self.max_len = max_len + 1  # room for a prompt's pad token
        self.cache = engine.cache(self.width(slots), self.max_len)  # np.zeros: pages are touched only when written
        self.lengths = np.zeros(self.cache.batch, np.int64)  # tokens in each slot
        self.rows: list[object | None] = [None] * self.cache.batch  # the row in each slot; None = free
        self.usable = slots  # slots rows may take (an odd batch's spare stays a scratch row)
        self.binding = engine.bind(self.cache)

    @property
    def slots(self) -> int:
        return self.cache.batch

    def width(self, rows: int) -> int:
        """Slots that `rows` rows take: even where the graph needs row pairs."""
        return rows + rows % 2 if self.engine.pairs else rows

    def busy(self) -> list[int]:
        """The slots that hold a row, ascending."""
        return [s for s, r in enumerate(self.rows) if r is not None]

    def free_slot(self) -> int | None:
        """The first usable free slot, or None when the batch is full."""
        return next((s for s in range(self.usable) if self.rows[s] is None), None)

    def prefill(self, rows: list, prompts) -> np.ndarray:
        """Put `rows` in slots 0..n-1 and prefill their `prompts` (equal lengths together, else one by one);
        returns (n, V) last logits."""
        n = len(prompts)
        if n >= 2 and len({len(p) for p in prompts}) == 1:
            cache = self.cache if n == self.cache.batch else self.cache.rows(n)
            self.lengths[:n] = len(prompts[0])
            self.rows[:n] = rows
            return self._prefill(cache, np.array(prompts, np.int64))
        return np.stack([self.admit(s, r, p) for s, (r, p) in enumerate(zip(rows, prompts))])

    def admit(self, slot: int, row, prompt) -> np.ndarray:
        """Put `row` in free `slot` and prefill its `prompt`; returns its (V,) last logits."""
        assert self.rows[slot] is None, slot
        self.rows[slot] = row
        self.lengths[slot] = len(prompt)
        return self._prefill(self.cache.row(slot), np.array([prompt], np.int64))[0]

    def _prefill(self, cache: KVCache, ids: np.ndarray) -> np.ndarray:
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
        busy = np.array([r is not None for r in self.rows])
        ids = np.where(busy, np.asarray(tokens, np.int64), 0)[:, None]  # a free slot: token 0 at position 0
        pos = np.where(busy, self.lengths, 0)[:, None]
        self.lengths[busy] += 1
        return self.engine.step(self.binding, ids, np.maximum(self.lengths, 1), pos)

    def free(self, slot: int) -> None:
        """The slot's row is done: the slot is free and its cache pages go back to the OS (a slot
        reused by a short row must not keep the memory of a long one)."""
        self.cache.release(slot, slot + 1)
        self.rows[slot] = None
        self.lengths[slot] = 0

    def compact(self) -> list[int]:
        """Keep only the busy slots (renumbered from 0, in order), in place; the batch shrinks to
        `width` of them and no free slot is usable any more. Returns the old slots kept."""
        slots = self.busy()
        lengths = self.lengths[slots]
        n = self.width(len(slots))
        self.cache.move_down(slots, int(lengths.max(initial=0)) + 1)  # in place: ascending, row i read before written
        self.cache.release(len(slots), self.cache.batch)
        self.cache = self.cache.rows(n)
        self.lengths = np.zeros(n, np.int64)
        self.lengths[:len(slots)] = lengths
        self.rows = [self.rows[s] for s in slots] + [None] * (n - len(slots))
        self.usable = len(slots)
        self.binding = self.engine.bind(self.cache)
        return slots


class Binding:
    """A session's IO binding for one cache, with a preallocated (B, keep, V) logits output."""

    def __init__(self, io, batch: int, vocab_size: int, keep: int = 1):
        import onnxruntime as ort

        self.io = io
        self.logits = np.empty((batch, keep, vocab_size), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
