"""The manifest against what it describes: `config.json` and the graph in `model.onnx`::

    check("out/gpt2-int8", read_manifest("out/gpt2-int8"))   # raises ArtifactError on a mismatch

The sha256 table covers every file but the manifest, and the manifest decides how the
runtime runs the graph: `precision` and `quantization` (whether every MatMul needs an even
number of rows, `_engine.needs_row_pairs`), `kv_cache` (the cache buffers' dtype), `dims`
and `io` (shapes and names of the cache). So each of those is checked against the file it
describes, and a mismatch is one `ArtifactError` saying to re-export. (The manifest's own
``manifest_sha256`` catches any other edit; `artifact.verify` checks it after this.)

The graph is read with protobuf, which onnxruntime itself depends on, through a subset of
ONNX's schema (`_SCHEMA`, field numbers from onnx/onnx.proto): the runtime does not depend
on the ``onnx`` package. Only the graph's structure is read, never the weights
(``model.onnx.data``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from .errors import ArtifactError, show

CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "eos_token_id", "bos_token_id")
ELEM_TYPES = {1: "fp32", 3: "int8"}  # ONNX TensorProto element types of a KV cache -> manifest kv_cache.dtype
HEAD = "lm_head"  # the exporter's name of the LM head node (`exporter.nbits.HEAD`; "lm_head_Q8" once quantized)
# message -> [(field, number, type, repeated)]; a type in _SCHEMA is a message. Unknown fields are skipped.
_SCHEMA = {
    "Model": [("graph", 7, "Graph", False), ("opset_import", 8, "OpsetId", True)],
    "OpsetId": [("domain", 1, "bytes", False), ("version", 2, "int64", False)],
    "Graph": [("node", 1, "Node", True), ("initializer", 5, "Tensor", True), ("input", 11, "ValueInfo", True),
              ("output", 12, "ValueInfo", True)],
    "Node": [("input", 1, "bytes", True), ("name", 3, "bytes", False), ("op_type", 4, "bytes", False), ("attribute", 5, "Attribute", True)],
    "Attribute": [("name", 1, "bytes", False), ("i", 3, "int64", False), ("s", 4, "bytes", False)],
    "Tensor": [("dims", 1, "int64", True), ("name", 8, "bytes", False)],
    "ValueInfo": [("name", 1, "bytes", False), ("type", 2, "Type", False)],
    "Type": [("tensor_type", 1, "TensorType", False)],
    "TensorType": [("elem_type", 1, "int32", False), ("shape", 2, "Shape", False)],
    "Shape": [("dim", 1, "Dim", True)],
    "Dim": [("dim_value", 1, "int64", False), ("dim_param", 2, "bytes", False)],
}


@dataclass
class GraphFacts:
    """What model.onnx says about the things the manifest also records."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    elem_types: dict[str, int] = field(default_factory=dict)  # input/output name -> ONNX element type
    shapes: dict[str, list] = field(default_factory=dict)  # name -> dims (int, or a name for a symbolic dim)
    matmul: set[tuple] = field(default_factory=set)  # (bits, block_size, accuracy_level) of the transformer MatMulNBits
    head: tuple | None = None  # (bits, block_size) of a quantized LM head
    table: tuple | None = None  # (bits, block_size) of the quantized token table (GatherBlockQuantized)
    kv_quant: set[str] = field(default_factory=set)  # GroupQueryAttention k/v_quant_type ("" = none)
    attention: list[int] = field(default_factory=list)  # num_heads of each GroupQueryAttention
    initializers: dict[str, list[int]] = field(default_factory=dict)
    opset: int | None = None
    scheme: str | None = None  # "MatMulNBits" or "qgemm" (MatMulIntegerToFloat), None = no quantized MatMul

    @property
    def precision(self) -> str:
        bits = {b for b, _, _ in self.matmul}
        return "fp32" if not bits else f"int{bits.pop()}" if len(bits) == 1 else "mixed"


