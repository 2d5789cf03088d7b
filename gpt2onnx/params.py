"""Generation parameters: one frozen, validated dataclass with Hugging Face names.

Everything a request can set lives here, is checked once at construction, and is then
trusted by `sampling.py` and the runtime. Types are strict: a bool is not an int, a
string is not a number, NaN and infinities are rejected; an int is accepted where a
float is expected (and stored as a float).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError, show

MAX_NEW_TOKENS = 100_000  # hard ceiling; the runtime also checks against the model's context
MAX_STOP_STRINGS = 16  # as many as any hosted API allows (OpenAI: 4, vLLM: unbounded)
MAX_TEMPERATURE = 100.0  # beyond this the distribution is uniform to float32 precision
MAX_REPETITION_PENALTY = 100.0  # beyond this a penalized token is already impossible
SEED_LIMIT = 2**63  # seeds must fit a signed 64-bit integer (JSON clients, numpy)


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """How to generate the continuation of one prompt.

    Names and defaults follow Hugging Face `generate()` and the text-generation pipeline.

    Attributes:
        max_new_tokens: Number of tokens to generate at most, 1 to 100,000; the runtime
            also checks it against the model's context.
        do_sample: Draw the next token at random from the processed distribution
            instead of taking the most likely one.
        temperature: Divide the logits by this before sampling, 0 to 100. As in
            OpenAI's API, 0 means greedy decoding even when `do_sample` is true.
        top_k: Sample only among the k most likely tokens; 0 disables the filter.
        top_p: Sample only among the smallest set of most likely tokens whose
            probability adds up to at least `top_p`, in (0, 1]; 1 disables it.
        repetition_penalty: Penalty for tokens already in the prompt or the output
            (CTRL paper; >1 discourages repeats, <1 encourages them), in (0, 100].
        seed: Seed of the row's random generator, 0 <= seed < 2**63; None draws
            fresh entropy. A seeded prompt gives the same text alone or in a batch.
        stop: Strings that end the generation; the text is cut before the first one
            generated (see `textstream.TextStream`). A single string is accepted; at
            most 16, none empty.
        return_full_text: Return the prompt followed by the continuation instead of
            the continuation alone.
        ignore_eos: Never produce the end-of-text token, so exactly `max_new_tokens`
            tokens are generated (like transformers' `min_new_tokens`); for benchmarks.
        truncation: When prompt + `max_new_tokens` exceeds the model's context, drop
            prompt tokens from the left instead of rejecting the request.

    >>> GenerationParams(do_sample=True, top_p=0.9, seed=1).greedy
    False
    >>> GenerationParams(top_p=1.5)
    Traceback (most recent call last):
    ...
    gpt2onnx.errors.InvalidRequestError: top_p must be in (0, 1], got 1.5
    """

    max_new_tokens: int = 50  # Azure ML's gpt2 deployment default
    do_sample: bool = False  # greedy, like Hugging Face generate()
    temperature: float = 1.0  # no scaling; only used when sampling
    top_k: int = 50  # Hugging Face default; 0 disables
    top_p: float = 1.0  # no nucleus filtering
    repetition_penalty: float = 1.0  # no penalty
    seed: int | None = None  # fresh entropy on every request
    stop: tuple[str, ...] = field(default=())  # no stop strings
    return_full_text: bool = True  # as the HF pipeline and the Azure ML model card
    ignore_eos: bool = False  # stop at end-of-text like any normal generation
    truncation: bool = False  # a too-long request is an error, not silently cut

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen; normalize in place once
        set_(self, "max_new_tokens", _int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS))
        set_(self, "do_sample", _bool("do_sample", self.do_sample))
        t = _float("temperature", self.temperature)
        if not 0.0 <= t <= MAX_TEMPERATURE:
            _fail("temperature", self.temperature, "in [0, 100] (0 = greedy)")
        set_(self, "temperature", t)
        set_(self, "top_k", _int("top_k", self.top_k, 0, None, "an integer >= 0 (0 disables)"))
        p = _float("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            _fail("top_p", self.top_p, "in (0, 1]")
        set_(self, "top_p", p)
        r = _float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < r <= MAX_REPETITION_PENALTY:
            _fail("repetition_penalty", self.repetition_penalty, "in (0, 100] (1 = no penalty)")
        set_(self, "repetition_penalty", r)
        if self.seed is not None:
            seed_range = "an integer with 0 <= seed < 2**63, or null"
            set_(self, "seed", _int("seed", self.seed, 0, SEED_LIMIT - 1, seed_range))
        set_(self, "stop", _stop(self.stop))
        set_(self, "return_full_text", _bool("return_full_text", self.return_full_text))
        set_(self, "ignore_eos", _bool("ignore_eos", self.ignore_eos))
        set_(self, "truncation", _bool("truncation", self.truncation))

    @property
    def greedy(self) -> bool:
        """True when the next token is the most likely one (no sampling).

        >>> GenerationParams(do_sample=True, temperature=0).greedy
        True
        """
        return not self.do_sample or self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationParams:
        """Build parameters from a request's JSON object, rejecting unknown keys.

        Args:
            d: Parameter names to values; missing keys take their defaults.

        Returns:
            The validated parameters.

        Raises:
            InvalidRequestError: `d` is not a mapping, has an unknown key, or a value
                is of the wrong type or out of range.

        >>> GenerationParams.from_dict({"max_new_tokens": 20, "stop": ["\\n"]}).stop
        ('\\n',)
        """
        return cls().merge(d)

    def replace(self, **overrides: Any) -> GenerationParams:
        """Return a copy with some fields changed, validated like the constructor.

        >>> GenerationParams().replace(do_sample=True, seed=3).seed
        3
        """
        return self.merge(overrides)

    def merge(self, overrides: Mapping[str, Any]) -> GenerationParams:
        """These parameters with a request's own on top, validated once: a batch row over its job's defaults.

        Raises:
            InvalidRequestError: `overrides` is not a mapping, has an unknown key, or a bad value.

        >>> GenerationParams(max_new_tokens=20).merge({"seed": 3}).max_new_tokens
        20
        """
        if not isinstance(overrides, Mapping):
            raise InvalidRequestError(
                f"generation parameters must be a JSON object (dict), got {type(overrides).__name__}"
            )
        if not overrides:
            return self
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Return the parameters as a JSON-ready dict (`stop` as a list).

        >>> GenerationParams.from_dict(GenerationParams(stop="x").to_dict()).stop
        ('x',)
        """
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationParams))


