"""gpt2onnx: GPT-2 on CPU with onnxruntime — export, run, measure.

For example::

    import gpt2onnx
    gpt2onnx.export("gpt2", "out/gpt2-int8", precision="int8")
    gen = gpt2onnx.load("out/gpt2-int8")
    gen.generate("Hello, I'm a language model,", max_new_tokens=20)

`import gpt2onnx` loads the torch-free runtime only: `export` (the exporter, torch),
`run_batch` and `BatchSummary` (batch jobs) are resolved on first use.
"""

from ._version import __version__

# public API
from .errors import (
    ArtifactError,
    BatchError,
    DataError,
    ExportError,
    FidelityError,
    Gpt2OnnxError,
    InvalidRequestError,
    ModelDownloadError,
    ParityError,
    UnsupportedModelError,
)
from .params import GenerationParams
from .runtime import GenerationResult, Generator, Request, StepResult, load

_LAZY = {"export": "gpt2onnx.exporter", "run_batch": "gpt2onnx.batch", "BatchSummary": "gpt2onnx.batch"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'gpt2onnx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArtifactError",
    "BatchError",
    "BatchSummary",
    "DataError",
    "ExportError",
    "FidelityError",
    "Gpt2OnnxError",
    "InvalidRequestError",
    "ModelDownloadError",
    "ParityError",
    "UnsupportedModelError",
    "GenerationParams",
    "GenerationResult",
    "Generator",
    "Request",
    "StepResult",
    "__version__",
    "export",
    "load",
    "run_batch",
]
