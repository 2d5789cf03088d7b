"""Check an exported graph against the PyTorch model it came from.

The reference is computed once from PyTorch and kept as numpy arrays, so the PyTorch
model can be freed before the (memory-hungry) quantization and each candidate graph is
compared against the same figures. It holds two sequences over the same random prompts
of mixed lengths, each a prefill then several cached decode steps fed with the
reference's own greedy tokens:

- ``right``: the prompts right-padded, and each row's new token at its own position
  with a contiguous cache (the mask gives each row's length): the gpt2onnx runtime's
  layout;
- ``left``: the prompts left-padded, every new token appended after the longest row
  and the mask extended by one 1 per step, position ids from the mask's cumulative sum:
  what Hugging Face ``generate`` (and Optimum's ORTModelForCausalLM) feed a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graphio import log_softmax

FP32_TOLERANCE = 1e-3  # max |logit difference| accepted for an fp32 export
PADDINGS = ("right", "left")  # the two sequences of the reference


@dataclass
class Step:
    feeds: dict  # input_ids, attention_mask, position_ids (no past)
    logits: np.ndarray  # (B,S,V) reference logits
    valid: np.ndarray  # (B,S) bool: positions that are real tokens
    fresh: bool = False  # the first step of a sequence: start from an empty cache
    padding: str = "right"  # which sequence of `PADDINGS` this step belongs to


def prompts(vocab_size: int, n_positions: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded batch of random prompts of mixed lengths: (ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    longest = max(2, min(24, n_positions // 2))
    lengths = [longest, 1, max(1, longest // 3)]
    ids = rng.integers(0, vocab_size, (len(lengths), longest))
    mask = (np.arange(longest)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask


def left_padded(ids: np.ndarray, mask: np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same prompts moved to the right end of each row (Hugging Face batched generate)."""
    lengths = mask.sum(-1)
    width = ids.shape[1]
    out = np.full_like(ids, pad_id)
    for b, n in enumerate(lengths):
        out[b, width - n:] = ids[b, :n]
    return out, (np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int64)


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
    """Position ids from a Hugging Face mask, as transformers and Optimum make them (padding gets 1)."""
    pos = mask.cumsum(-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def reference(model, *, decode_steps: int = 4, seed: int = 0) -> list[Step]:
    """Run the PyTorch model over the parity prompts, right- then left-padded, and record every step."""
    cfg = model.config
    ids, mask = prompts(cfg.vocab_size, cfg.n_positions, seed=seed)
    return _right(model, ids, mask, decode_steps) + _left(model, *left_padded(ids, mask), decode_steps)


def _forward(model, ids, mask, pos, past):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), past_key_values=past, use_cache=True)
    return out.logits.float().numpy(), out.past_key_values


def _right(model, ids, mask, decode_steps: int) -> list[Step]:
    steps = []
    past = None
    lengths = mask.sum(-1)
    cur_ids, pos = ids, np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    torch_mask = mask  # HF: the new token goes after the padding, the mask has a gap
    for step in range(decode_steps + 1):
        logits, past = _forward(model, cur_ids, torch_mask, pos, past)
        valid = mask.astype(bool) if step == 0 else np.ones(cur_ids.shape, bool)
        # gpt2onnx: each row's cache is contiguous; the mask only says how long each row is
        onnx_mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
        steps.append(Step({"input_ids": cur_ids, "attention_mask": onnx_mask, "position_ids": pos}, logits, valid,
                          fresh=step == 0, padding="right"))
        last = logits[np.arange(len(lengths)), lengths - 1] if step == 0 else logits[:, -1]
        cur_ids = last.argmax(-1)[:, None].astype(np.int64)
        pos = lengths[:, None].astype(np.int64)
        lengths = lengths + 1
        torch_mask = np.concatenate([torch_mask, np.ones_like(cur_ids)], axis=1)
    return steps


def _left(model, ids, mask, decode_steps: int) -> list[Step]:
    steps = []
    past = None
    cur_ids, pos = ids, hf_position_ids(mask)
    for step in range(decode_steps + 1):
        logits, past = _forward(model, cur_ids, mask, pos, past)
        valid = mask.astype(bool) if step == 0 else np.ones(cur_ids.shape, bool)
        steps.append(Step({"input_ids": cur_ids, "attention_mask": mask, "position_ids": pos}, logits, valid,
                          fresh=step == 0, padding="left"))
        cur_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(cur_ids)], axis=1)
        pos = (mask.sum(-1) - 1)[:, None].astype(np.int64)
    return steps


def run_onnx(session, steps: list[Step]) -> list[np.ndarray]:
    """Feed the reference's steps through an onnxruntime session; returns its logits.

    Each sequence starts from an empty cache and feeds each step the previous step's
    present as its past, as Hugging Face consumers do.
    """
    from ..graphio import GraphSpec

    spec = GraphSpec.of(session)  # an int8 past for an int8-KV graph
    outs = []
    past = None
    for step in steps:
        f = step.feeds
        if step.fresh or past is None:
            past = spec.empty_past(f["input_ids"].shape[0])
        logits, *past = session.run(None, spec.feeds(f["input_ids"], 0, past, f["attention_mask"], f["position_ids"]))
        outs.append(logits)
    return outs


def compare(steps: list[Step], got: list[np.ndarray]) -> dict:
    """Max |diff|, top-1 agreement and mean / max KL(reference || got) over real positions.

    ``max_abs_diff_by_padding`` gives the max |diff| of each sequence (right, left).
    """
    diffs, agree, kls = [], [], []
    by_padding: dict[str, float] = {}
    for step, g in zip(steps, got):
        ref, g = step.logits[step.valid], g[step.valid]  # (N,V)
        diffs.append(float(np.abs(ref - g).max()))
        by_padding[step.padding] = max(by_padding.get(step.padding, 0.0), diffs[-1])
        agree.append(ref.argmax(-1) == g.argmax(-1))
        lp, lq = log_softmax(ref), log_softmax(g)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
    agree, kls = np.concatenate(agree), np.concatenate(kls)
    return {
        "max_abs_diff": max(diffs),
        "max_abs_diff_by_padding": by_padding,
        "top1_agreement": float(agree.mean()),
        "mean_kl": float(max(kls.mean(), 0.0)),
        "max_kl": float(max(kls.max(), 0.0)),
        "positions": int(agree.size),
    }
