"""Issue #21's same-run table from the records `bench/issue21_table.sh` wrote: medians of per-round ratios.

    python bench/issue21_table.py results/issue21-20261205T2130Z    # -> markdown on stdout

The folder holds ``r<round>-amx/`` and ``r<round>-capped/``, each with the `gpt2onnx bench`
records of one round: b1 with a 32-token prompt and b8 with 128-token prompts, gpt2onnx
beside OpenVINO GenAI (``openvino`` in the AMX runs, ``openvino-capped`` under the no-AMX
preload). Every record is loaded and checked by `gpt2onnx.bench.record`; an AMX run that
could not use AMX, or a capped run that could, is refused (`record.amx_off`). For each
figure and round: ratio = gpt2onnx / OpenVINO from the same record; the table shows the
median over rounds of each side's figure and of the per-round ratios, the rounds' ratios
in brackets. `gpt2onnx report` merges records per SKU and has no per-round pairing, hence
this small script.
"""

from __future__ import annotations

import glob
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's gpt2onnx

from gpt2onnx.bench import record  # noqa: E402
from gpt2onnx.errors import Gpt2OnnxError  # noqa: E402

# label, (batch, prompt tokens), the figure of a result row, which way is better
FIGURES = [
    ("b8 prefill (8 × 128), first token ms", (8, 128), lambda r: r["first_token_ms"]["p50"], "lower"),
    ("b1 first token (32-token prompt) ms", (1, 32), lambda r: r["first_token_ms"]["p50"], "lower"),
    ("b8 tokens/s (8 × 128 → 128)", (8, 128), lambda r: r["tokens_per_s"], "higher"),
    ("b1 decode ms/token p50", (1, 32), lambda r: r["token_ms"]["p50"], "lower"),
    ("b8/128 peak RSS MB", (8, 128), lambda r: r["peak_rss_mb"], "lower"),
]
MODES = {"amx": "openvino", "capped": "openvino-capped"}


def _fail(msg: str):
    print(f"issue21_table: {msg}", file=sys.stderr)
    sys.exit(1)


def _rows(folder: str, mode: str) -> dict[tuple[int, int], tuple[dict, dict, dict]]:
    """(batch, prompt) -> (gpt2onnx row, OpenVINO row, their record) of one round and mode, checked."""
    out, base = {}, MODES[mode]
    paths = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not paths:
        _fail(f"{folder} holds no bench record; rerun bench/issue21_table.sh")
    for path in paths:
        try:
            rec = record.load(path)
        except Gpt2OnnxError as e:
            _fail(str(e))
        env = rec["environment"]
        if mode == "amx" and record.amx_off(rec):
            _fail(f"{path}: this AMX run could not use AMX (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}?); "
                  "run the script without the no-AMX preload")
        if mode == "capped" and env.get("amx_usable"):
            _fail(f"{path}: this capped run could use AMX; the no-AMX preload did not take (check its path)")
        for ours in rec["results"]:
            if ours["runtime"] != "gpt2onnx":
                continue
            theirs = [r for r in rec["results"] if r["runtime"] == base and all(
                r[k] == ours[k] for k in ("batch_size", "prompt_tokens", "threads"))]
            if not theirs:
                _fail(f"{path}: no {base} row beside gpt2onnx's")
            for r in (ours, theirs[0]):
                if r["error"]:
                    _fail(f"{path}: {r['runtime']} failed: {r['error']}")
            out[(ours["batch_size"], ours["prompt_tokens"])] = (ours, theirs[0], rec)
    return out


def _f(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def build(root: str) -> str:
    rounds = sorted({int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"r(\d+)-(amx|capped)", d))})
    if not rounds:
        _fail(f"{root} holds no r<N>-amx / r<N>-capped folders; run bench/issue21_table.sh")
    data = {mode: [_rows(os.path.join(root, f"r{n}-{mode}"), mode) for n in rounds] for mode in MODES}
    cells = {}
    for label, shape, fig, _ in FIGURES:
        for mode in MODES:
            got = [rows.get(shape) for rows in data[mode]]
            if None in got:
                _fail(f"a round of the {mode} runs has no b{shape[0]} / {shape[1]}-token row")
            ours, theirs = [fig(g[0]) for g in got], [fig(g[1]) for g in got]
            ratios = [a / b for a, b in zip(ours, theirs)]
            cells[label, mode] = (statistics.median(ours), statistics.median(theirs), statistics.median(ratios),
                                  ratios)
    any_rec = data["amx"][0][(1, 32)][2]
    env, settings = any_rec["environment"], any_rec["settings"]
    v = env["versions"]
    has_amx = bool(env["isa"].get("amx"))
    col = ("with AMX", "as on Cascade Lake (AMX off, OpenVINO capped)") if has_amx else \
        ("this CPU (no AMX)", "the same with OpenVINO capped (no AMX in this CPU: the preload changes nothing)")
    lines = [
        f"gpt2onnx int8 vs OpenVINO GenAI int8, {any_rec['model']['name']} "
        f"{any_rec['model']['n_params'] / 1e6:.0f}M{' (random weights)' if any_rec['model']['random_weights'] else ''}"
        f", {settings['threads'][0]} threads, {len(rounds)} interleaved rounds; {env['cpu_model']}; "
        f"gpt2onnx git {(env['git_revision'] or 'n/a')[:7]}, onnxruntime {v['onnxruntime']}, "
        f"OpenVINO GenAI {v.get('openvino-genai', '?')}. Ratio = gpt2onnx / OpenVINO, median of the per-round "
        "ratios (the rounds in brackets); figures are medians over rounds.",
        "",
        f"| figure | {col[0]}: gpt2onnx | OpenVINO | ratio | {col[1]}: gpt2onnx | OpenVINO capped | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _, _, better in FIGURES:
        row = [f"{label} ({better} is better)"]
        for mode in MODES:
            ours, theirs, ratio, ratios = cells[label, mode]
            row += [_f(ours), _f(theirs), f"**{ratio:.2f}×** ({', '.join(f'{r:.2f}' for r in ratios)})"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        _fail("usage: python bench/issue21_table.py RESULTS_FOLDER (the folder bench/issue21_table.sh wrote)")
    print(build(sys.argv[1]))
