"""MODEL_CARD.md: the datasheet written into every model folder.

It follows the Azure ML registry card for gpt2 (model details, intended uses and
limitations, the original zero-shot results, the minimum inference VM) and adds what
this export is: precision, size, parity, and whether the weights are random.
"""

from __future__ import annotations

from ..artifact import MIN_INFERENCE_VM

# Reported by OpenAI for the ORIGINAL pretrained weights (GPT-2 paper, table 3; the
# Azure ML gpt2 card repeats them). Not measured on this export.
ZERO_SHOT = {
    "gpt2": {"LAMBADA (PPL)": 35.13, "LAMBADA (ACC)": 45.99, "CBT-CN (ACC)": 87.65, "CBT-NE (ACC)": 83.4,
             "WikiText2 (PPL)": 29.41, "PTB (PPL)": 65.85, "enwiki8 (BPB)": 1.16, "text8 (BPC)": 1.17,
             "WikiText103 (PPL)": 37.50, "1BW (PPL)": 75.20},
    "gpt2-medium": {"LAMBADA (PPL)": 15.60, "LAMBADA (ACC)": 55.48, "WikiText2 (PPL)": 22.76,
                    "WikiText103 (PPL)": 26.37},
    "gpt2-large": {"LAMBADA (PPL)": 10.87, "LAMBADA (ACC)": 60.12, "WikiText2 (PPL)": 19.93,
                   "WikiText103 (PPL)": 22.05},
    "gpt2-xl": {"LAMBADA (PPL)": 8.63, "LAMBADA (ACC)": 63.24, "WikiText2 (PPL)": 18.34,
                "WikiText103 (PPL)": 17.48},
}


def tags(manifest: dict) -> dict:
    """Model-card / datasheet tags (as on the Azure ML registry) for this folder."""
    src = manifest["source"]
    return {
        "task": "text-generation",
        "license": "mit",
        "languages": "en",
        "huggingface_model_id": src["id"] if src["kind"] == "hub" else "",
        "precision": manifest["precision"],
        "kv_cache": (manifest.get("kv_cache") or {}).get("dtype", "fp32"),
        "weights": "random" if src["random_weights"] else "pretrained",
        "inference-min-sku-spec": "%(vcpus)d|%(gpus)d|%(memory_gib)d|%(disk_gib)d" % MIN_INFERENCE_VM,
        "framework": "onnxruntime",
        "exported_by": "gpt2onnx",
    }


def _kv_line(kv: dict | None) -> str:
    if not kv or kv.get("dtype", "fp32") == "fp32":
        return "fp32"
    cal = kv.get("calibration") or {}
    tokens = cal.get("tokens") or [0, 0]
    return (f"int8, {kv.get('quant_type', '?').lower().replace('_', '-')} static scales ({kv.get('scale', '')}; "
            f"calibrated on tokens {tokens[0]}-{tokens[1]} of the gate text, which the gate does not score), "
            f"{kv.get('saturation', '')}. Past/present are int8 tensors: Optimum reads that type from the graph; "
            "a consumer that makes its own float32 past tensors must make them int8")


