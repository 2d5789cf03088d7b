"""The public surface that users' code and scripts rely on: names, signatures, CLI commands and flags.

Pinned from the last release before the package was split into subpackages; a removal
or rename here breaks users and must be a conscious, documented decision (README,
"Changes"). Additions are free.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import gpt2onnx
from gpt2onnx.cli import build_parser

PUBLIC = ["ArtifactError", "BatchSummary", "DataError", "ExportError", "FidelityError", "GenerationParams",
          "GenerationResult", "Generator", "Gpt2OnnxError", "InvalidRequestError", "ParityError", "StepResult",
          "UnsupportedModelError", "export", "load", "run_batch"]

GENERATOR = {  # method -> parameter names (keyword-only marked with *)
    "generate": ["prompts", "params", "**overrides"],
    "generate_batch": ["requests"],
    "generate_tokens": ["prompt", "params", "**overrides"],
    "stream_batch": ["requests"],
}

FUNCTIONS = {
    "load": ["model_dir", "*threads", "*verify_hashes"],
    "export": ["source", "outdir", "*precision", "*force", "*random_weights", "*seed", "*tokenizer", "*progress",
               "*accept_fidelity_miss", "*kv_cache"],
    "run_batch": ["model_or_dir", "input_path", "output_path", "*batch_size", "*params", "*progress", "*threads",
                  "*workers"],
}

CLI = {
    "export": ["--accept-fidelity-miss", "--force", "--kv-cache", "--precision", "--quiet", "--random-weights", "--seed",
               "--tokenizer", "outdir", "source"],
    "inspect": ["--json", "--no-hash", "model_dir"],
    "generate": ["--do-sample", "--ignore-eos", "--json", "--max-new-tokens", "--params", "--repetition-penalty",
                 "--seed", "--stop", "--stream", "--temperature", "--threads", "--timing", "--top-k", "--top-p",
                 "--truncation", "model_dir", "prompt"],
    "batch": ["--batch-size", "--do-sample", "--ignore-eos", "--max-new-tokens", "--no-progress", "--params",
              "--repetition-penalty", "--seed", "--stop", "--temperature", "--threads", "--top-k", "--top-p",
              "--truncation", "--workers", "input", "model_dir", "output"],
    "azureml-kit": ["--deployment", "--endpoint", "--force", "--instance-type", "--model-name", "model_dir", "outdir"],
    "bench": ["--baselines", "--batch-sizes", "--new-tokens", "--out", "--prompt-tokens", "--quiet", "--repeats",
              "--sku", "--threads", "--warmup", "model_dir"],
    "skus": ["--model-dir"],
    "report": ["--out", "--prices", "--slo-first-token-ms", "--slo-token-ms", "results"],
    "eval": ["--data", "--json", "--limit", "--quiet", "--reference", "--task", "--threads", "model_dir"],
    "mlflow": ["--batch-size", "--description", "--force", "--name", "--version", "model_dir", "out"],
}


def _params(fn) -> list[str]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        out.append({p.KEYWORD_ONLY: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name)
    return out


def test_public_names():
    assert set(PUBLIC) <= set(gpt2onnx.__all__)
    for name in gpt2onnx.__all__:
        assert getattr(gpt2onnx, name) is not None


def test_generator_methods_and_function_signatures():
    def keeps(have: list[str], pinned: list[str]) -> bool:  # every pinned parameter, same kind, same order
        return [p for p in have if p in pinned] == pinned and all(
            p.startswith("*") for p in have[len([q for q in have if not q.startswith("*")]):])

    for method, params in GENERATOR.items():
        assert keeps(_params(getattr(gpt2onnx.Generator, method)), params), method
    for name, params in FUNCTIONS.items():
        assert keeps(_params(getattr(gpt2onnx, name)), params), name


def test_cli_commands_and_flags():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in CLI.items():
        assert command in sub.choices, command
        sp = sub.choices[command]
        have = {o for a in sp._actions for o in a.option_strings} | {a.dest for a in sp._actions if not a.option_strings}
        assert set(flags) <= have, (command, sorted(set(flags) - have))


def test_import_loads_no_torch_exporter_or_jobs():
    """`import gpt2onnx` is the runtime only; export/run_batch resolve on first use."""
    code = ("import gpt2onnx, sys; print([m for m in sys.modules if m.startswith(('torch', 'transformers', "
            "'optimum', 'gpt2onnx.exporter', 'gpt2onnx.batch', 'gpt2onnx.bench', 'gpt2onnx.eval'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    code = "import gpt2onnx, sys; gpt2onnx.run_batch; print('gpt2onnx.batch' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["True",
                                                                                                         "False"]
