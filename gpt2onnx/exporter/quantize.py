"""Quantized weight formats: the named recipes, the order they are tried in, the outlier split, the driver.

A recipe (`QuantRecipe`, defined in `recipe`) says which scheme the transformer's MatMuls
take. int8 ships ``scheme="qgemm"`` (`INT8`, see `qgemm`); int8's fallback when that misses
the gate (`INT8_NBITS`), and int4, use onnxruntime's ``MatMulNBits`` (see `nbits`) with
``accuracy_level=4``: int8 dot-product kernels, activations quantized per block along K.
`recipes_to_try` is the ladder the exporter walks; `quantize_model` applies one recipe.

Both schemes give activations one scale per row or block, which the few huge activation
channels of trained GPT-2 would wreck; so the exporter measures every MatMul input on real
text (`calibrate`) and keeps those channels in fp32 (`split_outliers`, LLM.int8()'s
decomposition). A model without outliers gets no extra nodes. The measurements:
docs/quality.md, "The hazard: activation outliers".
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import EXTERNAL_DATA
from .nbits import fit_block, head_is_tied, quantize_matmuls, tie_table
from .qgemm import quantize_qgemm
from .recipe import ALGORITHMS, SCHEMES, SEVEN_BITS, QuantRecipe

__all__ = ["ALGORITHMS", "FALLBACK_BLOCK", "INT4", "INT4_LADDER", "INT4_TABLE8", "INT8", "INT8_NBITS", "INT8_QGEMM",
           "SCHEMES", "SEVEN_BITS", "Int8Recipe", "QuantRecipe", "calibrate", "fit_block", "outlier_channels",
           "quantize_model", "recipes_to_try", "split_outliers"]

Int8Recipe = QuantRecipe  # the name before int4 existed

INT8_NBITS = QuantRecipe(block_size=128)  # MatMulNBits: decode 11 % faster than block 32 here (docs/quality.md)
INT8_QGEMM = QuantRecipe(scheme="qgemm", seven_bits="weights", block_size=0, accuracy_level=0, table_block_size=0)
INT8 = INT8_QGEMM  # shipped (issue #21, bench/README.md); a miss falls back to INT8_NBITS, then its finer block
FALLBACK_BLOCK = 32  # MatMulNBits' retry block size when block 128 misses the fidelity gate

# The int4 ladder, tried in order until one passes the int4 gate (docs/quality.md, "int4"):
# the 4-bit token table first (embedding and LM head), then the 8-bit table, then a finer block with
# zero points (the most faithful body measured: block 16 asymmetric, docs/quality.md).
INT4 = QuantRecipe(bits=4, block_size=32, symmetric=True, lm_head="int4", embedding="int4", table_block_size=32)
INT4_TABLE8 = replace(INT4, lm_head="int8", embedding="int8", table_block_size=128)
INT4_LADDER = (INT4, INT4_TABLE8, replace(INT4_TABLE8, block_size=16, symmetric=False))


def recipes_to_try(recipe: QuantRecipe | None = None, n_embd: int = 768, *, precision: str = "int8"
                   ) -> list[QuantRecipe]:
    """The recipes the exporter tries in order.

    int8: `recipe` (default `INT8`, the qgemm scheme, which has no block), then for qgemm
    MatMulNBits' ladder (`INT8_NBITS`), for MatMulNBits the finer fallback block. int4:
    `INT4_LADDER` (or `recipe` alone). Block sizes shrink to the largest power of two that
    divides `n_embd` (every MatMul's K is n_embd or 4 x n_embd): onnxruntime pads a partial
    block, which would cost memory for nothing (gpt2-xl's 1600 -> 64).

    >>> [r.label for r in recipes_to_try()]
    ['qgemm (7-bit weights)', 'block 128', 'block 32']
    >>> [r.block_size for r in recipes_to_try(INT8_NBITS, n_embd=1600)]
    [64, 32]
    >>> [(r.block_size, r.lm_head) for r in recipes_to_try(precision="int4")]
    [(32, 'int4'), (32, 'int8'), (16, 'int8')]
    """
    def fit(r: QuantRecipe, block: int | None = None) -> QuantRecipe:
        return replace(r, block_size=fit_block(block or r.block_size, n_embd) or (block or r.block_size),
                       table_block_size=fit_block(r.table_block_size, n_embd) or r.table_block_size)

    if precision == "int4":
        ladder = [fit(r) for r in ([recipe] if recipe else INT4_LADDER)]
        return [r for i, r in enumerate(ladder) if r not in ladder[:i]]
    recipe = recipe or INT8
    if recipe.scheme == "qgemm":  # per column: no block to fit; a miss falls back to MatMulNBits
        return [recipe] + recipes_to_try(INT8_NBITS, n_embd)
    out = [fit(recipe)]
    finer = fit(recipe, min(FALLBACK_BLOCK, recipe.block_size))
    return out if finer == out[0] else out + [finer]


def quantize_model(fp32_path: str, out_folder: str, recipe: QuantRecipe = INT8,
                   outliers: dict[str, list[int]] | None = None, report: dict | None = None) -> str:
    """Quantize the fp32 graph at `fp32_path` into `out_folder`/model.onnx (+ data).

    `outliers` maps MatMul weight names to input channels kept in fp32 (see
    `outlier_channels`); by default there are none. The LM head takes the
    token table (`nbits.tie_table`), so the MatMul pass leaves it alone; what that did
    (shared table or not) goes into `report` when given.
    """
    model = onnx.load(fp32_path)
    tied = head_is_tied(model)  # before the split zeroes the head's outlier rows
    keep_fp32 = split_outliers(model, outliers or {})
    if recipe.scheme == "qgemm":
        table = quantize_qgemm(model, recipe.seven_bits, keep_fp32, tied)
    else:
        model = quantize_matmuls(model, recipe, keep_fp32 + ["lm_head"])
        table = tie_table(model, recipe.table_bits, recipe.table_block_size, recipe.accuracy_level, tied)
    if report is not None:
        report.update(table)
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


def outlier_channels(stats: dict[str, np.ndarray], recipe: QuantRecipe = INT8) -> dict[str, list[int]]:
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
    """Rewrite each MatMul whose weight is in `outliers` as inlier part + fp32 outlier part::

        X ──Mul(mask: 0 at outliers)──MatMul(W, outlier rows 0; quantized later)──┐
        └──Gather(outlier channels)───MatMul(W[outliers]) in fp32─────────────────Add── Y  (= X @ W)

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
