"""The model folder: the contract between the exporter and the runtime.

A model folder holds ``model.onnx`` (+ ``model.onnx.data``), ``tokenizer.json``,
``config.json``, ``MODEL_CARD.md`` and the manifest ``gpt2onnx.json``. The manifest
records what the folder is (source, precision, dims, I/O names), how it was made
(tool versions, quantization), how good it is (parity figures), the size and sha256 of
every file, and the sha256 of its own content (``manifest_sha256``); `verify` also checks
what it says against config.json and the graph (`gpt2onnx.graphcheck`). So a damaged or
edited folder is refused at load instead of producing wrong text.

For example::

    m = read_manifest("out/gpt2-int8")
    m.precision, m.dims.n_layer, m.source.random_weights
    # -> ('int8', 12, False)

`read_manifest` and `verify` return a typed, frozen `Manifest`; every field a caller
reads is checked once, here, so callers never guess (`m.source.random_weights`, not
``m.get("source", {}).get(...)``). ``Manifest.to_dict()`` gives the JSON as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import copy
from dataclasses import dataclass, field
from typing import Any

from .errors import ArtifactError, show
from .fsutil import atomic_write_text

MANIFEST = "gpt2onnx.json"
FORMAT = "gpt2onnx"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.onnx", "tokenizer.json", "config.json")
DIMS = ("n_layer", "n_head", "n_embd", "head_dim", "vocab_size", "n_positions")  # what the runtime reads
# The Azure ML gpt2 card's inference-min-sku-spec "2|0|8|28" (vCPU|GPU|GiB|disk GiB): what the
# model card writes and what `gpt2onnx skus` checks a VM size against.
MIN_INFERENCE_VM = {"vcpus": 2, "gpus": 0, "memory_gib": 8, "disk_gib": 28}
PRECISIONS = ("fp32", "int8", "int4")
SELF_HASH = "manifest_sha256"  # sha256 of the manifest's own content without this field (`content_sha256`)
KV_CACHE_DTYPES = {"fp32": "float32", "int8": "int8"}  # manifest kv_cache.dtype -> numpy dtype of the buffers


@dataclass(frozen=True)
class Dims:
    """The architecture numbers the runtime needs."""

    n_layer: int
    n_head: int
    n_embd: int
    head_dim: int
    vocab_size: int
    n_positions: int  # context length


@dataclass(frozen=True)
class Source:
    """Where the weights came from."""

    id: str | None  # hub id or folder given to the exporter
    kind: str | None  # "hub", "folder" or "random"
    revision: str | None
    random_weights: bool  # seeded random weights: the text is meaningless
    seed: int | None


@dataclass(frozen=True)
class KVCacheSpec:
    """How the graph keeps its KV cache (manifest ``kv_cache``; a folder without it has an fp32 cache)."""

    dtype: str = "fp32"  # "fp32" or "int8" (static per-channel scales inside the graph)
    quant_type: str | None = None  # "PER_CHANNEL" for int8

    @property
    def numpy_dtype(self) -> str:
        """The numpy dtype of past/present buffers: "float32" or "int8"."""
        return KV_CACHE_DTYPES[self.dtype]


@dataclass(frozen=True)
class Manifest:
    """A model folder's ``gpt2onnx.json``, checked and typed. Make with `read_manifest` or `verify`."""

    name: str
    precision: str  # "fp32", "int8" or "int4"
    dims: Dims
    source: Source
    eos_token_id: int
    bos_token_id: int
    inputs: tuple[str, ...]  # graph input names, in order
    outputs: tuple[str, ...]
    files: dict  # name -> {"bytes", "sha256"}
    n_params: int
    format_version: int
    quantization: dict | None = None  # the int8/int4 recipe, outlier channels, recipes tried
    parity: dict = field(default_factory=dict)  # fp32 (and int8/int4) figures against PyTorch
    fidelity: dict | None = None  # the int8/int4 gate's figures and verdict
    tags: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)  # versions of the tools that made the folder
    opset: int | None = None
    created: str | None = None
    export_seconds: float | None = None
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)  # fp32 for folders made before the field existed
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def past_names(self) -> list[str]:
        """The KV-cache inputs, ``past_key_values.{i}.key|value`` in layer order."""
        return [n for n in self.inputs if n.startswith("past_key_values.")]

    @property
    def present_names(self) -> list[str]:
        """The KV-cache outputs, ``present.{i}.key|value`` in layer order."""
        return [n for n in self.outputs if n.startswith("present.")]

    @property
    def size_bytes(self) -> int:
        """Bytes of every file of the folder."""
        return sum(int(f.get("bytes", 0)) for f in self.files.values())

    def to_dict(self) -> dict:
        """The manifest as JSON-ready data (a copy of what the folder holds)."""
        return copy.deepcopy(self.raw)


