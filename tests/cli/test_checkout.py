"""The suite and the package run from any checkout: no absolute paths, the shared folder found as ../shared."""

from __future__ import annotations

import os
import re

import pytest

from helpers.paths import REPO, SHARED, shared_path

# A quoted absolute path into a home or work folder, or this machine's own checkout / shared folder.
ABSOLUTE = re.compile("|".join([r"""["'](/work|/home|/Users|/root)/"""]
                               + [re.escape(os.path.realpath(p)) for p in (REPO, SHARED)]))
TEXT = (".py", ".sh", ".toml", ".cfg", ".ini", ".yml", ".yaml")


def _sources():
    for top in ("gpt2onnx", "tests", "scripts"):
        for folder, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(TEXT):
                    yield os.path.join(folder, name)


def test_no_absolute_paths_in_the_package_tests_or_scripts():
    found = []
    for path in _sources():
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if ABSOLUTE.search(line):
                    found.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert not found, "absolute paths (use helpers.paths.shared_path or tmp_path):\n" + "\n".join(found)


def test_the_shared_folder_is_beside_the_repository_and_a_missing_file_fails_loudly():
    assert SHARED == os.path.normpath(os.path.join(REPO, "..", "shared"))
    with pytest.raises(pytest.fail.Exception, match=r"no-such-file is missing: this test needs the project's "
                                                    r"shared folder as \.\./shared beside the repository"):
        shared_path("data", "no-such-file")
