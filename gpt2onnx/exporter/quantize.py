"""int8 weight formats for the exported graph.

The shipped recipe (`INT8`) uses onnxruntime's own weight quantizer to turn every MatMul,
the LM head included, into ``MatMulNBits`` with 8-bit, block-wise symmetric weights.
``accuracy_level=4`` lets onnxruntime run those MatMuls on int8 dot-product kernels
(VNNI / AMX where the CPU has them); it is ~30x faster here than the float path
(``accuracy_level`` unset dequantizes each weight matrix on every call).

``accuracy_level=4`` also quantizes the *activations* to int8, per block along K (the
weight block: 128 values). Trained GPT-2 has a few activation channels hundreds of times
larger than the rest; sharing a block's int8 grid with one of them rounds its 127
neighbours to a few levels.
So before quantizing, the exporter measures every MatMul input on real text
(`calibrate`) and splits each MatMul whose input has such channels (LLM.int8()'s
decomposition, Dettmers et al. 2022)::

    X ──Mul(mask: 0 at outliers)──MatMulNBits(W, outlier rows 0)──┐
    └──Gather(outlier channels)───MatMul(W[outliers]) in fp32─────Add── Y  (= X @ W)

A model without outliers (random weights, say) gets no extra nodes and loses no speed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import EXTERNAL_DATA


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 graph is made (recorded in the manifest)."""

    scheme: str = "MatMulNBits"  # onnxruntime contrib op with block-wise quantized weights
    bits: int = 8
    block_size: int = 128  # weights per scale along K; smaller = more accurate, more scales, slower
    symmetric: bool = True  # no zero points: int8 weights centred on 0
    accuracy_level: int = 4  # 4 = int8 activations per block -> int8 dot-product kernels
    lm_head: str = "int8"  # the 38 M-parameter LM head is quantized too
    embedding: str = "int8"  # token table as GatherBlockQuantized (position table: 1 M, stays fp32)
    outlier_ratio: float = 6.0  # an input channel whose calibrated |max| is > this x the median's stays fp32
    max_outliers: int = 16  # per MatMul, the largest first

    def to_json(self) -> dict:
        return asdict(self)


INT8 = Int8Recipe(block_size=128)  # shipped: decode 11 % faster than block 32 here (see docs/quality.md)
FALLBACK_BLOCK = 32  # the exporter retries with this block size when INT8 misses the fidelity gate


def recipes_to_try(recipe: Int8Recipe | None = None, n_embd: int = 768) -> list[Int8Recipe]:
    """The recipes the exporter tries in order: `recipe` (default `INT8`), then the finer fallback.

    Block sizes shrink to the largest power of two that divides `n_embd` (every MatMul's
    K is n_embd or 4 x n_embd): onnxruntime pads a partial block, which would cost
    memory for nothing (gpt2-xl's 1600 -> 64).

    >>> [r.block_size for r in recipes_to_try()]
    [128, 32]
    >>> [r.block_size for r in recipes_to_try(n_embd=1600)]
    [64, 32]
    """
    recipe = recipe or INT8

    def fit(block: int) -> int:
        return fit_block(block, n_embd) or block

    out = [replace(recipe, block_size=fit(recipe.block_size))]
    finer = fit(min(FALLBACK_BLOCK, recipe.block_size))
    return out if finer == out[0].block_size else out + [replace(recipe, block_size=finer)]


def fit_block(block: int, n: int) -> int | None:
    """The largest of block, block/2, ... (down to 16) that divides `n`; None if none does.

    >>> fit_block(128, 768), fit_block(128, 1600), fit_block(32, 100)
    (128, 64, None)
    """
    while block >= 16:
        if n % block == 0:
            return block
        block //= 2
    return None


