"""Micro-benchmark: per-row u8s8 QGEMM (MatMulIntegerToFloat) vs 8-bit MatMulNBits, one projection at a time.

Issue #21. Each variant is a small onnxruntime graph over one (K, N) weight, fed X of shape
(1, M, K) float32, ending with the projection's bias Add (as in the exported graph):

- ``nbits``: MatMulNBits 8-bit, block 128, symmetric, accuracy_level 4 (today's int8 folders);
- ``qgemm``: the new path: Abs -> ReduceMax(last axis) -> Mul(1/63) -> QuantizeLinear (blocked: one
  scale per row, u8 around zero point 64) -> MatMulIntegerToFloat (s8 per-column weights, a_scale the
  row scales) -> Add bias;
- ``gemm``: MatMulIntegerToFloat alone on already quantized rows (the GEMM's share of ``qgemm``);
- ``quant``: the four quantize ops alone (their share).

``--chain L`` builds instead L projections of (K, N = K) in a row, output feeding the next
input: the per-op dispatch cost at M = 1 as a decode step sees it, without the per-run overhead.

Times: per call, median of `--rounds` interleaved rounds (every variant once per round, in
turn). With ``--threads 1`` the figure is CPU time (`time.process_time`), which a shared
machine hardly moves; otherwise wall time, so read the ratios. Run it once as is and once
under the no-AMX preload (../shared/tools/README.md) to see a Cascade Lake host's kernels::

    nice -n 19 python bench/qgemm_micro.py --threads 1
    LD_PRELOAD=/tmp/noamx.so nice -n 19 python bench/qgemm_micro.py --threads 2
    nice -n 19 python bench/qgemm_micro.py --threads 1 --chain 48 --ms 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SHAPES = ((768, 2304), (768, 3072), (3072, 768), (768, 768))  # 124M: c_attn, c_fc, mlp c_proj, attn c_proj
QMAX = 63  # activations in 7 bits (u8 1..127 around 64): no int16 saturation on AVX2 (see exporter/qgemm.py)


def _model(nodes, inputs, outputs, inits):
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _weights(k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, n)).astype(np.float32) * 0.02, rng.standard_normal(n).astype(np.float32) * 0.02


def _nbits_nodes(x: str, y: str, w: np.ndarray, b: np.ndarray, p: str):
    from onnx import helper, numpy_helper

    from gpt2onnx.exporter.nbits import blockwise_symmetric

    k, n = w.shape
    q, s = blockwise_symmetric(np.ascontiguousarray(w.T), 128, 8)  # (N, K/128, 128), (N, K/128)
    inits = [numpy_helper.from_array(q, p + "q"), numpy_helper.from_array(s, p + "s"),
             numpy_helper.from_array(b, p + "b")]
    nodes = [helper.make_node("MatMulNBits", [x, p + "q", p + "s"], [p + "mm"], domain="com.microsoft",
                              K=k, N=n, bits=8, block_size=128, accuracy_level=4),
             helper.make_node("Add", [p + "mm", p + "b"], [y])]
    return nodes, inits


def _quant_nodes(x: str, q: str, scale: str, p: str, k: int):
    """The per-row quantize ops: x (.., K) float -> q (.., K) u8 around 64, scale (.., 1)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([-1], np.int64), p + "axes"),
             numpy_helper.from_array(np.array(1.0 / QMAX, np.float32), p + "inv")]
    nodes = [helper.make_node("Abs", [x], [p + "abs"]),
             helper.make_node("ReduceMax", [p + "abs", p + "axes"], [p + "amax"], keepdims=1),
             helper.make_node("Mul", [p + "amax", p + "inv"], [scale]),
             helper.make_node("QuantizeLinear", [x, scale, "zp_rows"], [q], axis=-1, block_size=k)]
    return nodes, inits


def _gemm_nodes(q: str, scale: str, y: str, w: np.ndarray, b: np.ndarray, p: str):
    from onnx import helper, numpy_helper

    ws = np.abs(w).max(0) / 127.0
    wq = np.clip(np.rint(w / ws), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(wq, p + "w"), numpy_helper.from_array(ws.astype(np.float32), p + "ws"),
             numpy_helper.from_array(np.array(64, np.uint8), "zp64"), numpy_helper.from_array(b, p + "b")]
    nodes = [helper.make_node("MatMulIntegerToFloat", [q, p + "w", scale, p + "ws", "zp64"], [p + "mm"],
                              domain="com.microsoft"),
             helper.make_node("Add", [p + "mm", p + "b"], [y])]
    return nodes, inits


