"""The README's shell commands: they parse, and the quickstart (command 1) works end to end."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from helpers.paths import REPO as ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")) + glob.glob(os.path.join(ROOT, "bench", "*.sh"))
                 + [os.path.join(ROOT, ".ci", "run")])


@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.relpath(s, ROOT) for s in SCRIPTS])
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # a 124M export (random weights: no Hub here), then a generation
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "gpt2onnx")),
                    reason="the quickstart runs in the repository's .venv (scripts/setup.sh makes it)")
def test_quickstart_exports_generates_and_reports_latency(tmp_path):
    """No Hub here: the quickstart must fall back to the 124M architecture with random weights and say so."""
    env = dict(os.environ, GPT2ONNX_MODELS=str(tmp_path), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "Hello, I'm a test,"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\nHello, I'm a test," in r.stdout  # after the export's summary
    assert "gpt2onnx: notice: the weights of 'gpt2' cannot be downloaded here" in r.stderr
    assert "error" not in r.stderr.lower()  # a run that succeeds prints no error
    assert "\r" not in r.stderr  # progress in a captured stream: plain lines
    assert "RANDOM WEIGHTS" in r.stderr and "tokens/s" in r.stderr and "[int8 gpt2" in r.stderr
    assert os.path.isfile(os.path.join(tmp_path, "gpt2-int8", "gpt2onnx.json"))


def _fake_checkout(tmp_path) -> str:
    """The scripts with a .venv whose pip, python and gpt2onnx only log how they were called."""
    import shutil

    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "quickstart.sh", "test.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), root / "scripts" / name)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(os.path.join(ROOT, name), root / name)
    bin_ = root / ".venv" / "bin"
    bin_.mkdir(parents=True)
    for tool in ("pip", "python", "gpt2onnx"):
        (bin_ / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "$(dirname "$0")/../calls.log"\n')
        (bin_ / tool).chmod(0o755)
    return str(root)


def _calls(root: str) -> list[str]:
    with open(os.path.join(root, ".venv", "calls.log"), encoding="utf-8") as f:
        return f.read().splitlines()


def test_quickstart_installs_only_the_export_extra_and_test_sh_adds_dev(tmp_path):
    root = _fake_checkout(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GPT2ONNX_EXTRAS"}
    r = subprocess.run(["bash", os.path.join(root, "scripts", "quickstart.sh"), "Hi"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    calls = _calls(root)
    pip = [c for c in calls if c.startswith("pip install")]
    assert len(pip) == 1 and pip[0].endswith("-e .[export]")
    assert any(c.startswith("gpt2onnx export gpt2 models/gpt2-int8 --precision int8 --random-weights-fallback")
               for c in calls)
    r = subprocess.run(["bash", os.path.join(root, "scripts", "test.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    pip = [c for c in _calls(root) if c.startswith("pip install")]
    assert pip[-1].endswith("-e .[dev,export]") and _calls(root)[-1].startswith("python -m pytest")
    n = len(pip)
    subprocess.run(["bash", os.path.join(root, "scripts", "quickstart.sh")], capture_output=True, env=env, check=True)
    assert len([c for c in _calls(root) if c.startswith("pip install")]) == n  # the bigger install is kept