@cache
def _model_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    t = descriptor_pb2.FieldDescriptorProto
    scalar = {"bytes": t.TYPE_BYTES, "int64": t.TYPE_INT64, "int32": t.TYPE_INT32}
    f = descriptor_pb2.FileDescriptorProto(name="gpt2onnx_onnx_subset.proto", package="gpt2onnx_onnx",
                                           syntax="proto2")
    for name, fields in _SCHEMA.items():
        m = f.message_type.add(name=name)
        for fname, number, kind, repeated in fields:
            fd = m.field.add(name=fname, number=number, label=t.LABEL_REPEATED if repeated else t.LABEL_OPTIONAL)
            if kind in scalar:
                fd.type = scalar[kind]
            else:
                fd.type, fd.type_name = t.TYPE_MESSAGE, f".gpt2onnx_onnx.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("gpt2onnx_onnx.Model"))


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def read_graph(path: str) -> GraphFacts:
    """The facts of the graph at `path` (structure only); raises `ArtifactError` if it is no ONNX model."""
    try:
        with open(path, "rb") as f:
            model = _model_class().FromString(f.read())
    except OSError as e:
        raise ArtifactError(f"cannot read {path} ({e.strerror or e}); copy the model folder again") from None
    except Exception as e:  # protobuf's DecodeError (and its C backend's variants)
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}); the folder is damaged, "
                            "re-export it") from None
    g, facts = model.graph, GraphFacts()
    if not model.HasField("graph") or not g.node:
        raise ArtifactError(f"{path} holds no graph; the folder is damaged, re-export it")
    facts.opset = next((int(o.version) for o in model.opset_import if o.domain in (b"", b"ai.onnx")), None)
    for group, names in ((g.input, facts.inputs), (g.output, facts.outputs)):
        for vi in group:
            name, tt = _text(vi.name), vi.type.tensor_type
            names.append(name)
            facts.elem_types[name] = tt.elem_type
            facts.shapes[name] = [d.dim_value if d.HasField("dim_value") else _text(d.dim_param) for d in tt.shape.dim]
    facts.initializers = {_text(t.name): list(t.dims) for t in g.initializer}
    for node in g.node:
        op, name = _text(node.op_type), _text(node.name)
        attrs = {_text(a.name): (a.i if a.HasField("i") else _text(a.s)) for a in node.attribute}
        if op == "MatMulIntegerToFloat":  # the qgemm scheme: int8 weights per column, no block (exporter/qgemm.py)
            facts.scheme = "qgemm"
            if name == HEAD or name.startswith(HEAD + "_Q"):
                facts.head = (8, None)
            else:
                facts.matmul.add((8, 0, 0))
        elif op == "Gather" and node.input and _text(node.input[0]) == "wte.weight_s8":  # qgemm's int8 token table
            facts.table = (8, None)
        elif op == "MatMulNBits":
            facts.scheme = facts.scheme or "MatMulNBits"
            if name == HEAD or name.startswith(HEAD + "_Q"):
                facts.head = (attrs.get("bits"), attrs.get("block_size"))
            else:
                facts.matmul.add((attrs.get("bits"), attrs.get("block_size"), attrs.get("accuracy_level", 0)))
        elif op == "GatherBlockQuantized":
            facts.table = (attrs.get("bits"), attrs.get("block_size"))
        elif op == "GroupQueryAttention":
            facts.attention.append(attrs.get("num_heads"))
            facts.kv_quant.add(attrs.get("k_quant_type", "NONE"))
            facts.kv_quant.add(attrs.get("v_quant_type", "NONE"))
    return facts


def check(folder: str, manifest) -> None:
    """Refuse a manifest that disagrees with the folder's config.json or graph (one line: re-export)."""
    raw = manifest.raw
    _check_config(folder, {**raw["dims"], **{k: raw[k] for k in ("eos_token_id", "bos_token_id") if k in raw}})
    g = read_graph(os.path.join(folder, "model.onnx"))
    d, q = manifest.dims, manifest.quantization if isinstance(manifest.quantization, dict) else {}

    def same(what: str, says: Any, graph: Any) -> None:
        if says != graph:
            raise ArtifactError(f"{folder}/gpt2onnx.json says {what} {show(says, 60)} but model.onnx has {show(graph, 60)}; "
                                "the manifest was edited or belongs to another graph: re-export the folder")

    for key, says, graph in (("inputs", list(manifest.inputs), g.inputs),
                             ("outputs", list(manifest.outputs), g.outputs)):
        i = next((i for i, (a, b) in enumerate(zip(says, graph)) if a != b), min(len(says), len(graph)))
        same(f"io.{key}[{i}]", says[i] if i < len(says) else None, graph[i] if i < len(graph) else None)
    same("precision", manifest.precision, g.precision)
    if manifest.opset is not None:
        same("opset", manifest.opset, g.opset)
    if "scheme" in q or g.scheme:
        same("quantization.scheme", q.get("scheme"), g.scheme)
    for i, key in enumerate(("bits", "block_size", "accuracy_level")):
        if key in q or g.matmul:
            same(f"quantization.{key}", q.get(key), _one(m[i] for m in g.matmul))
    if "lm_head" in q or g.head:
        same("quantization.lm_head", q.get("lm_head"), f"int{g.head[0]}" if g.head else "fp32")
    if "embedding" in q or g.table:
        same("quantization.embedding", q.get("embedding"), f"int{g.table[0]}" if g.table else "fp32")
    if "table_block_size" in q or g.table:
        same("quantization.table_block_size", q.get("table_block_size"), g.table[1] if g.table else None)
    cache = manifest.past_names + manifest.present_names
    same("kv_cache.dtype", manifest.kv_cache.dtype, _one(ELEM_TYPES.get(g.elem_types.get(n), "?") for n in cache))
    same("kv_cache.quant_type", manifest.kv_cache.quant_type or "NONE", _one(g.kv_quant))
    shapes = [s if len(s) == 4 else [None] * 4 for s in (g.shapes.get(n, []) for n in cache)]
    same("dims.n_layer", d.n_layer, len(g.attention))
    same("dims.n_head", d.n_head, _one([*g.attention, *(s[1] for s in shapes)]))
    same("dims.head_dim", d.head_dim, _one(s[3] for s in shapes))
    same("dims.vocab_size", d.vocab_size, (g.shapes.get("logits") or [None])[-1])
    same("dims.n_positions, n_embd", [d.n_positions, d.n_embd], g.initializers.get("wpe.weight"))


def _one(values) -> Any:
    """The value all of `values` share, or their sorted list when they differ (never equal to a manifest value)."""
    distinct = sorted(set(values), key=repr)
    return distinct[0] if len(distinct) == 1 else distinct


def _check_config(folder: str, values: dict) -> None:
    """The manifest's dims and special tokens must be the ones of config.json (which the sha256 table covers)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.__class__.__name__}); the folder is damaged, "
                            "re-export it") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} is not a model config (a JSON object); the folder is damaged, re-export it")
    for key in CONFIG_KEYS:
        if key in config and key in values and config[key] != values[key]:
            raise ArtifactError(f"the manifest of {folder!r} says {key} {values[key]} but config.json says "
                                f"{show(config[key], 60)}; the folder is damaged, re-export it")
