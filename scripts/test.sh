#!/usr/bin/env bash
# Set up .venv and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
GPT2ONNX_EXTRAS="${GPT2ONNX_EXTRAS:-export,dev}" bash scripts/setup.sh   # + pytest and every integration
exec .venv/bin/python -m pytest -q "$@"