def resolve(params: GenerationParams | Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
            ) -> GenerationParams:
    """What an entry takes as parameters (a `GenerationParams`, a dict of overrides or None) as one
    validated `GenerationParams`, with `overrides` (keyword arguments) on top.

    >>> resolve({"top_k": 5}, {"seed": 1}).top_k, resolve(None).max_new_tokens
    (5, 50)
    """
    overrides = overrides or {}
    if params is None:
        return DEFAULTS.merge(overrides)
    if isinstance(params, GenerationParams):
        return params.merge(overrides)
    if isinstance(params, Mapping):
        return DEFAULTS.merge({**params, **overrides})
    raise InvalidRequestError(f"params must be a GenerationParams or a dict, got {type(params).__name__}")


TYPO_CUTOFF = 0.8  # "tempreature", "max_tokens", "top-p" are this close to a name; "topic", "tokens" are not


def looks_like_param(name: Any) -> bool:
    """True for a parameter name or a misspelling of one: which table columns set parameters.

    A column of a CSV file or a Ray dataset is read as a parameter when it is one or is
    this close to one, so a misspelt column gets an error row with a did-you-mean
    instead of being ignored; any other column ("note", "topic") is left alone.

    >>> [looks_like_param(c) for c in ("seed", "tempreature", "topic")]
    [True, True, False]
    """
    return name in FIELDS or bool(difflib.get_close_matches(str(name), FIELDS, n=1, cutoff=TYPO_CUTOFF))


def _check_keys(d: Mapping[Any, Any]) -> None:
    for key in d:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidRequestError(
                f"unknown generation parameter {show(key)}; {hint}allowed: {', '.join(FIELDS)}"
            )


def _fail(key: str, value: Any, allowed: str) -> None:
    raise InvalidRequestError(f"{key} must be {allowed}, got {show(value)}")


def _int(key: str, value: Any, lo: int, hi: int | None, allowed: str | None = None) -> int:
    allowed = allowed or f"an integer in [{lo}, {hi:_}]"
    # bool is an int subclass in Python, but `top_k=True` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(key, value, allowed)
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        _fail(key, value, allowed)
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(key, value, "a finite number")
    f = float(value)
    if not math.isfinite(f):
        _fail(key, value, "a finite number")
    return f


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    allowed = f"a string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        _fail("stop", value, allowed)
    if len(value) > MAX_STOP_STRINGS:
        _fail("stop", value, allowed)
    for s in value:
        if not isinstance(s, str) or not s:
            _fail("stop", s, allowed)
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON) can never be generated
            _fail("stop", s, "valid Unicode text (no lone surrogates)")
    return tuple(value)


DEFAULTS = GenerationParams()  # after the validators it runs
