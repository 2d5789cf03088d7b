#!/usr/bin/env bash
# The one-go benchmark for a VM: export GPT-2 124M with seeded random weights in fp32
# and int8 (once), bench each against PyTorch and Optimum (fp32 and int8) in the same
# run, then merge every record in results/ into bench/report/.
#
#   bash bench/run_all.sh --sku Standard_F4s_v2            # name the VM size (never guessed)
#   GPT2ONNX_SKU=Standard_F4s_v2 bash bench/run_all.sh      # the same
#   bash bench/run_all.sh --sku Standard_F4s_v2 --repeats 5 # extra flags go to `gpt2onnx bench`
#
# Environment: MODELS (default models), RESULTS (default results), REPORT (default
# bench/report), PRICES (a prices TOML for cost per 1M tokens; default none).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
g=".venv/bin/python -m gpt2onnx"
models="${MODELS:-models}"
results="${RESULTS:-results}"
report="${REPORT:-bench/report}"

for precision in fp32 int8; do
  dir="$models/gpt2-random-$precision"
  if [ ! -f "$dir/gpt2onnx.json" ]; then
    $g export gpt2 "$dir" --precision "$precision" --random-weights --force
  fi
done

for precision in fp32 int8; do
  $g bench "$models/gpt2-random-$precision" --batch-sizes 1,8 --prompt-tokens 32,128 --new-tokens 128 \
    --baselines pytorch,optimum --out "$results" "$@"
done

$g report "$results" --out "$report" ${PRICES:+--prices "$PRICES"}
echo "run_all: records in $results/, report in $report/report.md and $report/report.html" >&2
