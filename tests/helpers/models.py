"""Tiny random GPT-2s saved with save_pretrained, and the small byte-level BPE they use.

No network, ever: the models are built from a `GPT2Config` with a fixed seed, and their
tokenizer is trained here on a slice of WikiText-2.
"""

from __future__ import annotations

import os

from helpers.paths import WIKI_SLICE

TOKENIZER_VOCAB = 900  # below both tiny models' vocab sizes
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, n_positions=64)
# Odd shapes catch hard-coded sizes: 3 heads, vocab not a multiple of 8, K not a multiple of the block.
ODD = dict(n_layer=3, n_head=3, n_embd=48, vocab_size=997, n_positions=48)


def train_tokenizer(folder: str) -> int:
    """Train a small GPT-2-style byte-level BPE; writes vocab.json + merges.txt; returns eos id."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    with open(WIKI_SLICE, encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text], vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok.save_model(folder)
    return tok.token_to_id("<|endoftext|>")


def save_tiny_gpt2(folder: str, *, seed: int = 0, safe: bool = True, tokenizer: bool = True, **dims) -> str:
    """Save a random GPT-2 (and its tokenizer files) with save_pretrained into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    os.makedirs(folder, exist_ok=True)
    eos = train_tokenizer(folder) if tokenizer else 0
    config = GPT2Config(**{**TINY, **dims}, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen them so greedy tokens are decisive
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=safe)
    return folder
