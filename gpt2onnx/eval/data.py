r"""The evaluation data files: where they are, how they are read, whether they are the originals.

>>> wikitext2_text(" = Title = \n \n Text .\n")
' = Title = \n\n\n\n\n Text .\n'

Nothing here searches a checkout's folder layout: a path comes from the caller
(``--data``) or from the folder named by ``$GPT2ONNX_DATA`` (docs/quality.md).
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import DataError

DATA_ENV = "GPT2ONNX_DATA"  # folder holding wiki.test.raw and lambada_test.jsonl
WIKITEXT2_FILE = "wiki.test.raw"
LAMBADA_FILE = "lambada_test.jsonl"
# sha256 of the original files (wikitext-2-raw-v1.zip's test file; OpenAI's LAMBADA test set).
KNOWN_SHA256 = {
    WIKITEXT2_FILE: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    LAMBADA_FILE: "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
}
WHERE = {
    WIKITEXT2_FILE: "wiki.test.raw from wikitext-2-raw-v1.zip "
                    "(e.g. https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip)",
    LAMBADA_FILE: "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
}

# -- data files -----------------------------------------------------------------------

def candidates(name: str) -> list[str]:
    """Where `data_path` looks for `name` when no path is given: ``$GPT2ONNX_DATA``, then ``.``."""
    places = [os.environ[DATA_ENV]] if os.environ.get(DATA_ENV) else []
    places.append(os.getcwd())
    return [os.path.normpath(os.path.join(p, name)) for p in places]


def data_path(name: str, path: str | None = None) -> str:
    """Where the data file `name` is: `path` if given, else the first of the usual places.

    The usual places: the folder named by ``$GPT2ONNX_DATA``, then the current folder.
    """
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist; get {WHERE.get(name, name)} and pass its path")
        return path
    for p in candidates(name):
        if os.path.isfile(p):
            return p
    raise DataError(f"{name} not found (looked in $GPT2ONNX_DATA and .); "
                    f"download {WHERE.get(name, name)} and pass --data PATH or set {DATA_ENV}")


def read_text(path: str) -> str:
    """A UTF-8 text file with newlines normalized as Python's text mode does; refuses empty files."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path!r} ({e.strerror}); check the path and its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                        "pass the original file, not a re-encoded or compressed copy") from None
    if not text.strip():
        raise DataError(f"{path} is empty; download the file again")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def wikitext2_text(raw: str) -> str:
    """The text the Hugging Face perplexity guide scores, rebuilt from ``wiki.test.raw``.

    The guide scores ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1")["test"]["text"])``.
    The dataset's rows are the file's lines (newline kept), blank lines (" \\n") as "".
    """
    parts = raw.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return "\n\n".join(line if line.strip() else "" for line in lines)


def read_lambada(path: str) -> list[str]:
    """The passages of a LAMBADA JSONL file (one ``{"text": ...}`` per line)."""
    texts = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}); expected one {{\"text\": ...}} object "
                            "per line (lambada_test.jsonl)") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path} line {n} has no \"text\" string; expected one {{\"text\": ...}} object per line")
        if " " not in row["text"].strip():
            raise DataError(f"{path} line {n} has no space-separated last word to predict")
        texts.append(row["text"])
    return texts


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def data_info(name: str, path: str) -> dict:
    digest = _sha256(path)
    known = KNOWN_SHA256.get(name)
    return {"data": os.path.abspath(path), "data_sha256": digest,
            "data_is_original": (digest == known) if os.path.basename(path) == name else None}
