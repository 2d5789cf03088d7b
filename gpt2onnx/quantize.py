"""int8 weight formats for the exported graph.

The shipped recipe (`INT8`) uses onnxruntime's own weight quantizer to turn every MatMul,
the LM head included, into ``MatMulNBits`` with 8-bit, block-wise symmetric weights.
``accuracy_level=4`` lets onnxruntime run those MatMuls on int8 dot-product kernels
(VNNI / AMX where the CPU has them); it is ~30x faster here than the float path
(``accuracy_level`` unset dequantizes each weight matrix on every call).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import EXTERNAL_DATA


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 graph is made (recorded in the manifest)."""

    scheme: str = "MatMulNBits"  # onnxruntime contrib op with block-wise quantized weights
    bits: int = 8
    block_size: int = 32  # weights per scale along K; smaller = more accurate, more scales
    symmetric: bool = True  # no zero points: int8 weights centred on 0
    accuracy_level: int = 4  # 4 = int8 activations per block -> int8 dot-product kernels
    lm_head: str = "int8"  # the 38 M-parameter LM head is quantized too
    embedding: str = "int8"  # token table as GatherBlockQuantized (position table: 1 M, stays fp32)

    def to_json(self) -> dict:
        return asdict(self)


INT8 = Int8Recipe()


def quantize_int8(fp32_path: str, out_folder: str, recipe: Int8Recipe = INT8) -> str:
    """Quantize the fp32 graph at `fp32_path` into `out_folder`/model.onnx (+ data)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    old_level = log.level
    log.setLevel(logging.ERROR)
    try:
        model = onnx.load(fp32_path)
        q = MatMulNBitsQuantizer(
            model,
            bits=recipe.bits,
            block_size=recipe.block_size,
            is_symmetric=recipe.symmetric,
            accuracy_level=recipe.accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
        q.process()
    finally:
        log.setLevel(old_level)
    model = q.model.model
    if recipe.embedding == "int8":
        _quantize_embedding(model, recipe.block_size)
    path = os.path.join(out_folder, "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    return path


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
    bs = block_size
    while bs >= 16 and wte.shape[1] % bs:
        bs //= 2
    if bs < 16:
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