def quantize_int8(fp32_path: str, out_folder: str, recipe: Int8Recipe = INT8,
                  outliers: dict[str, list[int]] | None = None) -> str:
    """Quantize the fp32 graph at `fp32_path` into `out_folder`/model.onnx (+ data).

    `outliers` maps MatMul weight names to input channels kept in fp32 (see
    `outlier_channels`); by default there are none.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    old_level = log.level
    log.setLevel(logging.ERROR)
    try:
        model = onnx.load(fp32_path)
        keep_fp32 = split_outliers(model, outliers or {})
        q = MatMulNBitsQuantizer(
            model,
            bits=recipe.bits,
            block_size=recipe.block_size,
            is_symmetric=recipe.symmetric,
            accuracy_level=recipe.accuracy_level,
            nodes_to_exclude=keep_fp32,
            op_types_to_quantize=("MatMul",),
        )
        q.process()
    finally:
        log.setLevel(old_level)
    model = q.model.model
    if recipe.embedding == "int8":
        _quantize_embedding(model, recipe.block_size)
    path = os.path.join(out_folder, "model.onnx")
    for stale in (path, os.path.join(out_folder, EXTERNAL_DATA)):  # onnx appends to an existing data file
        if os.path.exists(stale):
            os.remove(stale)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    return path


def calibrate(model, token_ids, *, window: int) -> dict[str, np.ndarray]:
    """Per-channel |max| of every MatMul input of a PyTorch GPT-2 over `token_ids`.

    Returns ``{graph weight name: (K,) float32}`` for ``h.{i}.attn.c_attn``,
    ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` and ``lm_head`` (named as in
    `graph.build`). The text runs in windows of `window` tokens from an empty cache.
    """
    import torch

    stats: dict[str, np.ndarray] = {}

    def hook(name):
        def record(_module, args):
            a = args[0].detach().abs().flatten(0, -2).amax(0).float().numpy()
            stats[name] = a if name not in stats else np.maximum(stats[name], a)
        return record

    handles = []
    for mod_name, module in model.named_modules():
        if mod_name == "lm_head":
            handles.append(module.register_forward_pre_hook(hook("lm_head.weight_t")))
        elif mod_name.startswith("transformer.h.") and mod_name.endswith(("c_attn", "c_proj", "c_fc")):
            handles.append(module.register_forward_pre_hook(hook(mod_name[len("transformer."):] + ".weight")))
    ids = torch.as_tensor(np.asarray(token_ids, np.int64).ravel())
    try:
        with torch.no_grad():
            for a in range(0, max(len(ids) - 1, 1), window):
                model(ids[a:a + window][None, :], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def outlier_channels(stats: dict[str, np.ndarray], recipe: Int8Recipe = INT8) -> dict[str, list[int]]:
    """The input channels of each MatMul to keep in fp32: |max| > ratio x the median channel's.

    >>> outlier_channels({"w": np.array([1.0, 1.2, 0.9, 40.0, 1.1])})
    {'w': [3]}
    """
    out = {}
    for name, a in stats.items():
        med = float(np.median(a))
        idx = np.flatnonzero(a > recipe.outlier_ratio * med) if med > 0 else np.array([], int)
        if idx.size:
            idx = idx[np.argsort(-a[idx])][:recipe.max_outliers]
            out[name] = sorted(int(i) for i in idx)
    return out


def split_outliers(model: onnx.ModelProto, outliers: dict[str, list[int]]) -> list[str]:
    """Rewrite each MatMul whose weight is in `outliers` as inlier part + fp32 outlier part.

    Returns the names of the new fp32 MatMuls (to exclude from quantization). The
    result equals the original MatMul in fp32 (the split is exact; only the order of
    the additions changes).
    """
    if not outliers:
        return []
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep_fp32, nodes = [], []
    for node in g.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if name not in outliers or name not in inits:
            nodes.append(node)
            continue
        idx = np.asarray(outliers[name], np.int64)
        w = numpy_helper.to_array(inits[name])  # (K, N)
        mask = np.ones(w.shape[0], np.float32)
        mask[idx] = 0.0
        w_in = w.copy()
        w_in[idx] = 0.0
        inits[name].CopyFrom(numpy_helper.from_array(w_in, name))
        g.initializer.extend([numpy_helper.from_array(mask, name + ".inlier_mask"),
                              numpy_helper.from_array(idx, name + ".outlier_idx"),
                              numpy_helper.from_array(np.ascontiguousarray(w[idx]), name + ".outlier_rows")])
        x, y, base = node.input[0], node.output[0], node.name or name
        nodes += [
            helper.make_node("Mul", [x, name + ".inlier_mask"], [base + "/inliers"], base + "/mask"),
            helper.make_node("Gather", [x, name + ".outlier_idx"], [base + "/outliers"], base + "/gather", axis=-1),
            helper.make_node("MatMul", [base + "/inliers", name], [base + "/y_in"], node.name),
            helper.make_node("MatMul", [base + "/outliers", name + ".outlier_rows"], [base + "/y_out"],
                             base + "/outlier_matmul"),
            helper.make_node("Add", [base + "/y_in", base + "/y_out"], [y], base + "/add"),
        ]
        keep_fp32.append(base + "/outlier_matmul")
    del g.node[:]
    g.node.extend(nodes)
    return keep_fp32


def blockwise_int8(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of the last axis, stored as uint8 with zero point 128.

    (R, C) float -> (R, C) uint8 and (R, C / block_size) float32 scales; C must be a
    multiple of block_size. Dequantized: (q - 128) * scale.
    """
    r, c = w.shape
    blocks = w.reshape(r, c // block_size, block_size)
    scales = np.abs(blocks).max(-1) / 127.0  # (R, C/bs)
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8).reshape(r, c), scales.astype(np.float32)


def _quantize_embedding(model: onnx.ModelProto, block_size: int) -> None:
    """Replace the token-embedding Gather by an 8-bit GatherBlockQuantized.

    Written here because onnxruntime's weight quantizer quantizes Gather only to 4 bits.
    The block size is the largest power of two <= `block_size` that divides n_embd.
    """
    g = model.graph
    node = next(n for n in g.node if n.op_type == "Gather" and n.input[0] == "wte.weight")
    init = next(i for i in g.initializer if i.name == "wte.weight")
    wte = numpy_helper.to_array(init)  # (V,E)
    bs = fit_block(block_size, wte.shape[1])
    if bs is None:
        return  # n_embd not a multiple of 16: keep the fp32 table
    q, scales = blockwise_int8(wte, bs)
    g.initializer.remove(init)
    g.initializer.extend([numpy_helper.from_array(q, "wte.weight_q8"),
                          numpy_helper.from_array(scales, "wte.weight_scales")])
    new = helper.make_node("GatherBlockQuantized", ["wte.weight_q8", node.input[1], "wte.weight_scales"],
                           list(node.output), name=node.name, domain="com.microsoft",
                           gather_axis=0, quantize_axis=1, block_size=bs, bits=8)
    idx = list(g.node).index(node)
    g.node.remove(node)
    g.node.insert(idx, new)
