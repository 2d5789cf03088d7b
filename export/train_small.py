"""Train a small GPT-2 on WikiText-2: a model with *trained* weights to measure int8 on.

Random weights have none of the large activation channels that make int8 hard, and
the real GPT-2 weights may not be downloadable. This recipe trains a small GPT-2 with
the real GPT-2 tokenizer on the first 90 % of the WikiText-2 raw test file for a bounded
time, saves it with ``save_pretrained`` (a normal export source), and reports its
perplexity on the last 10 % (also written beside it as ``heldout.raw`` for
``gpt2onnx eval --data``)::

    nice -n 10 python export/train_small.py --minutes 15            # ~/.cache/gpt2onnx/small-wikitext
    gpt2onnx export ~/.cache/gpt2onnx/small-wikitext out/small-int8 --precision int8
    gpt2onnx eval out/small-int8 --task wikitext2 --data ~/.cache/gpt2onnx/small-wikitext/heldout.raw

It is a test subject, not a good language model: 1.2 M words is little data. The
training data is WikiText-2's *test* split; do not report its perplexity on that split
as a WikiText-2 result. Needs the ``export`` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "gpt2onnx", "small-wikitext")
HELDOUT = "heldout.raw"


@dataclass(frozen=True)
class Recipe:
    """The model and its training (defaults: the published recipe)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    context: int = 256  # n_positions, and the training sequence length
    batch_size: int = 4  # sequences per step: at ~1 s per 1k tokens on one core, more steps beat bigger ones
    lr: float = 1.5e-3  # peak AdamW learning rate; linear warm-up, cosine decay to 10 %
    warmup: float = 0.05  # fraction of the steps spent warming up
    weight_decay: float = 0.1
    dropout: float = 0.0  # a 1-2 epoch budget does not overfit
    minutes: float = 15.0  # wall-clock budget of the training loop
    max_steps: int | None = None  # stop earlier (tests)
    train_fraction: float = 0.9  # the first 90 % of the file (by bytes, at a line break) trains
    seed: int = 0
    threads: int = 1  # torch threads: the machine is shared


def split_text(raw: str, fraction: float) -> tuple[str, str]:
    """(first `fraction` of the text, the rest), cut at the line break nearest that point."""
    cut = raw.find("\n", int(len(raw) * fraction))
    cut = len(raw) if cut < 0 else cut + 1
    return raw[:cut], raw[cut:]


def _tokenizer(folder: str | None):
    from gpt2onnx import tokenizer as tok

    return (tok.from_files(folder) if folder else tok.packaged()), folder


def sliding_ppl(model, ids, *, max_length: int, stride: int) -> float:
    """Perplexity with the Hugging Face guide's strided windows (every scored token once)."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)
    nll, n, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            trg = end - prev_end
            x = ids[begin:end][None]
            labels = x.clone()
            labels[:, :-trg] = -100
            logits = model(x).logits[:, :-1]
            lab = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll += float(loss)
            n += int((lab != -100).sum())
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / n)


def train(out: str, data: str, recipe: Recipe = Recipe(), *, tokenizer: str | None = None,
          log=print) -> dict:
    """Train, evaluate on the held-out tail, and save_pretrained into `out` (replaced atomically).

    Returns the training record (also written to ``out/train_info.json``).
    """
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    with open(data, encoding="utf-8") as f:
        raw = f.read()
    train_text, heldout_text = split_text(raw, recipe.train_fraction)
    tok, tok_dir = _tokenizer(tokenizer)
    train_ids = np.asarray(tok.encode(train_text).ids, np.int64)
    heldout_ids = np.asarray(tok.encode(heldout_text).ids, np.int64)
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=recipe.context, n_embd=recipe.n_embd,
                        n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=eos, eos_token_id=eos,
                        resid_pdrop=recipe.dropout, embd_pdrop=recipe.dropout, attn_pdrop=recipe.dropout)
    model = GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    span = recipe.context + 1

    def batch():
        starts = rng.integers(0, len(train_ids) - span, recipe.batch_size)
        return torch.from_numpy(np.stack([train_ids[s:s + span] for s in starts]))

    def lr_at(step: int, total: int) -> float:
        warm = max(1, int(recipe.warmup * total))
        if step < warm:
            return recipe.lr * (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    budget = recipe.minutes * 60
    total = recipe.max_steps or 10**9
    losses = []
    model.train()
    t0 = time.perf_counter()
    step = 0
    while step < total:
        if step == 5 and not recipe.max_steps:  # fix the schedule's length from the measured step time
            per_step = (time.perf_counter() - t0) / 5
            total = max(10, int(budget / per_step))
            log(f"{per_step * 1e3:.0f} ms/step -> {total} steps in {recipe.minutes:g} min "
                f"({total * recipe.batch_size * recipe.context / len(train_ids):.2f} epochs)")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total if total < 10**9 else 1000)
        x = batch()
        logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            log(f"step {step}/{total}  loss {np.mean(losses[-100:]):.3f}  {time.perf_counter() - t0:.0f} s")
        if time.perf_counter() - t0 > budget * 1.02:
            break
    train_s = time.perf_counter() - t0
    model.eval()
    ppl = sliding_ppl(model, heldout_ids, max_length=recipe.context, stride=recipe.context // 2)
    log(f"held-out perplexity {ppl:.2f} ({len(heldout_ids)} tokens) after {step} steps, {train_s / 60:.1f} min")
    record = {
        "recipe": asdict(recipe),
        "steps": step,
        "train_seconds": round(train_s, 1),
        "train_tokens": int(len(train_ids)),
        "tokens_seen": int(step * recipe.batch_size * recipe.context),
        "loss_first": float(np.mean(losses[:10])),
        "loss_last": float(np.mean(losses[-50:])),
        "heldout_tokens": int(len(heldout_ids)),
        "heldout_ppl": ppl,
        "heldout_ppl_method": f"strided windows, length {recipe.context}, stride {recipe.context // 2}",
        "data": os.path.abspath(data),
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
    _save(model, out, tok, tok_dir, heldout_text, record)
    return dict(record, losses=losses)


def _save(model, out: str, tok, tok_dir: str | None, heldout_text: str, record: dict) -> None:
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        if tok_dir:
            for name in ("vocab.json", "merges.txt"):
                if os.path.isfile(os.path.join(tok_dir, name)):
                    shutil.copy(os.path.join(tok_dir, name), tmp)
        with open(os.path.join(tmp, HELDOUT), "w", encoding="utf-8", newline="") as f:
            f.write(heldout_text)
        with open(os.path.join(tmp, "train_info.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    d = Recipe()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="wiki.test.raw (default: found like 'gpt2onnx eval' does)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"save_pretrained folder (default {DEFAULT_OUT})")
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--dims", type=int, default=d.n_embd)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt (default: GPT-2's, shipped)")
    a = p.parse_args(argv)
    from gpt2onnx.eval import WIKITEXT2_FILE, data_path

    data = data_path(WIKITEXT2_FILE, a.data)
    recipe = Recipe(n_layer=a.layers, n_head=a.heads, n_embd=a.dims, context=a.context, batch_size=a.batch_size,
                    lr=a.lr, minutes=a.minutes, max_steps=a.max_steps, threads=a.threads, seed=a.seed)
    r = train(a.out, data, recipe, tokenizer=a.tokenizer, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in r.items() if k != "losses"}, indent=2))
    print(f"saved {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
