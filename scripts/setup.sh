#!/usr/bin/env bash
# Create .venv and install gpt2onnx with its extras. Safe to rerun: skips pip when
# pyproject.toml and constraints.txt have not changed since the last install.
# torch is pinned to the local CPU wheel by constraints.txt (an unpinned torch pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${GPT2ONNX_EXTRAS:-export,dev}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.gpt2onnx-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing gpt2onnx[$extras] into .venv (first time takes a few minutes)" >&2
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]" 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" >&2 || true
  .venv/bin/python -c "import gpt2onnx" && echo "$want" > "$stamp"
fi