def build(variant: str, k: int, n: int, chain: int = 1):
    """(onnx model, feed names) of `variant` over `chain` projections (chain > 1: K = N)."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    nodes, inits, x = [], [], "X"
    inputs = [helper.make_tensor_value_info("X", f32, [1, "M", k])]
    if variant in ("qgemm", "quant", "gemm"):
        inputs.append(helper.make_tensor_value_info("zp_rows", TensorProto.UINT8, [1, "M", 1]))
    if variant == "gemm":
        inputs = [helper.make_tensor_value_info("Q", TensorProto.UINT8, [1, "M", k]),
                  helper.make_tensor_value_info("S", f32, [1, "M", 1])]
    for i in range(chain):
        w, b = _weights(k, n, i)
        p, y = f"l{i}/", ("Y" if i == chain - 1 else f"l{i}/y")
        if variant == "nbits":
            more = _nbits_nodes(x, y, w, b, p)
        elif variant == "qgemm":
            qn, qi = _quant_nodes(x, p + "q", p + "scale", p, k)
            gn, gi = _gemm_nodes(p + "q", p + "scale", y, w, b, p)
            more = (qn + gn, qi + gi)
        elif variant == "gemm":
            more = _gemm_nodes("Q", "S", y, w, b, p)
        elif variant == "quant":
            more = _quant_nodes(x, "Y", p + "scale", p, k)
        else:
            raise ValueError(variant)
        nodes += more[0]
        inits += more[1]
        x = y
    out_type = TensorProto.UINT8 if variant == "quant" else f32
    outputs = [helper.make_tensor_value_info("Y", out_type, None)]
    seen, uniq = set(), []
    for t in inits:  # shared constants (zp64) once
        if t.name not in seen:
            seen.add(t.name)
            uniq.append(t)
    return _model(nodes, inputs, outputs, uniq)


def session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False  # as gpt2onnx's sessions
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feeds(variant: str, m: int, k: int) -> dict:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    if variant == "gemm":
        s = (np.abs(x).max(-1, keepdims=True) / QMAX).astype(np.float32)
        return {"Q": (np.clip(np.rint(x / s), -QMAX, QMAX) + 64).astype(np.uint8), "S": s}
    f = {"X": x}
    if variant != "nbits":
        f["zp_rows"] = np.full((1, m, 1), 64, np.uint8)
    return f


def timed(sess, feed: dict, budget_s: float, cpu: bool) -> float:
    """Seconds per call: calls repeated for about `budget_s` (CPU or wall clock)."""
    clock = time.process_time if cpu else time.perf_counter
    sess.run(None, feed)
    n, t0 = 0, clock()
    while True:
        sess.run(None, feed)
        n += 1
        t = clock() - t0
        if t >= budget_s:
            return t / n


def measure(shapes, ms, variants, threads: int, rounds: int, budget_s: float, chain: int) -> list[dict]:
    rows = []
    for k, n in shapes:
        sessions = {v: session(build(v, k, n, chain), threads) for v in variants}
        for m in ms:
            fd = {v: feeds(v, m, k) for v in variants}
            per = {v: [] for v in variants}
            for _ in range(rounds):
                for v in variants:
                    per[v].append(timed(sessions[v], fd[v], budget_s, threads == 1))
            row = {"K": k, "N": n, "M": m, "threads": threads, "chain": chain}
            row.update({v + "_ms": 1e3 * statistics.median(t) for v, t in per.items()})
            if "nbits" in per and "qgemm" in per:
                row["qgemm/nbits"] = statistics.median(q / b for q, b in zip(per["qgemm"], per["nbits"]))
            rows.append(row)
            print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ms", default="1,8,128,1024", help="rows M, comma-separated")
    p.add_argument("--variants", default="nbits,qgemm,gemm,quant")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.3, help="seconds per variant per round")
    p.add_argument("--chain", type=int, default=1, help="L projections K x K in a row (default: one projection)")
    p.add_argument("--k", type=int, default=768, help="K of --chain")
    a = p.parse_args()
    ms = [int(x) for x in a.ms.split(",")]
    variants = a.variants.split(",")
    shapes = [(a.k, a.k)] if a.chain > 1 else SHAPES
    measure(shapes, ms, variants, a.threads, a.rounds, a.budget, a.chain)


if __name__ == "__main__":
    main()
