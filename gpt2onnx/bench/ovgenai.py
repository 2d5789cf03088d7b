"""The OpenVINO GenAI baseline: optimum-intel's int8 export, timed with `openvino_genai.LLMPipeline`.

Runs inside `gpt2onnx.bench.worker` (its ``prepare-openvino`` mode and the ``openvino``
runtime), in the interpreter `gpt2onnx.bench.runs.baseline_python` names::

    {"mode": "prepare-openvino", "source": {...}, "cache_dir": ...}
    -> {"ov_dir", "versions": {"openvino": ..., "openvino-genai": ..., ...}}

    {"mode": "run", "runtime": "openvino", "model_dir": ..., "ov_dir": ..., ...}
    -> the same answer as every runtime (see `gpt2onnx.bench.worker`)

The export is optimum-intel's: the source the manifest names, converted to OpenVINO IR
(stateful KV cache) with int8 weights (NNCF weight compression, ``bits=8``: int8
asymmetric per output channel), cached per source and tool versions. The pipeline runs
on the CPU with ``INFERENCE_NUM_THREADS`` = the bench's threads, prefix caching off (on
by default, it would serve the repeated prompt's prefill from cache after the warm-up)
and a scheduler budget that prefills the whole batch in one step (the default 256 tokens
would split 8 x 128 prompt tokens over steps, so rows would start decoding at different steps).
It gets token ids, not text: the prompts are the other runtimes' (`make_prompts`),
tokenized with the model folder's tokenizer.json inside the timed span, as for them.
Greedy, EOS ignored, ``min_new_tokens`` = ``max_new_tokens``: exactly new_tokens per row.

`run_openvino_job` (worker mode ``openvino-job``) times the job scenario's shared-head job
(`jobbench`, issue 22) the same way, with ``enable_prefix_caching`` on (OpenVINO GenAI's
default; its scheduler's other settings are its defaults too): the same token ids, in
batches of 8 in input order, through `openvino_genai.ContinuousBatchingPipeline`, the
engine `LLMPipeline` runs when given a scheduler config, because its ``generate`` takes one
generation config per prompt (each row its own ``max_new_tokens``, as in the job) where
`LLMPipeline`'s takes one for the whole batch.

The ``openvino-capped`` runtime is the same pipeline as on a Cascade Lake host (no AMX, no
bf16): its worker runs with `CAPPED_ENV` in its environment (oneDNN reads it when it
loads, so the parent sets it, `gpt2onnx.bench.runs.call_worker`) and compiles with
`CAPPED_PROPERTIES` (on CPUs with AMX or avx512_bf16 OpenVINO computes in bf16 by default;
a Cascade Lake host computes in f32 with int8 dynamic quantization of activations). Every
other setting is the plain baseline's. A capped run whose environment lacks `CAPPED_ENV`
is refused, so a capped row never holds uncapped figures.

Step times are the pipeline's own: ``perf_metrics.raw_metrics.m_new_token_times``, the
steady-clock time at which each step's tokens were out (one stamp per step at any batch
size; a streamer callback is refused at batch > 1). On Linux that clock is
CLOCK_MONOTONIC, the clock of `time.perf_counter`; every repeat checks that the stamps
fall between its own t0 and end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

from .._version import package_versions
from .measure import Timing, load_source, make_prompts, measure
from .env import CAPPED_ENV, CAPPED_PROPERTIES

TOOLS = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "nncf", "transformers", "torch")
# Ops between a stored weight and its use: int8 decompression (Convert, Subtract zero point,
# Multiply scale) and shape changes.
_PASS = {"Convert", "Subtract", "Multiply", "Reshape", "Unsqueeze", "Transpose"}


def prepare_openvino(job: dict) -> dict:
    """Export the source with optimum-intel to IR with int8 weights, once per source and tool versions."""
    versions = package_versions(TOOLS)
    key = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
    ov_dir = os.path.join(job["cache_dir"], f"int8-{key}")
    if not os.path.isfile(os.path.join(ov_dir, "openvino_model.xml")):
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

        os.makedirs(job["cache_dir"], exist_ok=True)
        src = load_source(job["source"])
        with tempfile.TemporaryDirectory(dir=job["cache_dir"]) as tmp:
            src.model.save_pretrained(os.path.join(tmp, "torch"))
            del src
            model = OVModelForCausalLM.from_pretrained(
                os.path.join(tmp, "torch"), export=True, compile=False, stateful=True,
                quantization_config=OVWeightQuantizationConfig(bits=8))
            model.save_pretrained(os.path.join(tmp, "ov"))
            shutil.rmtree(ov_dir, ignore_errors=True)
            os.rename(os.path.join(tmp, "ov"), ov_dir)  # atomic: a half export is never cached
    return {"ov_dir": ov_dir, "versions": {k: v for k, v in versions.items() if k != "gpt2onnx"}}


def ir_weight_bytes(xml_path: str) -> int:
    """Bytes of stored weights a decode step reads: all constants but those only gathered.

    A constant is followed through its decompression ops (`_PASS`) to where it is used;
    if every use is a Gather's table (input 0: wte/wpe as embeddings), it is left out.
    A tied LM head also multiplies the wte table, so then wte counts.
    """
    import openvino as ov

    model = ov.Core().read_model(xml_path)
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        frontier, gathered_only, depth = [op], True, 0
        while frontier and gathered_only and depth < 8:
            nxt = []
            for node in frontier:
                for inp in node.output(0).get_target_inputs():
                    user = inp.get_node()
                    kind = user.get_type_name()
                    if kind == "Gather" and inp.get_index() == 0:
                        continue
                    if kind in _PASS:
                        nxt.append(user)
                    else:
                        gathered_only = False
            frontier, depth = nxt, depth + 1
        if not gathered_only or frontier:
            total += int(op.get_byte_size())
    return total


def capped_properties(environ=None) -> dict:
    """`CAPPED_PROPERTIES`, once the environment is checked for `CAPPED_ENV`.

    >>> capped_properties({})
    Traceback (most recent call last):
    RuntimeError: openvino-capped needs ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI in its environment, got None; run it through gpt2onnx bench --baselines openvino-capped
    """
    environ = os.environ if environ is None else environ
    for key, want in CAPPED_ENV.items():
        if environ.get(key) != want:
            raise RuntimeError(f"openvino-capped needs {key}={want} in its environment, got {environ.get(key)!r}; "
                               "run it through gpt2onnx bench --baselines openvino-capped")
    return dict(CAPPED_PROPERTIES)


def run_openvino(job: dict) -> dict:
    props = {"INFERENCE_NUM_THREADS": job["threads"]}
    if job["runtime"] == "openvino-capped":
        props.update(capped_properties())  # before OpenVINO loads: refused at once without its environment
    import numpy as np
    import openvino as ov
    import openvino_genai as genai
    from tokenizers import Tokenizer

    b, n, p = job["batch_size"], job["new_tokens"], job["prompt_tokens"]
    sched = genai.SchedulerConfig()
    sched.enable_prefix_caching = False
    # The whole batch's prompts in one prefill step, as every runtime does: past the default
    # budget (256 tokens) the scheduler splits the prefill over steps and rows start late.
    sched.max_num_batched_tokens = max(sched.max_num_batched_tokens, b * p)
    sched.max_num_seqs = max(sched.max_num_seqs, b)
    t = time.perf_counter()
    pipe = genai.LLMPipeline(job["ov_dir"], "CPU", scheduler_config=sched, **props)
    load_s = time.perf_counter() - t
    tok = Tokenizer.from_file(os.path.join(job["model_dir"], "tokenizer.json"))
    prompts = make_prompts(tok, n_tokens=p, batch=b)
    config = genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = n
    config.ignore_eos, config.do_sample = True, False

    def tokenize():
        ids = np.array([tok.encode(text).ids for text in prompts], dtype=np.int64)  # (B, T)
        return genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))

    def once() -> Timing:
        t0 = time.perf_counter()
        res = pipe.generate(tokenize(), config)
        t_end = time.perf_counter()
        counts = [len(row) for row in res.tokens]
        if counts != [n] * b:
            raise RuntimeError(f"rows generated {counts} tokens, expected {n} each")
        raw = res.perf_metrics.raw_metrics
        stamps = [ms / 1e3 for ms in raw.m_new_token_times]
        if list(raw.m_batch_sizes) != [b] * len(stamps):
            raise RuntimeError(f"steps ran batches of {list(raw.m_batch_sizes)}, expected {b} each")
        if stamps and not t0 <= stamps[0] <= stamps[-1] <= t_end:
            raise RuntimeError("OpenVINO GenAI's token times are not on time.perf_counter's clock")
        return t0, stamps, t_end

    out = measure(job, tokenize, once)
    weights = ir_weight_bytes(os.path.join(job["ov_dir"], "openvino_model.xml"))
    return dict(out, load_s=load_s, weight_bytes_per_token=weights)


def run_openvino_job(job: dict) -> dict:
    """The shared-head job with prefix caching; tokens, seconds (pipeline load included, as a gpt2onnx job
    pays its model load), CPU seconds of this process, and the load time alone."""
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    from .. import artifact, tokenizer
    from .jobbench import job_requests

    c0, t0 = time.process_time(), time.perf_counter()
    dims = artifact.read_manifest(job["model_dir"]).dims
    tok = tokenizer.load(job["model_dir"], vocab_size=dims.vocab_size)
    reqs = job_requests(tok, prompts=job["prompts"], n_positions=dims.n_positions, kind="shared")
    sched = genai.SchedulerConfig()
    sched.enable_prefix_caching = True
    sched.max_num_seqs = max(sched.max_num_seqs, job["batch_size"])
    pipe = genai.ContinuousBatchingPipeline(job["ov_dir"], sched, "CPU", {"INFERENCE_NUM_THREADS": job["threads"]})
    load_s = time.perf_counter() - t0
    tokens = 0
    for k in range(0, len(reqs), job["batch_size"]):
        part = reqs[k:k + job["batch_size"]]
        ids = [ov.Tensor(np.array([tok.encode(r["prompt"]).ids], np.int64)) for r in part]
        configs = []
        for r in part:
            c = genai.GenerationConfig()
            c.max_new_tokens = c.min_new_tokens = r["max_new_tokens"]
            c.ignore_eos, c.do_sample = True, False
            configs.append(c)
        for r, res in zip(part, pipe.generate(ids, configs)):
            got = len(res.m_generation_ids[0])
            if got != r["max_new_tokens"]:
                raise RuntimeError(f"row {r['id']} generated {got} tokens, expected {r['max_new_tokens']}")
            tokens += got
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "load_s": load_s, "scheduler": {"enable_prefix_caching": True, "max_num_seqs": sched.max_num_seqs,
                                            "max_num_batched_tokens": sched.max_num_batched_tokens,
                                            "dynamic_split_fuse": sched.dynamic_split_fuse}}
