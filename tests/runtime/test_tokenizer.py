"""tokenizer: the packaged GPT-2 tokenizer, tokenizers from files, and the model folder's own.

No network: the packaged vocabulary ships in gpt2onnx/data; the tiny models' tokenizer is
trained in tests/helpers/models.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from gpt2onnx import tokenizer
from gpt2onnx.errors import ArtifactError, UnsupportedModelError

from helpers.models import TOKENIZER_VOCAB
from helpers.paths import WIKI_SLICE

TEXTS = ["Hello world", "", " leading space", "tabs\tand\nnewlines\r\n", "caf\u00e9 \u4e2d\u6587 \U0001f642",
         "<|endoftext|>The end", "@-@ 1998 ."]


@pytest.fixture(scope="module")
def gpt2():
    return tokenizer.packaged()


def test_packaged_is_gpt2s_vocabulary(gpt2):
    assert gpt2.get_vocab_size() == 50257
    assert gpt2.token_to_id(tokenizer.EOS) == 50256
    assert gpt2.encode("Hello world").ids == [15496, 995]  # GPT-2's own ids
    assert gpt2.encode("<|endoftext|>").ids == [50256]  # a special token, not 7 pieces of text
    assert gpt2.encode(" the").ids == [262]


@pytest.mark.parametrize("text", TEXTS)
def test_packaged_round_trip(gpt2, text):
    ids = gpt2.encode(text).ids
    assert gpt2.decode(ids, skip_special_tokens=False) == text


def test_from_vocab_and_merges_equals_the_folders_tokenizer_json(tiny_src, tiny_fp32):
    """The exporter reads vocab.json + merges.txt; the model folder carries the same tokenizer as tokenizer.json."""
    assert not os.path.exists(os.path.join(tiny_src, "tokenizer.json"))
    from_merges = tokenizer.from_files(tiny_src)
    from_folder = tokenizer.load(tiny_fp32, vocab_size=1000)
    with open(WIKI_SLICE, encoding="utf-8") as f:
        text = f.read()[:5000]
    for t in [text, *TEXTS]:
        ids = from_merges.encode(t).ids
        assert from_folder.encode(t).ids == ids
        assert from_folder.decode(ids, skip_special_tokens=False) == t
    assert from_merges.get_vocab_size() == from_folder.get_vocab_size() == TOKENIZER_VOCAB
    assert len(from_merges.encode("<|endoftext|>").ids) == 1


def test_from_files_errors(tmp_path, tiny_src):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match=r"no tokenizer in .*\(tokenizer.json, or vocab.json \+ "
                                                    r"merges.txt\); pass --tokenizer DIR"):
        tokenizer.from_files(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(tiny_src, "merges.txt"), bad)
    (bad / "vocab.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match=r"the tokenizer files in .* cannot be read .*--tokenizer DIR"):
        tokenizer.from_files(str(bad))


def test_load_refuses_a_tokenizer_bigger_than_the_model(tiny_fp32):
    """A tokenizer with more tokens than the model's vocabulary would feed ids with no embedding."""
    assert tokenizer.load(tiny_fp32).get_vocab_size() == TOKENIZER_VOCAB
    assert tokenizer.load(tiny_fp32, vocab_size=TOKENIZER_VOCAB).get_vocab_size() == TOKENIZER_VOCAB
    with pytest.raises(ArtifactError, match=rf"tokenizer.json has {TOKENIZER_VOCAB} tokens but the model only "
                                            rf"{TOKENIZER_VOCAB - 1}; the tokenizer is not this model's"):
        tokenizer.load(tiny_fp32, vocab_size=TOKENIZER_VOCAB - 1)


@pytest.mark.parametrize("content", [None, b"", b"{\"version\": \"1.0\", \"model\": 7}", b"\xff\xfe" * 50])
def test_load_of_a_missing_or_damaged_tokenizer_is_one_line(tmp_path, content):
    if content is not None:
        (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=r"cannot read .*tokenizer.json \(.*\); the model folder is damaged, "
                                            r"re-export it") as e:
        tokenizer.load(str(tmp_path))
    assert "\n" not in str(e.value)


def test_saved_tokenizer_json_loads_back(gpt2, tmp_path):
    gpt2.save(str(tmp_path / "tokenizer.json"))
    again = tokenizer.load(str(tmp_path), vocab_size=50257)
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"
    assert again.encode(TEXTS[4]).ids == gpt2.encode(TEXTS[4]).ids
