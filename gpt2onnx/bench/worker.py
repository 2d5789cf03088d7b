"""One benchmark measurement in a fresh process: ``python -m gpt2onnx.bench.worker``.

`gpt2onnx.bench` starts one of these per runtime and configuration, so imports, load
and peak RSS (VmHWM at the end) belong to that runtime alone. The job is one
JSON object on stdin; the answer is one JSON object on stdout (anything a library
prints goes to stderr instead)::

    {"mode": "run", "runtime": "gpt2onnx" | "pytorch" | "optimum" | "openvino" | "openvino-capped", "model_dir": ...,
     "batch_size": 8, "prompt_tokens": 32, "new_tokens": 128, "threads": 4,
     "warmup": 1, "repeats": 3,
     "source": {"id", "random_weights", "seed"},          # pytorch only
     "optimum_dir": ..., "optimum_file": "model.onnx",     # optimum only
     "ov_dir": ...}                                        # openvino(-capped) only
    -> {"load_s", "tokenize_ms": [..], "first_token_ms": [..], "step_ms": [..],
        "total_s": [..], "peak_rss_mb", "weight_bytes_per_token", "amx_usable"}  or  {"error": "one line"}

``amx_usable`` is `gpt2onnx.bench.env.amx_usable` in this process, so the parent can check
that every row ran with the AMX state its record names.

    {"mode": "prepare-optimum", "source": {...}, "cache_dir": ..., "isa": "avx2"}
    -> {"fp32_dir", "int8_dir"}: Optimum's export of the source and Optimum's own
       dynamic int8 quantization of it, cached (reruns return at once).

    {"mode": "prepare-openvino", "source": {...}, "cache_dir": ...}
    -> {"ov_dir", "versions"}: optimum-intel's int8 OpenVINO IR of the source, cached
       (the OpenVINO GenAI baseline lives in `gpt2onnx.bench.ovgenai`).

Every run is greedy and generates exactly ``new_tokens`` per row (EOS never stops it).
Time to first token starts before the prompt text is tokenized, for every runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from ..errors import first_line
from .measure import Timing, load_source, make_prompts, measure, peak_rss_mb

# -- gpt2onnx ------------------------------------------------------------------------


def _run_gpt2onnx(job: dict) -> dict:
    from .. import load
    from ..params import GenerationParams

    t = time.perf_counter()
    gen = load(job["model_dir"], threads=job["threads"])
    load_s = time.perf_counter() - t
    b, n = job["batch_size"], job["new_tokens"]
    prompts = make_prompts(gen.tokenizer, n_tokens=job["prompt_tokens"], batch=b)
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)  # greedy
    requests = [(p, params) for p in prompts]

    def once() -> Timing:
        counts, stamps = [0] * b, []
        t0 = time.perf_counter()
        for row, _ in gen.stream_batch(requests):
            if counts[row] == len(stamps):  # first row of a new step: the step's tokens are out
                stamps.append(time.perf_counter())
            counts[row] += 1
        t_end = time.perf_counter()
        if counts != [n] * b:
            raise RuntimeError(f"rows generated {counts} tokens, expected {n} each")
        return t0, stamps, t_end

    out = measure(job, lambda: [gen.tokenizer.encode(p) for p in prompts], once)
    return dict(out, load_s=load_s)


# -- transformers generate (PyTorch and Optimum) -----------------------------------


def _hf_measure(job: dict, model, load_s: float) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.generation.streamers import BaseStreamer

    raw = Tokenizer.from_file(os.path.join(job["model_dir"], "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    b, n, p = job["batch_size"], job["new_tokens"], job["prompt_tokens"]
    prompts = make_prompts(raw, n_tokens=p, batch=b)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else 0

    class Stamps(BaseStreamer):
        """generate() calls put() once with the prompt, then once per step."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def once() -> Timing:
        s = Stamps()
        t0 = time.perf_counter()
        enc = tok(prompts, return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                 streamer=s, pad_token_id=eos)
        t_end = time.perf_counter()
        if tuple(enc["input_ids"].shape) != (b, p) or tuple(out.shape) != (b, p + n):
            raise RuntimeError(f"prompt {tuple(enc['input_ids'].shape)} -> output {tuple(out.shape)}, "
                               f"expected ({b}, {p}) -> ({b}, {p + n})")
        return t0, s.times[1:], t_end

    tokenize = lambda: tok(prompts, return_tensors="pt", return_token_type_ids=False)  # noqa: E731
    return dict(measure(job, tokenize, once), load_s=load_s)


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once work ran; harmless
        pass


