"""gpt2onnx: GPT-2 on CPU with onnxruntime — export, run, measure.

>>> import gpt2onnx
>>> gpt2onnx.export("gpt2", "out/gpt2-int8", precision="int8")         # doctest: +SKIP
>>> gen = gpt2onnx.load("out/gpt2-int8")                                # doctest: +SKIP
>>> gen.generate("Hello, I'm a language model,", max_new_tokens=20)    # doctest: +SKIP
"""

__version__ = "0.1.0"

# public API
from .errors import (  # noqa: E402
    ArtifactError,
    ExportError,
    FidelityError,
    Gpt2OnnxError,
    InvalidRequestError,
    ParityError,
    UnsupportedModelError,
)
from .batch import BatchSummary, run_batch  # noqa: E402
from .export import export  # noqa: E402
from .params import GenerationParams  # noqa: E402
from .runtime import GenerationResult, Generator, StepResult, load  # noqa: E402

__all__ = [
    "ArtifactError",
    "BatchSummary",
    "ExportError",
    "FidelityError",
    "Gpt2OnnxError",
    "InvalidRequestError",
    "ParityError",
    "UnsupportedModelError",
    "GenerationParams",
    "GenerationResult",
    "Generator",
    "StepResult",
    "export",
    "load",
    "run_batch",
]
