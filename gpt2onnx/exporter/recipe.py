"""`QuantRecipe`: how a quantized graph is made, recorded in the manifest's ``quantization``.

It sits below the weight passes (`nbits`, `qgemm`) and their driver (`quantize`), which all
read it, so none of them imports another to learn what a recipe is. The named recipes and the
order they are tried in live in `quantize`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SCHEMES = ("MatMulNBits", "qgemm")
ALGORITHMS = ("rtn",)  # MatMulNBits' weight rounding; the others measured were dropped (see nbits)
SEVEN_BITS = ("activations", "weights")  # qgemm: which operand keeps to |q| <= 63 (see qgemm)


@dataclass(frozen=True)
class QuantRecipe:
    """How a quantized graph is made (recorded in the manifest's ``quantization``)."""

    scheme: str = "MatMulNBits"  # or "qgemm": per-row u8 activations x per-column s8 weights (see qgemm)
    bits: int = 8  # of the transformer MatMuls
    block_size: int = 128  # weights per scale along K; smaller = more accurate, more scales, slower
    symmetric: bool = True  # no zero points (weights centred on 0); False = a uint8 zero point per block
    accuracy_level: int = 4  # 4 = int8 activations per block -> int8 dot-product kernels
    algorithm: str = "rtn"  # how the MatMul weights are rounded: round-to-nearest (see nbits for the others tried)
    lm_head: str = "int8"  # the tied token table as LM head: "int8" or "int4" (the same table as the embedding)
    embedding: str = "int8"  # the token table as GatherBlockQuantized (position table: 1 M, stays fp32)
    table_block_size: int = 128  # block of the token table
    outlier_ratio: float = 6.0  # an input channel whose calibrated |max| is > this x the median's stays fp32
    max_outliers: int = 16  # per MatMul, the largest first
    seven_bits: str = "activations"  # qgemm: the operand kept to |q| <= 63 (AVX2 int16 saturation; see qgemm)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme == "qgemm" and (self.bits, self.lm_head) != (8, "int8"):
            raise ValueError("the qgemm scheme is 8-bit: bits=8, lm_head and embedding 'int8'")
        if self.seven_bits not in SEVEN_BITS:
            raise ValueError(f"seven_bits must be one of {SEVEN_BITS}, got {self.seven_bits!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.lm_head != self.embedding:
            raise ValueError("the LM head and the embedding share one table: give them the same precision")

    @property
    def label(self) -> str:
        """What the exporter's progress calls this recipe."""
        if self.scheme == "qgemm":
            return f"qgemm (7-bit {self.seven_bits})"
        return f"block {self.block_size}"

    @property
    def table_bits(self) -> int:
        return int(self.lm_head.removeprefix("int"))

    def to_json(self) -> dict:
        return asdict(self)
