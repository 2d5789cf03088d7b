"""What goes into and comes out of generation: `Request`, `GenerationResult`, `StepResult`.

>>> GenerationResult("Hi there", (612,), 1, "length").generated_tokens
1
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import GenerationParams


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's output."""

    text: str  # prompt + completion when return_full_text, else the completion only
    token_ids: tuple[int, ...]  # generated token ids (the stop-string token included)
    prompt_tokens: int  # prompt length in tokens, after any truncation
    finish_reason: str  # "length", "eos" or "stop"

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StepResult:
    """One streamed token: its id, the text it makes safe to print, and the finish reason on the last."""

    token_id: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Request:
    """A checked, tokenized prompt with its parameters. Make with `Generator.prepare`.

    For example::

        req = gen.prepare("Hello", max_new_tokens=5)
        req.input_ids, req.params.max_new_tokens
        # -> ((15496,), 5)
    """

    prompt: str
    input_ids: tuple[int, ...]  # after truncation; an empty prompt is (bos,)
    params: GenerationParams