def _typed(manifest: dict, path: str) -> Manifest:
    dims = Dims(**{k: manifest["dims"][k] for k in DIMS})
    src = manifest.get("source")
    src = src if isinstance(src, dict) else {}
    io = manifest["io"]
    inputs, outputs = io.get("inputs"), io.get("outputs")
    if not (isinstance(inputs, list) and isinstance(outputs, list) and all(isinstance(n, str) for n in inputs + outputs)):
        raise ArtifactError(f"{path}: io.inputs / io.outputs must be lists of names; the folder is damaged, re-export it")
    m = Manifest(
        name=str(manifest.get("name") or "gpt2"), precision=manifest["precision"], dims=dims,
        source=Source(id=src.get("id"), kind=src.get("kind"), revision=src.get("revision"),
                      random_weights=bool(src.get("random_weights")), seed=src.get("seed")),
        eos_token_id=manifest.get("eos_token_id", dims.vocab_size - 1),
        bos_token_id=manifest.get("bos_token_id", manifest.get("eos_token_id", dims.vocab_size - 1)),
        inputs=tuple(inputs), outputs=tuple(outputs), files=manifest["files"],
        n_params=int(manifest.get("n_params") or 0), format_version=manifest["format_version"],
        quantization=manifest.get("quantization"), parity=manifest.get("parity") or {},
        fidelity=manifest.get("fidelity"), tags=manifest.get("tags") or {}, tools=manifest.get("tools") or {},
        opset=manifest.get("opset"), created=manifest.get("created"), export_seconds=manifest.get("export_seconds"),
        kv_cache=_kv_cache(manifest.get("kv_cache"), path), raw=manifest,
    )
    if len(m.past_names) != 2 * dims.n_layer or len(m.present_names) != 2 * dims.n_layer:
        raise ArtifactError(f"{path}: io names {2 * dims.n_layer} past/present per cache expected for "
                            f"{dims.n_layer} layers; the folder is damaged, re-export it")
    return m


def _kv_cache(kv: Any, path: str) -> KVCacheSpec:
    if kv is None:
        return KVCacheSpec()
    if not (isinstance(kv, dict) and isinstance(kv.get("dtype"), str)):
        raise ArtifactError(f"{path}: kv_cache must be an object with a dtype; the folder is damaged, re-export it")
    if kv["dtype"] not in KV_CACHE_DTYPES:
        raise ArtifactError(f"{path}: kv_cache dtype {show(kv['dtype'])} is not one this gpt2onnx knows "
                            f"({', '.join(KV_CACHE_DTYPES)}); upgrade gpt2onnx or re-export the folder")
    return KVCacheSpec(dtype=kv["dtype"], quant_type=kv.get("quant_type"))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in `folder` except the manifest itself."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        out[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return out


def content_sha256(manifest: dict) -> str:
    """sha256 of a manifest's content, its own `SELF_HASH` field left out (canonical JSON: sorted keys)."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: str, manifest: dict) -> None:
    """Write the manifest, adding the file table and its own sha256 (call after every other file is written)."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=describe_files(folder))
    manifest[SELF_HASH] = content_sha256(manifest)
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def fspath(folder: Any) -> str:
    """`os.fspath(folder)`, with a one-line `ArtifactError` for what is not a path (None, a number)."""
    try:
        return os.fspath(folder)
    except TypeError:
        raise ArtifactError(f"a model folder must be a path (str or os.PathLike), got {type(folder).__name__}; "
                            "pass the folder written by 'gpt2onnx export'") from None


