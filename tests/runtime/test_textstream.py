"""TextStream with the real GPT-2 tokenizer: no half characters, stop strings, O(window)."""

import doctest
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

import gpt2onnx.textstream
from gpt2onnx.textstream import TextStream

from helpers.paths import shared_path


@functools.cache
def tokenizer() -> Tokenizer:
    """The real GPT-2 tokenizer, from the shared folder (read at first use, not at import)."""
    return Tokenizer.from_file(shared_path("data", "tokenizer.json"))


# Any id of the vocabulary, drawn once the tokenizer is loaded.
IDS = st.deferred(lambda: st.integers(0, tokenizer().get_vocab_size() - 1))

# Text that splits characters over tokens: emoji (with ZWJ and flags), CJK, accents.
MIXED = "Hello 😀 world 日本語の文章です。 café 🇯🇵 👨‍👩‍👧 naïve Ελληνικά end\n\nNext"
CHARS = st.sampled_from(list(" abc.\n\nXYZ!?,'") + list("😀🇯🇵👩\u200d語の文章éïΩж€𝄞\u0301"))
TEXTS = st.lists(CHARS, max_size=40).map("".join)


def encode(text: str) -> list[int]:
    return tokenizer().encode(text).ids


def stream(ids, stop=()):
    """Push every id, then finish; return the pieces (the last one from finish) and the stream."""
    ts = TextStream(tokenizer().decode, stop=tuple(stop))
    pieces = [ts.push(i) for i in ids]
    pieces.append(ts.finish())
    return pieces, ts


def test_docstring_examples():
    assert doctest.testmod(gpt2onnx.textstream).failed == 0


def test_the_test_text_really_splits_characters():
    assert any("\ufffd" in tokenizer().decode([i]) for i in encode(MIXED))


def test_emoji_and_cjk_are_never_emitted_in_half():
    ids = encode(MIXED)
    pieces, ts = stream(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ts.text == tokenizer().decode(ids) == MIXED
    # The emoji takes two tokens: the first yields nothing, the second the whole emoji.
    first = encode("Hello")
    ts = TextStream(tokenizer().decode)
    assert [ts.push(i) for i in first] == ["Hello"]
    emoji = encode("Hello 😀")[len(first):]
    assert len(emoji) == 2
    assert [ts.push(i) for i in emoji] == ["", " 😀"]


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_pieces_concatenate_to_the_full_decode(text):
    ids = encode(text)
    pieces, ts = stream(ids)
    assert "".join(pieces) == ts.text == tokenizer().decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert not ts.stopped


@settings(max_examples=200, deadline=None)
@given(st.lists(IDS, max_size=30))
def test_arbitrary_token_ids_concatenate_to_the_full_decode(ids):
    """Also invalid byte sequences (lone continuation bytes, truncated emoji) and eos."""
    pieces, ts = stream(ids)
    assert "".join(pieces) == ts.text == tokenizer().decode(ids)


def test_dangling_incomplete_character_is_flushed_by_finish():
    ids = encode("ok 😀")[:-1]  # the emoji's last token is missing
    pieces, ts = stream(ids)
    assert pieces[-1] == tokenizer().decode(ids)[len("ok"):]
    assert pieces[-1].endswith("\ufffd") and "".join(pieces[:-1]) == "ok"
    assert ts.finish() == ""  # finishing twice flushes nothing more
    with pytest.raises(RuntimeError, match="create a new TextStream"):
        ts.push(1)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, data=st.data())
def test_output_is_the_text_before_the_first_stop_string(text, data):
    ids = encode(text)
    full = tokenizer().decode(ids)
    # Stop strings taken from the text (so they occur, often across tokens) or made up.
    n_stops = data.draw(st.integers(1, 3))
    stops = []
    for _ in range(n_stops):
        if full and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(full) - 1))
            j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
            stops.append(full[i:j])
        else:
            stops.append(data.draw(TEXTS.filter(bool)))
    # The stop string generated first: smallest end, then smallest start.
    hits = sorted((full.find(s) + len(s), full.find(s), s) for s in stops if s in full)
    expected = full[: hits[0][1]] if hits else full

    pieces, ts = stream(ids, stops)
    assert "".join(pieces) == ts.text == expected
    assert ts.stopped == bool(hits)
    if hits:
        assert full.find(ts.stop_string) == hits[0][1]
        assert len(ts.stop_string) == len(hits[0][2])
    else:
        assert ts.stop_string is None
    # No emitted prefix of the output ever contained a stop string or half a character.
    emitted = ""
    for p in pieces:
        emitted += p
        assert not any(s in emitted for s in stops)
        assert "\ufffd" not in p


def test_stop_string_across_token_boundaries():
    text = "The answer is 42.\n\nQuestion: why?"
    ids = encode(text)
    ts = TextStream(tokenizer().decode, stop=("\n\nQuestion",))
    pieces = [ts.push(i) for i in ids]
    assert ts.stopped and ts.stop_string == "\n\nQuestion"
    assert ts.text == "The answer is 42."
    assert "".join(pieces) == "The answer is 42."
    assert pieces[-1] == ""  # tokens after the stop string add nothing
    assert ts.finish() == "" and ts.text == "The answer is 42."


def test_stop_string_split_inside_a_token_and_inside_an_emoji():
    ids = encode("foobar baz")
    assert len(ids) < len("foobar baz")  # "oba" is inside tokens
    _, ts = stream(ids, ["oba"])
    assert ts.text == "fo"
    _, ts = stream(encode("hi 😀 there"), ["😀"])
    assert ts.text == "hi "


def test_stop_string_at_the_very_start():
    ids = encode("Hello world")
    ts = TextStream(tokenizer().decode, stop=("Hel",))
    assert ts.push(ids[0]) == ""
    assert ts.stopped
    assert [ts.push(i) for i in ids[1:]] == [""] * (len(ids) - 1)
    assert ts.finish() == "" and ts.text == ""


def test_possible_stop_prefix_is_held_then_released():
    ids = encode("a cat, a car")
    ts = TextStream(tokenizer().decode, stop=(" cap",))
    out = [ts.push(i) for i in ids]
    assert " ca" not in out  # " cat" starts like " cap": held until it is known not to be
    assert "".join(out) + ts.finish() == "a cat, a car"
    assert not ts.stopped
    # A held prefix at the end of the generation is emitted by finish().
    ts = TextStream(tokenizer().decode, stop=("car!",))
    assert "".join(ts.push(i) for i in ids) == "a cat, a "
    assert ts.finish() == "car"


def test_the_stop_string_completed_first_wins():
    _, ts = stream(encode("one two three"), ["three", "two", "e t"])
    assert ts.text == "on" and ts.stop_string == "e t"
    # "one two" starts first but " t" is complete earlier, even inside a single push.
    _, ts = stream(encode("one two three"), ["one two", " t"])
    assert ts.text == "one" and ts.stop_string == " t"
    # Two ending at the same character: the longer one is cut.
    _, ts = stream(encode("one two three"), ["wo", "two"])
    assert ts.text == "one " and ts.stop_string == "two"


def test_decodes_only_a_window_of_recent_tokens():
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tokenizer().decode(ids)

    ids = encode((MIXED + " ") * 20)
    assert len(ids) > 500
    ts = TextStream(decode, stop=("never appears",))
    for i in ids:
        ts.push(i)
    ts.finish()
    assert ts.text == tokenizer().decode(ids)
    assert max(calls) <= 12  # a few tokens per emoji, never the whole sequence
    assert len(calls) <= 2 * len(ids) + 2
