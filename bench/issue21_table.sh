#!/usr/bin/env bash
# Issue #21's same-run table: gpt2onnx int8 against OpenVINO GenAI int8 on GPT-2 124M with
# random weights (the default int8 folder), with AMX and as on Cascade Lake, in interleaved
# rounds; prints a markdown table (medians of per-round ratios) and writes it beside the records.
#
#   bash bench/issue21_table.sh                      # on a quiet machine; ~4 min of benchmarks on 2 vCPUs
#   GPT2ONNX_OPENVINO_PYTHON=~/ov/bin/python bash bench/issue21_table.sh   # OpenVINO in another venv
#
# Each round: `gpt2onnx bench` at b1 (32-token prompt) and b8 (128-token prompts), 128 new
# tokens, `--baselines openvino`; then the same under the no-AMX preload (../shared/tools/noamx.c,
# built here with cc) with `--baselines openvino-capped`, so both sides run as on a CPU without
# AMX. Every record says whether its run could use AMX (environment.amx_usable); the table
# refuses a round whose AMX state is not the one its column names.
#
# Environment: PYTHON (default .venv/bin/python), MODELS (default models), OUT (default
# results/issue21-<UTC time>), ROUNDS (default 3), THREADS (default: physical cores),
# NOAMX_SRC (default ../shared/tools/noamx.c), REPEATS (default 3), NEW_TOKENS (default 128; the
# issue's figures need 128, a smaller number only checks that the script runs).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
model="${MODELS:-models}/gpt2-random-int8"
out="${OUT:-results/issue21-$(date -u +%Y%m%dT%H%M%SZ)}"
rounds="${ROUNDS:-3}"
src="${NOAMX_SRC:-../shared/tools/noamx.c}"
log() { echo "issue21_table: $*" >&2; }

[ -x "$py" ] || { log "no Python at $py; run bash scripts/setup.sh or set PYTHON"; exit 1; }
[ -f "$src" ] || { log "no $src (the no-AMX preload's source); set NOAMX_SRC"; exit 1; }
command -v cc >/dev/null || { log "no C compiler (cc) to build the no-AMX preload; apt-get install gcc"; exit 1; }
unset ONEDNN_MAX_CPU_ISA  # OpenVINO's defaults in the AMX runs; the capped baseline sets its own
missing=$("$py" -c "from gpt2onnx.bench.runs import missing_packages; print(', '.join(missing_packages('openvino')))")
[ -z "$missing" ] || { log "OpenVINO GenAI is not usable: needs $missing (bash scripts/install_openvino.sh, or set GPT2ONNX_OPENVINO_PYTHON)"; exit 1; }

mkdir -p "$out"
so="$(cd "$out" && pwd)/noamx.so"
cc -shared -fPIC -O2 -o "$so" "$src" -ldl
if [ ! -f "$model/gpt2onnx.json" ]; then
  log "exporting $model (124M, random weights, default int8)"
  "$py" -m gpt2onnx export gpt2 "$model" --precision int8 --random-weights --force >>"$out/bench.log" 2>&1
fi

args=(--new-tokens "${NEW_TOKENS:-128}" --repeats "${REPEATS:-3}" --warmup 1 --quiet ${THREADS:+--threads "$THREADS"})
start=$(date +%s)
for r in $(seq 1 "$rounds"); do
  for mode in amx capped; do
    for shape in "1 32" "8 128"; do
      set -- $shape
      log "round $r/$rounds, $mode, b$1 x $2 tokens ($(( $(date +%s) - start )) s so far)"
      if [ "$mode" = amx ]; then
        "$py" -m gpt2onnx bench "$model" --batch-sizes "$1" --prompt-tokens "$2" --baselines openvino \
          --out "$out/r$r-amx" "${args[@]}" >>"$out/bench.log"
      else
        LD_PRELOAD="$so" "$py" -m gpt2onnx bench "$model" --batch-sizes "$1" --prompt-tokens "$2" \
          --baselines openvino-capped --out "$out/r$r-capped" "${args[@]}" >>"$out/bench.log"
      fi
    done
  done
done
"$py" bench/issue21_table.py "$out" | tee "$out/table.md"
log "records, bench tables (bench.log) and table.md in $out/; $(( $(date +%s) - start )) s of benchmarks"