def read_manifest(folder: str) -> Manifest:
    """Read and check the manifest of a model folder (no hashing; see `verify`).

    Every field the runtime reads is type-checked here (dims are positive integers, the
    special token ids lie inside the vocabulary), so a damaged or hand-edited manifest
    is one `ArtifactError` at load, never a `KeyError` or a wrong shape later.
    """
    folder = fspath(folder)
    if os.path.isfile(folder):
        raise ArtifactError(f"{folder!r} is a file; pass the model folder that holds it (the one with {MANIFEST})")
    if not os.path.isdir(folder):
        raise ArtifactError(f"model folder {folder!r} does not exist; export one with 'gpt2onnx export SOURCE {folder}'")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "model.onnx")) or any(
            n.startswith("decoder_model") for n in os.listdir(folder)
        ):
            raise ArtifactError(
                f"{folder!r} has an ONNX model but no {MANIFEST}: it is not a gpt2onnx export (an Optimum "
                "export?); make one from the original model with 'gpt2onnx export SOURCE OUTDIR'"
            )
        raise ArtifactError(f"{folder!r} is not a gpt2onnx model folder (no {MANIFEST}); "
                            "export one with 'gpt2onnx export SOURCE OUTDIR'")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.__class__.__name__}); the folder is damaged, re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a gpt2onnx manifest; re-export the model with 'gpt2onnx export'")
    version = manifest.get("format_version")
    if not _positive_int(version):
        raise ArtifactError(f"{path} has no valid format_version; the folder is damaged, re-export it")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"model folder format {version} is newer than this gpt2onnx supports ({FORMAT_VERSION}); "
            "upgrade gpt2onnx (pip install -U gpt2onnx)"
        )
    for key in ("dims", "files", "precision", "io"):
        if not isinstance(manifest.get(key), dict if key != "precision" else str):
            raise ArtifactError(f"{path} lacks '{key}'; the folder is damaged, re-export it")
    if manifest["precision"] not in PRECISIONS:
        raise ArtifactError(f"{path}: precision {show(manifest['precision'])} is not one this gpt2onnx knows "
                            f"({', '.join(PRECISIONS)}); upgrade gpt2onnx or re-export the folder")
    dims = manifest["dims"]
    for key in DIMS:
        if not _positive_int(dims.get(key)):
            raise ArtifactError(f"{path}: dims.{key} must be a positive integer, got {show(dims.get(key))}; "
                                "the folder is damaged, re-export it")
    if dims["head_dim"] * dims["n_head"] != dims["n_embd"]:
        raise ArtifactError(f"{path}: dims.head_dim x n_head != n_embd; the folder is damaged, re-export it")
    for key in ("eos_token_id", "bos_token_id"):
        value = manifest.get(key)
        if key in manifest and not (type(value) is int and 0 <= value < dims["vocab_size"]):
            raise ArtifactError(f"{path}: {key} must be a token id in [0, {dims['vocab_size']}), got {show(value)}; "
                                "the folder is damaged, re-export it")
    return _typed(manifest, path)


def _positive_int(value: Any) -> bool:
    return type(value) is int and value >= 1  # not bool, not float


def verify(folder: str, *, check_hashes: bool = True) -> Manifest:
    """Check that every file of the manifest is present, complete and (optionally) unchanged.

    Args:
        folder: the model folder.
        check_hashes: also compare sha256 (reads every byte; sizes are always checked).

    Returns:
        The manifest.

    Raises:
        ArtifactError: with one line naming the first problem found.

    For example::

        verify("out/gpt2-int8").precision
        # -> 'int8'
    """
    folder = fspath(folder)
    manifest = read_manifest(folder)
    files = manifest.files
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"the manifest of {folder!r} lists no {name}; the folder is damaged, re-export it")
    for name, info in files.items():
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or not isinstance(info, dict):
            raise ArtifactError(f"the manifest of {folder!r} has a bad file entry {name!r}; re-export it")
        if not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing; copy the whole model folder again or re-export it")
        size = os.path.getsize(path)
        if size != info.get("bytes"):
            raise ArtifactError(
                f"{path} is {size} bytes, the manifest says {info.get('bytes')} (truncated or replaced); "
                "copy the model folder again or re-export it"
            )
        if check_hashes and sha256_file(path) != info.get("sha256"):
            raise ArtifactError(
                f"{path} does not match its sha256 in the manifest (damaged or modified); "
                "copy the model folder again or re-export it"
            )
    from .graphcheck import check

    check(folder, manifest)  # config.json and the graph agree with what the manifest says about them
    own = manifest.raw.get(SELF_HASH)
    if own is not None and own != content_sha256(manifest.raw):
        raise ArtifactError(f"{folder}/{MANIFEST} was edited after export (its content does not match its "
                            f"{SELF_HASH}); restore the original file or re-export the folder")
    return manifest


def summary(m: Manifest) -> str:
    """A few human-readable lines describing a model folder."""
    d, src = m.dims, m.source
    weights = f"RANDOM WEIGHTS (seed {src.seed}; text is meaningless)" if src.random_weights else "pretrained"
    lines = [
        f"model      {m.name} from {src.id or '?'} ({weights})",
        f"precision  {m.precision}" + (f" ({m.quantization.get('scheme')})" if m.quantization else "")
        + (f", KV cache {m.kv_cache.dtype} ({m.kv_cache.quant_type})" if m.kv_cache.dtype != "fp32" else ""),
        f"dims       {d.n_layer} layers, {d.n_head} heads, {d.n_embd} dims, vocab {d.vocab_size}, "
        f"context {d.n_positions}, {m.n_params / 1e6:.1f} M parameters",
        f"files      {len(m.files)} files, {m.size_bytes / 1e6:.1f} MB",
    ]

    def figures(d: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in d.items() if not isinstance(v, (dict, list)))

    if m.parity:
        lines.append("parity     " + figures(m.parity))
    if m.fidelity:
        lines.append("fidelity   " + figures(m.fidelity))
    lines.append("made with  " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    lines.append(f"created    {m.created or '?'}")
    return "\n".join(lines)
