"""The files Hugging Face consumers read beside ``model.onnx``.

A model folder is a drop-in for ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained``
and ``transformers.AutoTokenizer.from_pretrained`` (see docs in README "Hugging Face
consumers"): they need ``config.json`` (model_type gpt2), ``generation_config.json`` and
``tokenizer.json`` + ``tokenizer_config.json``. The graph's side of the contract (names,
Hugging Face mask semantics, optional ``logits_to_keep``) is in `graph`.

For example::

    write(tmp, config_json, tokenizer, eos=50256, bos=50256)
"""

from __future__ import annotations

import json
import os


def _dump(folder: str, name: str, data: dict) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def write(folder: str, config_json: dict, tokenizer, *, eos: int, bos: int) -> None:
    """Write config.json, generation_config.json and tokenizer_config.json into `folder`.

    Args:
        folder: the model folder being built.
        config_json: the source's ``GPT2Config.to_dict()``.
        tokenizer: the `tokenizers.Tokenizer` written as tokenizer.json.
        eos, bos: the special token ids the manifest records.
    """
    config = dict(config_json)
    config.setdefault("architectures", ["GPT2LMHeadModel"])
    config["use_cache"] = True  # the graph has a KV cache; Optimum reads this
    _dump(folder, "config.json", config)
    # GPT-2 has no padding token; batched generate pads with <|endoftext|> (eos), as is usual for GPT-2.
    _dump(folder, "generation_config.json", {"_from_model_config": True, "bos_token_id": int(bos),
                                             "eos_token_id": int(eos), "pad_token_id": int(eos),
                                             "transformers_version": config.get("transformers_version")})
    eos_text, bos_text = tokenizer.id_to_token(int(eos)), tokenizer.id_to_token(int(bos))
    _dump(folder, "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": bos_text, "eos_token": eos_text, "unk_token": eos_text,
        "pad_token": eos_text,
        # A decoder-only model continues from the row's end: batched generate needs the
        # padding on the left (the graph masks it; see graph.py).
        "padding_side": "left",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("n_positions", 1024)),
    })
