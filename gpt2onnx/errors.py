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


def first_line(error: BaseException | str, limit: int = 160) -> str:
    """The first line of an error message (a library's exception, say), cut to `limit` characters,
    for quoting inside one of ours.

    >>> first_line(RuntimeError("bad shape\\n  at node 3"))
    'bad shape'
    """
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def show(value) -> str:
    """repr of a user value, cut to about 40 characters for one-line messages.

    >>> show("x" * 50)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
