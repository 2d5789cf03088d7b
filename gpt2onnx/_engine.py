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

A prompt is prefilled in blocks of `Engine.block` tokens at positions 0, B, 2B ... (`_prefill`:
why, and what the prefix cache adds); a slot mid-prefill rides in decode steps with a dummy
token at its next position, which its next block overwrites.
"""

from __future__ import annotations

import os

import numpy as np

from . import graphio
from ._kvcache import KVCache
from .errors import ArtifactError, first_line

session_options = graphio.session_options  # the old home of the rule; kept for callers of 0.x
PREFILL_BLOCK = 64  # prompt tokens per prefill call and per prefix-cache entry (see _prefill); even


def prefill_block(n_positions: int) -> int:
    """The default block: `PREFILL_BLOCK`, or an eighth of a shorter context (even, >= 2).

    >>> prefill_block(1024), prefill_block(64)
    (64, 8)
    """
    return max(2, min(PREFILL_BLOCK, n_positions // 16 * 2))


def needs_row_pairs(manifest) -> bool:
    """Whether a folder's graph holds a MatMul whose rows depend on M's parity (see the module doc).

    fp32: no. int8 of the ``qgemm`` scheme (u8 x s8 integer GEMM, activations quantized per row;
    the whole-graph probe tests/helpers/row_probe.py finds no bit that differs): no. int4 with 4-bit
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

    def __init__(self, model_dir: str, manifest, *, threads: int, session=None, block: int | None = None):
        block = block or prefill_block(manifest.dims.n_positions)
        if block < 2 or block % 2:
            raise ValueError(f"the prefill block must be an even number of tokens >= 2, got {block}")
        self.model_dir = model_dir
        self.block = block  # prefill block (tokens)
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

    For example::

        b = Batch(engine, slots=2, max_len=20)
        logits = b.prefill(["a", "b"], [[1, 2, 3], [4, 5, 6]])
        logits = b.decode(np.array([9, 9]))

    `prefix`: a `_prefix.PrefixCache` of this engine's blocks, or None.
    """

    def __init__(self, engine: Engine, slots: int, max_len: int, prefix=None):
        self.engine = engine
        self.prefix = prefix
        self.max_len = max_len + 1  # room for a prompt's pad token
        self.cache = engine.cache(self.width(slots), self.max_len)  # np.zeros: pages are touched only when written
        self.lengths = np.zeros(self.cache.batch, np.int64)  # tokens in each slot
        self.rows: list[object | None] = [None] * self.cache.batch  # the row in each slot; None = free
        self.usable = slots  # slots rows may take (an odd batch's spare stays a scratch row)
        self.binding = engine.bind(self.cache)
        n = self.cache.batch
        self.todo: list[tuple | None] = [None] * n  # a slot's prompt while its prefill is unfinished
        self.keys: list[list[bytes]] = [[] for _ in range(n)]  # prefix-cache keys of its full blocks
        self.asked = np.full(n, -1, np.int64)  # the position the prefix cache was last asked from
        self.since = np.zeros(n, np.int64)  # admission order
        self._admitted = 0

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

    def start(self, slot: int, row, prompt) -> None:
        """Put `row` in free `slot` with its `prompt` to prefill (`_prefill.step` runs the blocks)."""
        assert self.rows[slot] is None, slot
        self.rows[slot], self.todo[slot] = row, tuple(prompt)
        self.lengths[slot], self.asked[slot] = 0, -1
        self.keys[slot] = self.prefix.keys(prompt) if self.prefix is not None else []
        self.since[slot] = self._admitted = self._admitted + 1

    def waiting(self) -> list[int]:
        """Slots whose prompt is not fully prefilled, oldest admission first."""
        return sorted((s for s, t in enumerate(self.todo) if t is not None), key=lambda s: self.since[s])

    def prefill(self, rows: list, prompts) -> np.ndarray:
        """Put `rows` in slots 0..n-1 and prefill their `prompts` whole; returns (n, V) last logits."""
        from ._prefill import step

        for s, (r, p) in enumerate(zip(rows, prompts)):
            self.start(s, r, p)
        done: dict[int, np.ndarray] = {}
        while self.waiting():
            done.update(step(self, group=True))
        return np.stack([done[s] for s in range(len(rows))])

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per decoding slot; returns (slots, V) logits, valid until the next step.

        A free slot gets token 0 at position 0 (a scratch row); a slot mid-prefill a dummy
        token at its next position, overwritten by its next block; neither grows.
        """
        busy = np.array([r is not None and t is None for r, t in zip(self.rows, self.todo)])
        filling = np.array([t is not None for t in self.todo])
        ids = np.where(busy, np.asarray(tokens, np.int64), 0)[:, None]
        pos = np.where(busy | filling, self.lengths, 0)[:, None]
        self.lengths[busy] += 1
        return self.engine.step(self.binding, ids, np.maximum(self.lengths + filling, 1), pos)

    def free(self, slot: int) -> None:
        """The slot's row is done: the slot is free and its cache pages go back to the OS (a slot
        reused by a short row must not keep the memory of a long one)."""
        self.cache.release(slot, slot + 1)
        self.rows[slot] = self.todo[slot] = None
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
        self.todo = [self.todo[s] for s in slots] + [None] * (n - len(slots))
        self.keys = [self.keys[s] for s in slots] + [[] for _ in range(n - len(slots))]
        self.asked = np.concatenate([self.asked[slots], np.full(n - len(slots), -1, np.int64)])
        self.since = np.concatenate([self.since[slots], np.zeros(n - len(slots), np.int64)])
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
