#!/usr/bin/env bash
# Create .venv and install gpt2onnx with the extras in $GPT2ONNX_EXTRAS (default export,dev;
# quickstart.sh asks for export only, test.sh for export,dev). Safe to rerun: skips pip when
# pyproject.toml, constraints.txt and the extras have not changed since the last install.
# torch is pinned to the local CPU wheel by constraints.txt (an unpinned torch pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${GPT2ONNX_EXTRAS:-export,dev}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.gpt2onnx-installed"  # "<hash of pyproject.toml + constraints.txt> <extras installed>"
hash="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
read -r had_hash had_extras 2>/dev/null < "$stamp" || true
missing=""
for e in ${extras//,/ }; do
  case ",${had_extras:-}," in *",$e,"*) ;; *) missing="$missing $e" ;; esac
done
if [ "${had_hash:-}" != "$hash" ] || [ -n "$missing" ]; then
  # An install that already has more extras (test.sh before quickstart.sh) is kept as it is.
  [ "${had_hash:-}" = "$hash" ] && extras="$(echo "${had_extras},${extras}" | tr ',' '\n' | sort -u | paste -sd,)"
  echo "setup: installing gpt2onnx[$extras] into .venv (first time takes a few minutes)" >&2
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]" 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" >&2 || true
  .venv/bin/python -c "import gpt2onnx" && echo "$hash $extras" > "$stamp"
fi
