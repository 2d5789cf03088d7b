"""Where things are: the repository, the shared folder beside it, the test data."""

from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
REPO = os.path.dirname(HERE)
# The project's shared folder (real GPT-2 tokenizer, data sets, seeds): ../shared beside the
# repository, wherever the checkout is. Tests reach it only through `shared_path`.
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
SHARED_DATA = os.path.join(SHARED, "data")
WIKI_SLICE = os.path.join(HERE, "data", "wiki_slice.txt")
BENCH_FIXTURES = os.path.join(HERE, "fixtures", "bench")  # bench records from three SKUs


def shared_path(*parts: str) -> str:
    """The path of a file in the shared folder; the calling test fails (not skips) with one line if it is missing.

    Call it inside a test or a fixture, not at import, so a missing folder fails only the tests
    that need it instead of stopping the collection of the whole suite.
    """
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: this test needs the project's shared folder as ../shared beside the "
                    f"repository ({REPO}); put it (or a symlink to it) there", pytrace=False)
    return path