def render(manifest: dict) -> str:
    """The text of MODEL_CARD.md for a manifest."""
    src, d = manifest["source"], manifest["dims"]
    name = manifest["name"]
    random = src["random_weights"]
    total_mb = sum(f["bytes"] for f in manifest["files"].values()) / 1e6 if manifest.get("files") else 0.0
    lines = [f"# {name} — ONNX ({manifest['precision']}) for CPU inference", ""]
    if random:
        lines += [
            f"> **RANDOM WEIGHTS.** This folder has the {name} architecture with seeded random weights "
            f"(seed {src['seed']}), made for benchmarking where the real weights are not available. "
            "Its text is meaningless and none of the quality figures below apply to it.",
            "",
        ]
    q = manifest.get("quantization")
    lines += [
        "## Model details",
        "",
        "GPT-2 is a transformer language model pretrained by OpenAI on WebText (40 GB of English web pages "
        "linked from Reddit; Wikipedia removed) to predict the next token. It uses byte-level BPE with a "
        "vocabulary of 50,257 tokens and a context of 1,024 tokens. License: MIT.",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{src['id']}` ({src['kind']}{', revision ' + src['revision'] if src.get('revision') else ''}) |",
        f"| weights | {'random (seed %s)' % src['seed'] if random else 'pretrained'} |",
        f"| architecture | {d['n_layer']} layers, {d['n_head']} heads, {d['n_embd']} dims, "
        f"vocab {d['vocab_size']}, context {d['n_positions']} |",
        f"| parameters | {manifest.get('n_params', 0) / 1e6:.1f} M |",
        f"| precision | {manifest['precision']}"
        + (f" — {q['scheme']} {q['bits']}-bit {q.get('algorithm', 'rtn').upper()}, block {q['block_size']}, "
           f"{'symmetric' if q['symmetric'] else 'asymmetric (uint8 zero points)'}, "
           f"accuracy_level {q['accuracy_level']}; LM head {q['lm_head']}, embeddings {q['embedding']}"
           + (f" (one token table for both, block {q['table_block_size']})" if q.get("shared_table") else "")
           if q else "") + " |",
        f"| KV cache | {_kv_line(manifest.get('kv_cache'))} |",
        f"| files | {total_mb:.1f} MB in total (see gpt2onnx.json for sizes and sha256) |",
        f"| graph | one decoder with KV cache, opset {manifest.get('opset')}, onnxruntime contrib ops |",
        "",
        "## Intended uses and limitations",
        "",
        "Text generation and as a base for fine-tuning, in batch jobs and online endpoints on CPU VMs.",
        "",
        "Because large-scale language models like GPT-2 do not distinguish fact from fiction, they should not be "
        "used where the generated text must be true. GPT-2 reflects the biases of its unfiltered web training "
        "data (OpenAI found no statistically significant difference in gender, race and religion bias probes "
        "between the 774M and 1.5B models); do not deploy it in systems that interact with humans without a "
        "study of the biases relevant to the use case. Fine-tuned versions inherit these biases.",
        "",
        "## Parity with the PyTorch model (measured at export)",
        "",
    ]
    parity = manifest.get("parity") or {}
    lines += ["| check | value |", "|---|---|"]
    for k, v in parity.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                lines.append(f"| {k}.{k2} | {v2:.6g} |" if isinstance(v2, float) else f"| {k}.{k2} | {v2} |")
        else:
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += [
        "",
        "fp32 must agree with PyTorch to max |logit difference| <= 1e-3 on random prompts of mixed lengths "
        "(prefill and cached decode steps, right-padded with a per-row cache as the gpt2onnx runtime runs them "
        "and left-padded as Hugging Face generate batches them), or the export fails.",
        "",
    ]
    fid = manifest.get("fidelity")
    if fid:
        precision = manifest["precision"] + (" weights + int8 KV cache" if fid.get("kv_cache") == "int8" else "")
        lines += [f"## {precision} fidelity against fp32 (measured at export, on real text)", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in fid.items() if not isinstance(v, (dict, list))]
        rule = {"top1_agreement": ">= {}", "mean_kl": "<= {}", "ppl_ratio": "within [1/{0}, {0}]",  # as eval.gate.check
                "decisive_top1_agreement": ">= {} (positions where fp32's favourite leads by >= "
                                           f"{fid.get('decisive_margin', 0):g} nats)"}
        gate = ", ".join(f"{k} {rule.get(k, '{}').format(v)}" for k, v in fid.get("gate", {}).items())
        lines += ["", f"Gate ({fid.get('gated', '')}): {gate}."]
        if fid.get("missed"):
            lines.append(f"**WARNING: this {precision} export MISSED the gate ({'; '.join(fid['missed'])}) "
                         "and was kept "
                         "with --accept-fidelity-miss. Prefer the fp32 export where output quality matters.**")
        split = (manifest.get("quantization") or {}).get("outlier_channels") or {}
        lines.append(f"Outlier input channels kept in fp32 (calibrated at export): {sum(map(len, split.values()))} "
                     f"channels in {len(split)} MatMuls." if split else
                     "No outlier activation channels were found at calibration; every MatMul is fully quantized.")
        tried = (manifest.get("quantization") or {}).get("tried") or []
        if len(tried) > 1:
            lines.append("Recipes tried, in order: " + "; ".join(
                f"{t.get('what', t['block_size'])} ({'missed: ' + ', '.join(t['missed']) if t['missed'] else 'passed'})"
                for t in tried) + ".")
        lines.append("")
    zs = ZERO_SHOT.get(name)
    if zs:
        lines += [
            "## Zero-shot results reported for the original weights",
            "",
            "As reported by OpenAI for the original PyTorch/TensorFlow weights (GPT-2 paper; repeated on the "
            "Azure ML gpt2 card). They were not measured on this export"
            + (" and do not apply to random weights." if random else
               "; run `gpt2onnx eval` to measure this folder (note the paper used detokenized test sets)."),
            "",
            "| " + " | ".join(zs) + " |",
            "|" + "---|" * len(zs),
            "| " + " | ".join(str(v) for v in zs.values()) + " |",
            "",
        ]
    vm = MIN_INFERENCE_VM
    lines += [
        "## Minimum inference VM",
        "",
        f"As on the Azure ML gpt2 card: {vm['vcpus']} vCPU, {vm['gpus']} GPU, {vm['memory_gib']} GiB memory, "
        f"{vm['disk_gib']} GiB disk. See `gpt2onnx skus` for the allow-listed CPU SKUs.",
        "",
        "## How it was made",
        "",
        f"`gpt2onnx export` on {manifest.get('created', '?')} with "
        + ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items()) + ".",
        "",
        "## Tags",
        "",
        "| tag | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in manifest.get("tags", {}).items()]
    return "\n".join(lines) + "\n"
