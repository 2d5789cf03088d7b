"""The README's shell commands: they parse, and the quickstart (command 1) works end to end."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")) + glob.glob(os.path.join(ROOT, "bench", "*.sh"))
                 + [os.path.join(ROOT, ".ci", "run")])


@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.relpath(s, ROOT) for s in SCRIPTS])
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "gpt2onnx")),
                    reason="the quickstart runs in the repository's .venv (scripts/setup.sh makes it)")
def test_quickstart_exports_generates_and_reports_latency(tmp_path):
    """No Hub here: the quickstart must fall back to the 124M architecture with random weights and say so."""
    env = dict(os.environ, GPT2ONNX_MODELS=str(tmp_path), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "Hello, I'm a test,"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\nHello, I'm a test," in r.stdout  # after the export's summary
    assert "quickstart: the real gpt2 weights are not reachable" in r.stderr
    assert "RANDOM WEIGHTS" in r.stderr and "tokens/s" in r.stderr and "[int8 gpt2" in r.stderr
    assert os.path.isfile(os.path.join(tmp_path, "gpt2-int8", "gpt2onnx.json"))
