"""What several commands share: the generation-parameter flags, made from `GenerationParams` itself.

Each field of `GenerationParams` gives one flag (``top_p`` -> ``--top-p``) of its type, with
the first sentence of its docstring entry and its default as help; booleans get a
``--no-`` form too. A new parameter is a new flag with nothing to add here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing

from ..errors import InvalidRequestError


def param_overrides(a) -> dict:
    """CLI flags and --params JSON -> GenerationParams keys (flags win)."""
    from ..params import FIELDS

    out = {}
    if getattr(a, "params", None):
        try:
            out = json.loads(a.params)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"--params is not valid JSON ({e.msg}); pass e.g. '{{\"top_p\": 0.9}}'") from None
        if not isinstance(out, dict):
            raise InvalidRequestError("--params must be a JSON object, e.g. '{\"top_p\": 0.9}'")
    out.update({key: getattr(a, key) for key in FIELDS if getattr(a, key, None) is not None})
    return out


def add_param_flags(p: argparse.ArgumentParser, *, help: dict[str, str] | None = None) -> None:
    """One flag per `GenerationParams` field; an unset flag means the field's default, which --help shows.

    Args:
        help: help text replacing a field's own for this command (e.g. what ``--seed`` means in a job).
    """
    from ..params import GenerationParams

    hints = typing.get_type_hints(GenerationParams)
    texts = _field_docs(GenerationParams.__doc__ or "")
    for f in dataclasses.fields(GenerationParams):
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar(hints[f.name])
        text = (help or {}).get(f.name) or f"{texts.get(f.name, f.name)} (default: {_shown(f.default)})"
        text = text.replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind is str:  # stop: a tuple of strings, one flag per string
            p.add_argument(flag, dest=f.name, action="append", metavar="TEXT", help=text + "; repeatable")
        else:
            p.add_argument(flag, dest=f.name, type=kind, metavar=f.name.upper(), help=text)
    p.add_argument("--params", metavar="JSON", help="generation parameters as JSON (Hugging Face names)")


def _scalar(hint) -> type:
    """int | None -> int; tuple[str, ...] -> str; other hints as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint


def _shown(default) -> str:
    if default is None or default == ():
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _field_docs(doc: str) -> dict[str, str]:
    """The first sentence of each entry of a Google-style docstring's ``Attributes:`` section."""
    section = doc.split("Attributes:", 1)[-1]
    out = {}
    for m in re.finditer(r"^\s{8}(\w+): (.+?)(?=^\s{8}\w+: |^\s*$|\Z)", section, re.M | re.S):
        text = " ".join(m.group(2).split())
        out[m.group(1)] = re.split(r"(?<=[^.])\.(\s|$)", text, maxsplit=1)[0]
    return out
