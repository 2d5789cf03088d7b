"""Check an exported graph against the PyTorch model it came from.

The reference is computed once from PyTorch (prefill of a right-padded batch of random
prompts of mixed lengths, then several cached decode steps fed with the reference's own
greedy tokens; each row's new token goes at its own position, as the runtime does) and kept as numpy arrays, so the PyTorch model can be freed before the
(memory-hungry) quantization and each candidate graph is compared against the same
figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP32_TOLERANCE = 1e-3  # max |logit difference| accepted for an fp32 export


@dataclass
class Step:
    feeds: dict  # input_ids, attention_mask, position_ids (no past)
    logits: np.ndarray  # (B,S,V) reference logits
    valid: np.ndarray  # (B,S) bool: positions that are real tokens


def prompts(vocab_size: int, n_positions: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded batch of random prompts of mixed lengths: (ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    longest = max(2, min(24, n_positions // 2))
    lengths = [longest, 1, max(1, longest // 3)]
    ids = rng.integers(0, vocab_size, (len(lengths), longest))
    mask = (np.arange(longest)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask


def reference(model, *, decode_steps: int = 4, seed: int = 0) -> list[Step]:
    """Run the PyTorch model over the parity prompts and record every step."""
    import torch

    cfg = model.config
    ids, mask = prompts(cfg.vocab_size, cfg.n_positions, seed=seed)
    steps = []
    past = None
    lengths = mask.sum(-1)
    cur_ids, pos = ids, np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    torch_mask = mask  # HF: the new token goes after the padding, the mask has a gap
    with torch.no_grad():
        for step in range(decode_steps + 1):
            out = model(input_ids=torch.from_numpy(cur_ids), attention_mask=torch.from_numpy(torch_mask),
                        position_ids=torch.from_numpy(pos), past_key_values=past, use_cache=True)
            logits = out.logits.float().numpy()
            valid = mask.astype(bool) if step == 0 else np.ones(cur_ids.shape, bool)
            # gpt2onnx: each row's cache is contiguous; the mask only says how long each row is
            onnx_mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
            steps.append(Step({"input_ids": cur_ids, "attention_mask": onnx_mask, "position_ids": pos}, logits, valid))
            past = out.past_key_values
            last = logits[np.arange(len(lengths)), lengths - 1] if step == 0 else logits[:, -1]
            cur_ids = last.argmax(-1)[:, None].astype(np.int64)
            pos = lengths[:, None].astype(np.int64)
            lengths = lengths + 1
            torch_mask = np.concatenate([torch_mask, np.ones_like(cur_ids)], axis=1)
    return steps


def run_onnx(session, steps: list[Step], dims) -> list[np.ndarray]:
    """Feed the reference's steps through an onnxruntime session; returns its logits."""
    b = steps[0].feeds["input_ids"].shape[0]
    empty = np.zeros((b, dims.n_head, 0, dims.head_dim), np.float32)
    past = [empty] * (2 * dims.n_layer)
    outs = []
    for step in steps:
        feeds = dict(step.feeds, logits_to_keep=np.array(0, np.int64))
        for i in range(dims.n_layer):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *past = session.run(None, feeds)
        outs.append(logits)
    return outs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(steps: list[Step], got: list[np.ndarray]) -> dict:
    """Max |diff|, top-1 agreement and mean / max KL(reference || got) over real positions."""
    diffs, agree, kls = [], [], []
    for step, g in zip(steps, got):
        ref, g = step.logits[step.valid], g[step.valid]  # (N,V)
        diffs.append(float(np.abs(ref - g).max()))
        agree.append(ref.argmax(-1) == g.argmax(-1))
        lp, lq = _log_softmax(ref), _log_softmax(g)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
    agree, kls = np.concatenate(agree), np.concatenate(kls)
    return {
        "max_abs_diff": max(diffs),
        "top1_agreement": float(agree.mean()),
        "mean_kl": float(max(kls.mean(), 0.0)),
        "max_kl": float(max(kls.max(), 0.0)),
        "positions": int(agree.size),
    }
