"""The README's commands work as written after the quickstart (checked without running them).

Every shell line of the README's code blocks is read in order: a ``gpt2onnx`` command must
parse with the real parser (its subcommand and flags exist), and every file or folder it
reads must exist in the repository, be made by the quickstart, or be written by a command
above it. Python blocks are held to the same rule for the folders they load. No network.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import tomllib

import pytest

from gpt2onnx.cli import build_parser

from helpers.paths import REPO as ROOT

README = os.path.join(ROOT, "README.md")
# What scripts/quickstart.sh leaves behind (scripts/setup.sh makes .venv with `python -m venv`).
QUICKSTART = {"models/gpt2-int8", ".venv", ".venv/bin/activate", ".venv/bin/gpt2onnx"}
PLACEHOLDERS = {"./my-finetune"}  # the reader's own folder, named as such in the README
READS = ("model_dir", "input", "results", "prices", "data", "tokenizer", "reference", "source")
WRITES = ("outdir", "output", "out")


def _blocks(lang: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _shell_lines() -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                out.append(line)
    return out


def _norm(path: str) -> str:
    return os.path.normpath(path).removeprefix("./") if path not in PLACEHOLDERS else path


class Files:
    def __init__(self):
        self.made = {_norm(p) for p in QUICKSTART}

    def exists(self, path: str) -> bool:
        p = _norm(path)
        return (path in PLACEHOLDERS or p in self.made or any(m.startswith(p + "/") for m in self.made)
                or os.path.exists(os.path.join(ROOT, p)))

    def make(self, path: str) -> None:
        self.made.add(_norm(path))


def _is_path(value: str) -> bool:
    """A hub id such as gpt2 or openai-community/gpt2 is not a file to check."""
    return "/" in value and not value.startswith("openai-community/") or value.startswith(".") or "." in value


def check_gpt2onnx(argv: list[str], files: Files, activated: bool) -> None:
    assert activated, f"`gpt2onnx {' '.join(argv)}` comes before `source .venv/bin/activate`"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README: `gpt2onnx {' '.join(argv)}` does not parse (unknown subcommand or flag)")
    for name in READS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and (name not in ("source", "reference") or _is_path(v)):
                assert files.exists(v), f"README: `gpt2onnx {' '.join(argv)}` reads {v!r}, which does not exist"
    for name in WRITES:
        value = getattr(args, name, None)
        if isinstance(value, str) and (name != "out" or f"--{name}" in argv or args.command in ("mlflow",)):
            files.make(value)


def check_other(words: list[str], files: Files) -> None:
    if words[0] == "bash":
        script = os.path.join(ROOT, words[1])
        assert os.path.isfile(script), f"README runs {words[1]}, which does not exist"
        body = open(script, encoding="utf-8").read()
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in body or '"$@"' in body, f"{words[1]} does not take {flag}"
    elif words[0] == "pip":
        extras = re.findall(r"\.\[([a-z,]+)\]", " ".join(words))
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            known = tomllib.load(f)["project"]["optional-dependencies"]
        for extra in ",".join(extras).split(","):
            assert extra in known, f"README installs unknown extra {extra!r}"
        if "-c" in words:
            assert files.exists(words[words.index("-c") + 1])
    elif words[0] == "printf":
        pass
    else:
        pytest.fail(f"README: no check for a `{words[0]}` line; teach tests/cli/test_readme.py about it")


def test_every_shell_command_of_the_readme_works_after_the_quickstart():
    files = Files()
    activated = False
    seen = 0
    for line in _shell_lines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if ">" in words:  # a redirect writes its target
            files.make(words[words.index(">") + 1])
            words = words[:words.index(">")]
        if words[:2] == ["source", ".venv/bin/activate"]:
            assert files.exists(".venv/bin/activate")
            activated = True
        elif words[0] == "gpt2onnx":
            if words[1:] != ["--help"]:
                check_gpt2onnx(words[1:], files, activated)
            seen += 1
        elif words[:2] == ["bash", "scripts/quickstart.sh"] or words[:2] == ["bash", "scripts/test.sh"]:
            check_other(words, files)
        else:
            check_other(words, files)
    assert seen >= 10  # the README really was read


def test_python_blocks_load_folders_that_exist_after_the_commands_above():
    files = Files()
    for line in _shell_lines():  # the shell blocks make what they make, in order
        words = shlex.split(line, comments=True)
        if ">" in words:
            files.make(words[words.index(">") + 1])
        if words and words[0] == "gpt2onnx" and len(words) > 2 and words[1] == "export":
            files.make(words[3])
        if words and words[0] == "gpt2onnx" and "--out" in words:
            files.make(words[words.index("--out") + 1])
    calls = 0
    for block in _blocks("python"):
        for node in ast.walk(ast.parse(block)):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if name in ("load", "from_pretrained") and args:
                assert files.exists(args[0]), f"README Python loads {args[0]!r}, which does not exist"
                calls += 1
            elif name == "run_batch" and len(args) >= 2:
                assert files.exists(args[0]) and files.exists(args[1]), args
                calls += 1
    assert calls >= 3


@pytest.mark.parametrize("span", re.findall(r"`(gpt2onnx [^`]+)`", open(README, encoding="utf-8").read()))
def test_inline_commands_name_real_subcommands_and_flags(span):
    words = shlex.split(span.replace("\n", " "))
    if words[1] in ("COMMAND",):
        return
    if len(words) == 2:  # a command named without its arguments
        words.append("--help")
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as e:
        if e.code != 0 or words[-1] != "--help":
            pytest.fail(f"README inline `{span}` does not parse")


def _written_by_the_readme() -> set[str]:
    """Every path the README's commands write, relative to the repository root; folders end in '/'."""
    commands = [shlex.split(line, comments=True) for line in _shell_lines()]
    commands += [shlex.split(span.replace("\n", " ")) for span in
                 re.findall(r"`(gpt2onnx [^`]+)`", open(README, encoding="utf-8").read())]
    paths: set[str] = set()
    for words in commands:
        if ">" in words:  # a redirect writes its target
            paths.add(words[words.index(">") + 1])
            words = words[:words.index(">")]
        if len(words) < 3 or words[0] != "gpt2onnx":
            continue
        try:
            args = build_parser().parse_args(words[1:])
        except SystemExit:
            continue  # not a runnable command (the test above checks those that should be)
        for name in WRITES:
            value = getattr(args, name, None)
            if isinstance(value, str) and (name != "out" or f"--{name}" in words or args.command == "mlflow"):
                paths.add(value)
                if args.command == "batch" and name == "output":
                    paths.add(value + ".state")  # the resume state beside the output
    for block in _blocks("python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if name == "export" and len(args) >= 2:
                    paths.add(args[1])
                elif name == "run_batch" and len(args) >= 3:
                    paths |= {args[2], args[2] + ".state"}
    placeholder = re.compile(r"[A-Z][A-Z0-9_]+(\.[a-z]+)*")  # OUT.jsonl, MODEL_DIR: the reader's own names
    return {_norm(p).rstrip("/") + ("/" if not os.path.splitext(p.rstrip("/"))[1] else "")
            for p in paths if not placeholder.fullmatch(os.path.basename(p.rstrip("/")))}


def test_every_file_the_readme_writes_is_gitignored(tmp_path):
    """Following the README from the repository root leaves `git status` clean: .gitignore covers every output."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    written = _written_by_the_readme()
    assert {"prompts.jsonl", "results.jsonl", "results.jsonl.state", "deploy/", "mlflow-gpt2/",
            "models/gpt2-int8-py/", "report/"} <= written  # the README really was read
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(os.path.join(ROOT, ".gitignore"), tmp_path / ".gitignore")
    r = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "--no-index", "--stdin"],
                       input="\n".join(sorted(written)) + "\n", capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    assert sorted(written - set(r.stdout.splitlines())) == [], "add them to .gitignore, or write under out/"
