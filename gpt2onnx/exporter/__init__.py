"""The exporter: GPT-2 (PyTorch) -> a verified ONNX model folder with a KV cache.

For example::

    from gpt2onnx.exporter import export
    export("gpt2", "out/gpt2-int8", precision="int8", random_weights=True)

Modules, in pipeline order: `sources` (load a hub id / folder / random weights),
`graph` (build the decoder graph), `parity` (PyTorch reference and the fp32 check),
`quantize` (int8/int4 recipes, outlier split), `nbits` (MatMulNBits
algorithms, the shared token table), `policy` (the fidelity gate and its retry),
`modelcard` (MODEL_CARD.md and tags), `publish` (atomic folder write), and `pipeline`
(`export`, which runs them in order). Importing this package imports no torch.
"""

from .pipeline import PRECISIONS, ExportConfig, export

__all__ = ["PRECISIONS", "ExportConfig", "export"]
