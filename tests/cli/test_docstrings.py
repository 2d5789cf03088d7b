"""Docstring examples run (pytest --doctest-modules) or are plain ``::`` usage blocks: no +SKIP."""

from __future__ import annotations

import os
import re

from helpers.paths import REPO

SKIP = re.compile(r"doctest:[^\n]*\+SKIP")
# Docstrings being rewritten elsewhere (issue #23): their examples are theirs to turn into
# running doctests or usage blocks; drop an entry here once its module has no +SKIP left.
ELSEWHERE = ()  # every module: no +SKIP anywhere


def test_no_docstring_example_is_skipped():
    found = []
    for folder, _, names in os.walk(os.path.join(REPO, "gpt2onnx")):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/")
            if not name.endswith(".py") or rel.startswith(ELSEWHERE):
                continue
            with open(os.path.join(REPO, rel), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if SKIP.search(line):
                        found.append(f"{rel}:{n}")
    assert not found, ("doctest examples marked +SKIP: make them run (cheaply), or make them a plain `::` "
                       "usage block: " + ", ".join(found))
