#!/usr/bin/env bash
# The main job in one go: set up, export GPT-2 124M to int8, generate, print latency.
# Where the real weights cannot be downloaded it uses the 124M architecture with seeded
# random weights, and says so: that text is then meaningless. GPT2ONNX_MODELS sets where the
# model folder goes (default models/).
set -euo pipefail
cd "$(dirname "$0")/.."
GPT2ONNX_EXTRAS="${GPT2ONNX_EXTRAS:-export}" bash scripts/setup.sh   # the runtime + exporter only
default_prompt="Hello, I'm a language model,"
prompt="${1:-$default_prompt}"
out="${GPT2ONNX_MODELS:-models}/gpt2-int8"
g=.venv/bin/gpt2onnx
if [ ! -f "$out/gpt2onnx.json" ]; then
  # Without the Hub (or its cache) this prints a notice and uses seeded random weights.
  $g export gpt2 "$out" --precision int8 --random-weights-fallback
fi
$g generate "$out" "$prompt" --max-new-tokens 40 --timing
