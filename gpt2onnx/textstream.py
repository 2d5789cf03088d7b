"""Turn generated token ids into text as they arrive, and cut at stop strings.

Two things make streaming text harder than decoding at the end:

- GPT-2's byte-level BPE splits one character into several tokens (emoji, CJK, most
  accented letters take 2-4 bytes). Decoding a partial sequence yields '\\ufffd', so a
  piece of text is released only once its decoded tail is no longer '\\ufffd'.
- A stop string may arrive split over several tokens, so any tail that could be the
  beginning of a stop string is held back until it is known not to be one.

Decoding is incremental like vLLM's `detokenize_incrementally` and Hugging Face's
`TextStreamer`: only the tokens after `prefix_offset` are decoded, so a push costs
O(new tokens), not O(all tokens)::

    tokens:  ... already released ... | prefix (released) | read (pending) |
                                      ^prefix_offset      ^read_offset
    new text = decode(prefix + pending) minus decode(prefix)

The prefix is decoded along with the new tokens because some tokenizers (not GPT-2's)
change how a token is spelled at the start of a text.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode gives for an incomplete sequence


class TextStream:
    """Incremental detokenizer with stop strings, for one generated sequence.

    Args:
        decode: Token ids to text, e.g. `tokenizers.Tokenizer.decode`; must decode
            incomplete UTF-8 byte sequences to '\\ufffd' (lossy), as GPT-2's does.
        stop: Strings that end the text. It is cut before the stop string completed
            first: the occurrence that ends earliest, the longer one if two end at the
            same character. The result does not depend on how the text splits into tokens.

    Text held back because it ends in '\\ufffd' stays held until a later token
    completes the character, or until `finish()`.

    >>> vocab = {0: "Hel", 1: "lo", 2: "!", 3: " Bye"}
    >>> ts = TextStream(lambda ids: "".join(vocab[i] for i in ids), stop=("! B",))
    >>> [ts.push(i) for i in (0, 1, 2, 3)], ts.stopped, ts.text
    (['Hel', 'lo', '', ''], True, 'Hello')
    """

    def __init__(self, decode: Callable[[list[int]], str], *, stop: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._tokens: list[int] = []
        self._prefix_offset = 0  # start of the window that is decoded again
        self._read_offset = 0  # tokens before this are released by the detokenizer
        self._held = ""  # released by the detokenizer, held back as a stop-string prefix
        self._pieces: list[str] = []  # everything emitted
        self._finished = False
        self.stopped = False  # a stop string was found; later pushes are ignored
        self.stop_string: str | None = None  # the stop string found, if any

    @property
    def text(self) -> str:
        """All text emitted so far (the stop string and what follows it excluded)."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Add one generated token and return the new text that is safe to emit.

        Args:
            token_id: The next token.

        Returns:
            The new text, possibly "" (held back, or after a stop string).

        Raises:
            RuntimeError: `finish()` was already called.

        >>> TextStream(lambda ids: "".join(map(str, ids))).push(7)
        '7'
        """
        if self._finished:
            raise RuntimeError("push() after finish(); create a new TextStream")
        if self.stopped:
            return ""
        self._tokens.append(token_id)
        return self._emit(self._detokenize(final=False), final=False)

    def finish(self) -> str:
        """Flush the held-back text at the end of the generation and return it.

        An incomplete byte sequence left at the end is emitted as the decoder gives it
        (usually '\\ufffd'). A held stop-string prefix is emitted, since no more text
        can complete it. Calling `finish()` again returns "".

        >>> ts = TextStream(lambda ids: "".join("ab"[i] for i in ids), stop=("bc",))
        >>> ts.push(0), ts.push(1), ts.finish(), ts.text
        ('a', '', 'b', 'ab')
        """
        if self._finished:
            return ""
        self._finished = True
        if self.stopped:
            return ""
        return self._emit(self._detokenize(final=True), final=True)

    def _detokenize(self, *, final: bool) -> str:
        """New text of the tokens after `read_offset`, or "" while it ends mid-character."""
        window = self._tokens[self._prefix_offset :]
        if not window:
            return ""
        n_prefix = self._read_offset - self._prefix_offset
        prefix_text = self._decode(window[:n_prefix]) if n_prefix else ""
        new_text = self._decode(window)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]

    def _emit(self, new: str, *, final: bool) -> str:
        """Find stop strings in the held text + `new`; hold back a possible prefix."""
        buf = self._held + new
        if not buf:
            return ""
        # Any stop string that completes now starts inside `buf`: everything emitted
        # earlier was checked not to be the beginning of one. The first one completed
        # wins (smallest end, then smallest start), whatever the token boundaries are.
        cut = None
        for s in self._stop:
            i = buf.find(s)
            if i != -1 and (cut is None or (i + len(s), i) < (cut + len(self.stop_string), cut)):
                cut, self.stop_string = i, s
        if cut is not None:
            self.stopped = True
            out, self._held = buf[:cut], ""
        else:
            keep = 0 if final else _stop_prefix_len(buf, self._stop)
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out:
            self._pieces.append(out)
        return out


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = max((len(s) for s in stop), default=0)
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return n
    return 0
