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


def first_line(error: BaseException | str, limit: int = 160, *, with_type: bool = False) -> str:
    """The first line of a message (a library's exception, say), its spaces squeezed, cut to
    `limit` characters ("..." marks a cut), for quoting inside one line of ours.

    `with_type` puts the exception's class name first (for errors that are not ours).

    >>> first_line(RuntimeError("bad shape\\n  at node 3"))
    'bad shape'
    >>> first_line(KeyError("k"), with_type=True), first_line(ValueError(), with_type=True)
    ("KeyError: 'k'", 'ValueError')
    >>> first_line("x" * 50, 10)
    'xxxxxxx...'
    """
    lines = str(error).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if isinstance(error, BaseException) and (with_type or not text):
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def show(value, limit: int = 40) -> str:
    """repr of a user value, cut to about `limit` characters for one-line messages.

    >>> show("x" * 50)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