def torch_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all parameters but the gathered tables.

    wpe is only gathered; wte too, unless it doubles as the (tied) LM head.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors counted once
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    total -= wpe.numel() * wpe.element_size()
    if model.lm_head.weight.data_ptr() != wte.data_ptr():
        total -= wte.numel() * wte.element_size()
    return int(total)


def _run_pytorch(job: dict) -> dict:
    _torch_threads(job["threads"])
    t = time.perf_counter()
    model = load_source(job["source"]).model
    load_s = time.perf_counter() - t
    return dict(_hf_measure(job, model, load_s), weight_bytes_per_token=torch_weight_bytes(model))


def _run_optimum(job: dict) -> dict:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    from .runs import onnx_weight_bytes

    _torch_threads(job["threads"])
    so = ort.SessionOptions()  # not graphio's: the baseline keeps onnxruntime's default CPU arena
    so.intra_op_num_threads = job["threads"]
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(job["optimum_dir"], file_name=job["optimum_file"],
                                                session_options=so, provider="CPUExecutionProvider",
                                                use_cache=True)
    load_s = time.perf_counter() - t
    weights = onnx_weight_bytes(os.path.join(job["optimum_dir"], job["optimum_file"]))
    return dict(_hf_measure(job, model, load_s), weight_bytes_per_token=weights)


def _prepare_optimum(job: dict) -> dict:
    """Optimum's export (fp32) and Optimum's dynamic int8 of it, each written once."""
    cache = job["cache_dir"]
    fp32_dir, int8_dir = os.path.join(cache, "fp32"), os.path.join(cache, f"int8-{job['isa']}")
    os.makedirs(cache, exist_ok=True)
    if not os.path.isfile(os.path.join(fp32_dir, "model.onnx")):
        from optimum.onnxruntime import ORTModelForCausalLM

        src = load_source(job["source"])
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src.model.save_pretrained(os.path.join(tmp, "torch"))
            del src
            ort_model = ORTModelForCausalLM.from_pretrained(os.path.join(tmp, "torch"), export=True)
            ort_model.save_pretrained(os.path.join(tmp, "fp32"))
            os.rename(os.path.join(tmp, "fp32"), fp32_dir)  # atomic: a half export is never cached
    if not os.path.isfile(os.path.join(int8_dir, "model_quantized.onnx")):
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        qconfig = getattr(AutoQuantizationConfig, job["isa"])(is_static=False, per_channel=False)
        tmp = tempfile.mkdtemp(dir=cache)
        try:
            ORTQuantizer.from_pretrained(fp32_dir, file_name="model.onnx").quantize(
                save_dir=tmp, quantization_config=qconfig)
            for name in ("config.json", "generation_config.json"):
                if os.path.isfile(os.path.join(fp32_dir, name)) and not os.path.isfile(os.path.join(tmp, name)):
                    shutil.copy(os.path.join(fp32_dir, name), tmp)
            os.rename(tmp, int8_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"fp32_dir": fp32_dir, "int8_dir": int8_dir}


def _run_openvino(job: dict) -> dict:
    from .ovgenai import run_openvino

    return run_openvino(job)


RUNNERS = {"gpt2onnx": _run_gpt2onnx, "pytorch": _run_pytorch, "optimum": _run_optimum, "openvino": _run_openvino,
           "openvino-capped": _run_openvino}


def main() -> int:
    # Keep stdout for the answer alone: whatever libraries print goes to stderr.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        job = json.loads(sys.stdin.read())
        if job["mode"] == "prepare-optimum":
            out = _prepare_optimum(job)
        elif job["mode"] == "prepare-openvino":
            from .ovgenai import prepare_openvino

            out = prepare_openvino(job)
        elif job["mode"] == "openvino-job":
            from .ovgenai import run_openvino_job

            out = run_openvino_job(job)
            out["peak_rss_mb"] = peak_rss_mb()
        elif job["mode"] == "batch-job":
            from .jobbench import measure_job

            out = measure_job(job)
            out["peak_rss_mb"] = peak_rss_mb() + out.pop("children_peak_rss_mb")  # summed over the job's processes
        else:
            out = RUNNERS[job["runtime"]](job)
            out["peak_rss_mb"] = peak_rss_mb()
            from .env import amx_usable

            out["amx_usable"] = amx_usable()
        code = 0
    except Exception as e:  # reported to the parent as the row's error
        out, code = {"error": first_line(e, 300, with_type=True)}, 1
    answer.write(json.dumps(out) + "\n")
    answer.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
