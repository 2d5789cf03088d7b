"""The graph's inputs and sessions: the one place that knows how a gpt2onnx graph is fed.

>>> import numpy as np
>>> attention_mask(np.array([2, 3]))
array([[1, 1, 0],
       [1, 1, 1]])

Every part that runs a graph takes its rules from here: the runtime's engine (IO binding
over the in-place cache), the evaluation (plain ``session.run`` over windows of text), the
exporter's parity check, KV-cache calibration and fidelity gate. The rules:

- session options (`session_options`): intra-op threads, sequential, quiet, no CPU arena;
- feeds (`GraphSpec.feeds`): ids, a mask of ones over past + new tokens, positions that
  continue the past, the past tensors (empty for a fresh run), ``logits_to_keep``;
- the cache dtype (`GraphSpec.cache_dtype`): int8 for an int8-KV graph, else float32;
- log-softmax in float64 (`log_softmax`), which every fidelity figure is computed from.

`open_folder` gives evaluation code a verified folder's manifest, tokenizer and session
without a `Generator`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import ArtifactError, first_line


def session_options(threads: int | None = None):
    """onnxruntime options of every gpt2onnx session: `threads` intra-op (None: onnxruntime's
    default), sequential, quiet, no CPU arena."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # No CPU arena: it keeps the prefill's peak activations for the session's life. Measured on
    # 124M int8, b8 x 128-token prompts: peak RSS 478 -> 443 MB, decode not slower.
    so.enable_cpu_mem_arena = False
    return so


# onnxruntime's CPU GroupQueryAttention reads this when a session builds its kernels (there is no
# session option for it). Its tiled "flash" path computes every (query, key) pair of a prefill
# block, causal half included, and adds the mask and exponentiates over whole rows; the default
# path is one MLAS GEMM per (row, head) and a softmax over the causal part only. Measured on 124M
# int8 (bench/README.md, "Prefill profile (issue #21)"), same outputs to float rounding: b8 x 128
# prefill CPU time -10 % (fp32 KV) / -7 % (int8 KV), b8 decode after 128 tokens -8 % / -5 %.
GQA_FLASH_ENV = "ORT_GQA_DISABLE_FLASH_ATTENTION"


def open_session(path: str, threads: int | None = None):
    """A CPU session over the graph at `path`; a graph onnxruntime refuses raises one-line ArtifactError.

    GroupQueryAttention runs its default (non-flash) path unless the caller's environment sets
    `GQA_FLASH_ENV` itself; the process environment is restored before returning.
    """
    import onnxruntime as ort

    preset = os.environ.get(GQA_FLASH_ENV)
    if preset is None:
        os.environ[GQA_FLASH_ENV] = "1"
    try:
        return ort.InferenceSession(os.fspath(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ArtifactError(f"onnxruntime cannot load {path} ({first_line(e)}); re-export the model folder") from None
    finally:
        if preset is None:
            os.environ.pop(GQA_FLASH_ENV, None)


def attention_mask(lengths: np.ndarray) -> np.ndarray:
    """(B, max length) int64 mask of ones over each row's `lengths` tokens (past + new)."""
    lengths = np.asarray(lengths, np.int64)
    return (np.arange(int(lengths.max(initial=0)))[None] < lengths[:, None]).astype(np.int64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64.

    >>> log_softmax(np.zeros(2)).round(4).tolist()
    [-0.6931, -0.6931]
    """
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass(frozen=True)
class GraphSpec:
    """What feeding a gpt2onnx-style session needs: the cache names, shapes and dtype."""

    past_names: tuple[str, ...]  # past_key_values.{i}.key|value, in order
    n_head: int
    head_dim: int
    has_logits_to_keep: bool
    cache_dtype: type = np.float32  # np.int8 for a folder exported with --kv-cache int8

    @classmethod
    def of(cls, session) -> "GraphSpec":
        """Read the spec off a session (onnxruntime's, or anything with its `get_inputs`)."""
        try:
            inputs = {i.name: i for i in session.get_inputs()}
        except (UnicodeDecodeError, RuntimeError) as e:  # a graph damaged where nothing checked its hash
            raise ArtifactError(f"the graph's inputs cannot be read ({first_line(e)}); "
                                "check the folder with 'gpt2onnx inspect'") from None
        past = tuple(n for n in inputs if n.startswith("past_key_values."))
        if not past or "input_ids" not in inputs:
            raise ArtifactError("the session is not a GPT-2 decoder with a KV cache (no past_key_values.* inputs); "
                                "export the model with gpt2onnx")
        shape = inputs[past[0]].shape  # (B, H, P, D): H and D are fixed numbers
        # logits_to_keep is an optional input (an overridable initializer, default 0) in
        # current exports and a required one in older folders.
        optional = getattr(session, "get_overridable_initializers", lambda: [])()
        has_keep = "logits_to_keep" in inputs or any(i.name == "logits_to_keep" for i in optional)
        dtype = np.int8 if getattr(inputs[past[0]], "type", None) == "tensor(int8)" else np.float32
        return cls(past, int(shape[1]), int(shape[3]), has_keep, dtype)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The past tensors of a fresh run: (batch, H, 0, D) each."""
        return [np.zeros((batch, self.n_head, 0, self.head_dim), self.cache_dtype)] * len(self.past_names)

    def feeds(self, ids: np.ndarray, keep: int = 0, past: list[np.ndarray] | None = None,
              mask: np.ndarray | None = None, positions: np.ndarray | None = None) -> dict:
        """Feeds of one run over `ids` (B, S) after `past` (default: none) keeping `keep` positions (0 = all).

        `mask` defaults to ones over past + new tokens and `positions` to the ones that
        continue the past; left-padded callers (the parity check) pass their own.
        """
        ids = np.asarray(ids, np.int64)
        b, s = ids.shape
        past = self.empty_past(b) if past is None else past
        p = past[0].shape[2]
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((b, p + s), np.int64) if mask is None else mask,
                 "position_ids": (np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
                                  if positions is None else positions)}
        feeds.update(zip(self.past_names, past))
        if self.has_logits_to_keep:
            feeds["logits_to_keep"] = np.array(keep, np.int64)
        return feeds


@dataclass(frozen=True)
class Folder:
    """A verified model folder opened for measurement: manifest, tokenizer, session and its spec."""

    path: str
    manifest: object  # artifact.Manifest
    tokenizer: object  # tokenizers.Tokenizer
    session: object  # onnxruntime.InferenceSession

    @cached_property
    def spec(self) -> GraphSpec:
        return GraphSpec.of(self.session)


def open_folder(model_dir: str, threads: int | None = None, verify_hashes: bool = True) -> Folder:
    """Open a model folder: verify it, load its tokenizer, open its graph (`threads` default: the physical cores)::

        f = open_folder("out/gpt2-int8")
        logits, *present = f.session.run(None, f.spec.feeds(ids))
    """
    from . import artifact, cpu
    from . import tokenizer as _tokenizer

    threads = threads or cpu.physical_cores()
    model_dir = artifact.fspath(model_dir)
    manifest = artifact.verify(model_dir, check_hashes=verify_hashes)
    tok = _tokenizer.load(model_dir, vocab_size=manifest.dims.vocab_size)
    session = open_session(os.path.join(model_dir, "model.onnx"), threads)
    return Folder(model_dir, manifest, tok, session)
