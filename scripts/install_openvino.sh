#!/usr/bin/env bash
# Install the OpenVINO GenAI baseline of `gpt2onnx bench --baselines openvino`.
#
#   bash scripts/install_openvino.sh                  # into .venv (made by scripts/setup.sh if missing)
#   PYTHON=/opt/ov/bin/python bash scripts/install_openvino.sh
#                                                     # into another venv (gets gpt2onnx[export] too);
#                                                     # then bench with GPT2ONNX_OPENVINO_PYTHON=/opt/ov/bin/python
#
# Versions are pinned by constraints.txt (torch==2.13.0, the CPU wheel, and the tested set) and
# constraints-openvino.txt. optimum-intel goes in with --no-deps (its 2.x releases list
# torchvision, whose PyPI wheel would replace the CPU torch); its real needs (openvino,
# openvino-tokenizers, nncf; optimum-onnx, transformers, torch from the export extra) are
# installed explicitly. openvino-genai is the pipeline the baseline times.
# Safe to rerun. Ends by checking that torch is still 2.13.0 without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
if [ ! -x "$py" ]; then
  if [ -n "${PYTHON:-}" ]; then echo "install_openvino: no python at $py" >&2; exit 1; fi
  bash scripts/setup.sh
fi
pip_install() {
  "$py" -m pip install -q --disable-pip-version-check -c constraints.txt -c constraints-openvino.txt "$@" 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" >&2 || true
}
if ! "$py" -c "import torch, transformers, optimum.onnxruntime, gpt2onnx" 2>/dev/null; then
  echo "install_openvino: installing gpt2onnx[export] into $py's environment first" >&2
  pip_install -e ".[export]"
fi
echo "install_openvino: installing OpenVINO GenAI, optimum-intel and NNCF (pinned) for $py" >&2
pip_install openvino openvino-tokenizers openvino-genai nncf
pip_install --no-deps optimum-intel
"$py" - <<'PY'
import torch
import nncf, openvino_genai, optimum.intel  # noqa: F401  (what the baseline imports)

assert torch.__version__.split("+")[0] == "2.13.0" and torch.version.cuda is None, \
    f"torch is now {torch.__version__}: reinstall with scripts/setup.sh"
print(f"OpenVINO GenAI {openvino_genai.__version__} ready: gpt2onnx bench MODEL --baselines openvino")
PY
