"""Errors raised by gpt2onnx.

Every error a user can cause is a `Gpt2OnnxError`. Its message is one line that says
what is wrong and what to do next; the CLI prints it and exits non-zero.
"""


class Gpt2OnnxError(Exception):
    """Base class of all errors gpt2onnx raises on purpose."""


class UnsupportedModelError(Gpt2OnnxError):
    """The source is not a GPT-2 model, or cannot be found."""


class ModelDownloadError(UnsupportedModelError):
    """The source is a hub id that is neither in the local Hugging Face cache nor downloadable now."""


class ExportError(Gpt2OnnxError):
    """The export could not be written (output exists, not writable, ...)."""


class ParityError(ExportError):
    """The exported graph does not reproduce the PyTorch model within tolerance."""


class FidelityError(ExportError):
    """The int8 graph misses the fidelity gate against the fp32 reference."""


class ArtifactError(Gpt2OnnxError):
    """A model folder is missing, damaged, or of an unknown format."""


class InvalidRequestError(Gpt2OnnxError, ValueError):
    """A generation request or parameter is invalid."""


class DataError(Gpt2OnnxError):
    """An evaluation data file is missing or malformed."""


class BatchError(Gpt2OnnxError):
    """A batch job cannot start or go on (input missing, output unwritable, output of another job)."""
