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

import onnx

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
    embedding: str = "fp32"  # token/position tables are gathered, not multiplied

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
    path = os.path.join(out_folder, "model.onnx")
    onnx.save_model(q.model.model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    return path
