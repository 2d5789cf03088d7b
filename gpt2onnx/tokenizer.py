"""GPT-2's byte-level BPE tokenizer (the `tokenizers` library; no transformers needed).

The real GPT-2 vocabulary ships inside the package (``gpt2onnx/data``) so exports work
offline; a model folder always carries its own ``tokenizer.json``.
"""

from __future__ import annotations

import os
from importlib import resources

from .errors import ArtifactError, UnsupportedModelError, first_line

EOS = "<|endoftext|>"


def from_files(folder: str):
    """A tokenizer from `tokenizer.json`, or from `vocab.json` + `merges.txt`, in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = os.fspath(folder)
    tj = os.path.join(folder, "tokenizer.json")
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    try:
        if os.path.isfile(tj):
            return Tokenizer.from_file(tj)
        if os.path.isfile(vocab) and os.path.isfile(merges):
            t = Tokenizer(models.BPE.from_file(vocab, merges))
            t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            t.decoder = decoders.ByteLevel()
            t.post_processor = processors.ByteLevel(trim_offsets=False)
            if t.token_to_id(EOS) is not None:
                t.add_special_tokens([EOS])
            return t
    except Exception as e:  # tokenizers raises plain Exception on bad files
        raise UnsupportedModelError(f"the tokenizer files in {folder!r} cannot be read ({first_line(e, 120)}); "
                                    "pass --tokenizer DIR with GPT-2's vocab.json + merges.txt") from None
    raise UnsupportedModelError(
        f"no tokenizer in {folder!r} (tokenizer.json, or vocab.json + merges.txt); pass --tokenizer DIR"
    )


def packaged():
    """The real GPT-2 tokenizer shipped with gpt2onnx.

    >>> tok = packaged()
    >>> tok.encode("Hello, I'm a language model,").ids
    [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    >>> tok.decode([15496, 11]), tok.token_to_id(EOS), tok.get_vocab_size()
    ('Hello,', 50256, 50257)
    """
    with resources.as_file(resources.files("gpt2onnx") / "data") as folder:
        return from_files(str(folder))


def load(model_dir: str, *, vocab_size: int | None = None):
    """The tokenizer of a model folder.

    Args:
        model_dir: the model folder.
        vocab_size: the model's vocabulary size; a tokenizer with more tokens (which
            would feed the graph ids it has no embedding for) is refused.

    Raises:
        ArtifactError: tokenizer.json cannot be read or does not fit the model.
    """
    from tokenizers import Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        message = " ".join(str(e).split())[:100]  # one line: tokenizers' messages can span several
        raise ArtifactError(f"cannot read {path} ({message}); the model folder is damaged, re-export it") from None
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise ArtifactError(f"{path} has {tok.get_vocab_size()} tokens but the model only {vocab_size}; "
                            "the tokenizer is not this model's: re-export the model folder")
    return tok
