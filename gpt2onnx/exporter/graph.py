"""Build the GPT-2 decoder graph (with KV cache) straight from the weights.

Why build the graph by hand instead of tracing PyTorch: the fused onnxruntime ops we
want (GroupQueryAttention with a shared past/present buffer, LayerNormalization,
FastGelu) come out deterministically, with no tracer or pattern-matching optimizer in between; weights are
streamed to the external-data file one tensor at a time, so gpt2-xl exports in a few GB
of RAM; and the I/O names are exactly Hugging Face / Optimum's. onnxruntime-genai's
model builder takes the same approach (it has no GPT-2 builder). The result is checked
against PyTorch after writing (see `parity.py`), so a mistake here cannot ship.

One layer (B = batch, S = new tokens, P = past tokens, T = P + S, E = n_embd)::

    x (B,S,E) ──LayerNorm──MatMul c_attn──Split──q,k,v──GroupQueryAttention──MatMul c_proj──(+)── x'
     │                                              past k,v ─┘   │ present k,v      │
     └────────────────────────────────────────────────────────────┼─────────────────┘
    x' ──LayerNorm──MatMul c_fc──FastGelu(+bias)──MatMul c_proj──(+)── next layer

The head: LayerNorm ln_f, keep the last `logits_to_keep` positions (an optional input,
default 0 = all), then the LM head tied to the token embedding.

The mask: `attention_mask` (B,T) means what it means in transformers (1 = token, 0 =
padding, anywhere in the row); it becomes GroupQueryAttention's per-row cache length and
an additive bias, so left-padded Hugging Face batches and the runtime's per-row lengths
both run right::

    mask  0 0 1 1 1        seqlens_k = 4 (index of the last 1)
    bias  m m 0 0 0        m = -3.4e38: padding gets no attention weight
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17  # LayerNormalization needs 17
MS_OPSET = 1  # com.microsoft contrib ops
EXTERNAL_DATA = "model.onnx.data"
LOGITS_TO_KEEP_DEFAULT = 0  # Hugging Face meaning: logits for every position


@dataclass(frozen=True)
class Dims:
    """The shape of a GPT-2 model, read from its config."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    n_inner: int
    layer_norm_epsilon: float
    activation: str  # "gelu_new" (tanh approximation) or "gelu" (exact)
    attn_scales: tuple[float, ...]  # softmax scale of each layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, config) -> "Dims":
        """Read the dims from a `transformers.GPT2Config` (or anything with its fields)."""
        n_embd, n_head = int(config.n_embd), int(config.n_head)
        head_dim = n_embd // n_head
        scales = []
        for i in range(int(config.n_layer)):
            s = 1.0 / np.sqrt(head_dim) if getattr(config, "scale_attn_weights", True) else 1.0
            if getattr(config, "scale_attn_by_inverse_layer_idx", False):
                s /= float(i + 1)
            scales.append(float(s))
        return cls(
            n_layer=int(config.n_layer),
            n_head=n_head,
            n_embd=n_embd,
            vocab_size=int(config.vocab_size),
            n_positions=int(config.n_positions),
            n_inner=int(config.n_inner or 4 * n_embd),
            layer_norm_epsilon=float(config.layer_norm_epsilon),
            activation=_activation(config.activation_function),
            attn_scales=tuple(scales),
        )

    def to_json(self) -> dict:
        return {
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_inner": self.n_inner,
        }


def _activation(name: str) -> str:
    from ..errors import UnsupportedModelError

    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_new"
    if name == "gelu":
        return "gelu"
    raise UnsupportedModelError(
        f"activation_function {name!r} is not supported; gpt2onnx exports GPT-2 models "
        "with gelu_new (the GPT-2 default) or gelu"
    )


def io_names(n_layer: int) -> dict:
    """The graph's input and output names (Hugging Face / Optimum convention)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return {
        "inputs": ["input_ids", "attention_mask", "position_ids", *past, "logits_to_keep"],
        "outputs": ["logits", *present],
    }


class _WeightFile:
    """Appends weights to the external-data file and returns TensorProtos pointing at them.

    Writing each tensor as it is made keeps peak memory at about one model's weights.
    """

    ALIGN = 64  # keep every tensor 64-byte aligned so onnxruntime can use it in place

    def __init__(self, folder: str):
        self.path = os.path.join(folder, EXTERNAL_DATA)
        self.f = open(self.path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % self.ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        data = array.tobytes()
        self.f.write(data)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", EXTERNAL_DATA), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.offset += len(data)
        return t

    def close(self) -> None:
        self.f.close()


def build(weights, dims: Dims, folder: str, *, untied_lm_head: bool = False) -> str:
    """Write `model.onnx` (+ `model.onnx.data`) for GPT-2 `weights` into `folder`.

    Args:
        weights: mapping of Hugging Face GPT-2 parameter names (without the
            ``transformer.`` prefix) to float32 numpy arrays; read once each, in order.
        dims: the model's shape.
        folder: an existing, empty folder.
        untied_lm_head: write the LM head as its own (E, V) MatMul weight instead of
            sharing the embedding through a transposed Gemm. The int8 recipe needs this:
            onnxruntime's weight quantizer handles MatMul, not Gemm with transB.

    Returns:
        The path of the written model.onnx.
    """
    wf = _WeightFile(folder)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def w(name: str, array) -> str:
        inits.append(wf.add(name, np.asarray(array, dtype=np.float32)))
        return name

    def node(op, inputs, outputs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    consts: set[str] = set()

    def const(name: str, values, dtype=np.int64) -> str:
        if name not in consts:  # the same small constant may serve several nodes
            consts.add(name)
            inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    try:
        E, H, D = dims.n_embd, dims.n_head, dims.head_dim
        eps = dims.layer_norm_epsilon
        # Embeddings: token + position. (B,S) -> (B,S,E)
        wte = w("wte.weight", weights["wte.weight"])  # (V,E)
        wpe = w("wpe.weight", weights["wpe.weight"])  # (n_positions,E)
        tok = node("Gather", [wte, "input_ids"], ["tok_emb"], "embed_tokens")
        pos = node("Gather", [wpe, "position_ids"], ["pos_emb"], "embed_positions")
        x = node("Add", [tok, pos], ["h.0.in"], "embed_add")
        # GroupQueryAttention takes each row's cache length and an additive bias, not the
        # mask itself. Both come from the Hugging Face mask (B,T), 1 = attend, 0 = padding:
        #   seqlens_k (B,) = index of the row's last 1: where its new tokens end in the cache
        #   attention_bias (B,1,S,T) = 0 where the mask is 1, -3.4e38 where it is 0
        # so left padding (Hugging Face batched generate) and gaps are masked; the runtime's
        # masks (the first `length` positions of each row set) give seqlens_k = length - 1.
        mask_shape = node("Shape", ["attention_mask"], ["mask_shape"], "mask_shape")
        total = node("Gather", [mask_shape, const("one_idx", 1)], ["total_len_i64"], "total_len", axis=0)  # T
        upto = node("Add", [total, const("one", 1)], ["total_plus_one"], "total_plus_one")
        ranks = node("Range", [const("one_r", 1), upto, const("step_r", 1)], ["mask_ranks"], "mask_ranks")  # 1..T
        last = node("ReduceMax", [node("Mul", ["attention_mask", ranks], ["mask_ranked"], "mask_ranked")],
                    ["mask_last"], "mask_last", axes=[1], keepdims=0)  # (B,) 1-based index of the last 1
        lens = node("Sub", [last, const("one", 1)], ["seqlens_k_i64"], "seqlens_sub")
        seqlens = node("Cast", [lens], ["seqlens_k"], "seqlens_cast", to=TensorProto.INT32)
        total = node("Cast", [total], ["total_sequence_length"], "total_cast", to=TensorProto.INT32)
        keep = node("Cast", ["attention_mask"], ["mask_bool"], "mask_bool", to=TensorProto.BOOL)
        bias = node("Where", [keep, const("bias_keep", 0.0, np.float32),
                              const("bias_mask", np.finfo(np.float32).min, np.float32)], ["mask_bias"], "mask_bias")
        bias = node("Unsqueeze", [bias, const("axes12", [1, 2])], ["mask_bias_4d"], "mask_bias_4d")  # (B,1,1,T)
        ids_shape = node("Shape", ["input_ids"], ["ids_shape"], "ids_shape")
        new_len = node("Slice", [ids_shape, const("s1", [1]), const("s2", [2])], ["new_len"], "new_len")  # [S]
        expand_to = node("Concat", [const("ones2", [1, 1]), new_len, const("ones1", [1])], ["bias_shape"],
                         "bias_shape", axis=0)
        bias = node("Expand", [bias, expand_to], ["attention_bias"], "attention_bias")  # (B,1,S,T)

        for i in range(dims.n_layer):
            p = f"h.{i}."
            ln1 = node(
                "LayerNormalization",
                [x, w(p + "ln_1.weight", weights[p + "ln_1.weight"]), w(p + "ln_1.bias", weights[p + "ln_1.bias"])],
                [p + "ln_1"], p + "ln_1", axis=-1, epsilon=eps,
            )
            qkv = node("MatMul", [ln1, w(p + "attn.c_attn.weight", weights[p + "attn.c_attn.weight"])],
                       [p + "qkv_mm"], p + "qkv_matmul")
            qkv = node("Add", [qkv, w(p + "attn.c_attn.bias", weights[p + "attn.c_attn.bias"])], [p + "qkv"],
                       p + "qkv_bias")  # (B,S,3E) packed q|k|v
            attn, _, _ = node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                 "", "", "", bias],
                [p + "attn", f"present.{i}.key", f"present.{i}.value"],  # present: (B,H,T,D)
                p + "attn", domain="com.microsoft",
                num_heads=H, kv_num_heads=H, scale=dims.attn_scales[i],
            )
            o = node("MatMul", [attn, w(p + "attn.c_proj.weight", weights[p + "attn.c_proj.weight"])],
                     [p + "attn_proj"], p + "attn_proj")
            o = node("Add", [o, w(p + "attn.c_proj.bias", weights[p + "attn.c_proj.bias"])], [p + "attn_out"],
                     p + "attn_bias")
            x = node("Add", [x, o], [p + "res1"], p + "res1")
            ln2 = node(
                "LayerNormalization",
                [x, w(p + "ln_2.weight", weights[p + "ln_2.weight"]), w(p + "ln_2.bias", weights[p + "ln_2.bias"])],
                [p + "ln_2"], p + "ln_2", axis=-1, epsilon=eps,
            )
            f = node("MatMul", [ln2, w(p + "mlp.c_fc.weight", weights[p + "mlp.c_fc.weight"])], [p + "fc"],
                     p + "fc")
            gelu_op = "FastGelu" if dims.activation == "gelu_new" else "BiasGelu"
            f = node(gelu_op, [f, w(p + "mlp.c_fc.bias", weights[p + "mlp.c_fc.bias"])], [p + "gelu"], p + "gelu",
                     domain="com.microsoft")
            f = node("MatMul", [f, w(p + "mlp.c_proj.weight", weights[p + "mlp.c_proj.weight"])],
                     [p + "mlp_proj"], p + "mlp_proj")
            f = node("Add", [f, w(p + "mlp.c_proj.bias", weights[p + "mlp.c_proj.bias"])], [p + "mlp_out"],
                     p + "mlp_bias")
            x = node("Add", [x, f], [f"h.{i + 1}.in"], p + "res2")

        x = node("LayerNormalization", [x, w("ln_f.weight", weights["ln_f.weight"]),
                                        w("ln_f.bias", weights["ln_f.bias"])], ["ln_f"], "ln_f", axis=-1, epsilon=eps)
        # Keep the last `logits_to_keep` positions: x[:, -k:, :]; k = 0 keeps all (-0 == 0).
        neg_k = node("Neg", ["logits_to_keep"], ["neg_keep"], "neg_keep")
        starts = node("Unsqueeze", [neg_k, const("axis0", [0])], ["keep_start"], "keep_start")
        x = node("Slice", [x, starts, const("keep_end", [np.iinfo(np.int64).max]), const("keep_axis", [1])],
                 ["ln_f_kept"], "keep_last")  # (B,K,E)
        if untied_lm_head:
            lm = w("lm_head.weight_t", np.ascontiguousarray(np.asarray(weights["lm_head.weight"]).T))  # (E,V)
            node("MatMul", [x, lm], ["logits"], "lm_head")
        else:
            # Gemm is 2-D: (B,K,E) -> (B*K,E) @ wte^T -> (B,K,V). Shares the embedding table.
            head = weights["lm_head.weight"]
            tied = np.shares_memory(head, weights["wte.weight"]) or np.array_equal(head, weights["wte.weight"])
            head = wte if tied else w("lm_head.weight", head)  # (V,E)
            flat = node("Reshape", [x, const("flat_shape", [-1, E])], ["ln_f_flat"], "lm_flatten")
            lg = node("Gemm", [flat, head], ["logits_flat"], "lm_head", transB=1)
            bk = node("Slice", [node("Shape", [x], ["x_shape"], "x_shape"), const("s0", [0]), const("s2", [2])],
                      ["bk"], "bk")
            shape = node("Concat", [bk, const("vocab", [dims.vocab_size])], ["logits_shape"], "logits_shape", axis=0)
            node("Reshape", [lg, shape], ["logits"], "lm_unflatten")
    finally:
        wf.close()

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
    ]
    # (B,S,V) with the default logits_to_keep 0; (B,min(k,S),V) when a caller feeds k. Named
    # "sequence_length" because Optimum sizes its IO-binding buffers from these names.
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", dims.vocab_size])]
    for i in range(dims.n_layer):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", f32, ["batch_size", H, "past_sequence_length", D]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", f32, ["batch_size", H, "total_sequence_length", D]))
    # How many final positions get logits: 1 in generation (the LM head is a third of the
    # model; computing it for every prompt position is wasted), 0 = all (evaluation).
    # An optional input: a graph input with an initializer of the same name is a default
    # that a feed overrides. The default 0 keeps Hugging Face's meaning (logits for every
    # position), so consumers that never feed it (Optimum's ORTModelForCausalLM,
    # transformers.js) work. IO binding can bind it with `bind_ortvalue_input` (not
    # `bind_cpu_input`, which looks the name up among the required inputs only; see
    # tests/exporter/test_hfcompat.py).
    inputs.append(helper.make_tensor_value_info("logits_to_keep", i64, []))
    inits.append(onnx.numpy_helper.from_array(np.array(LOGITS_TO_KEEP_DEFAULT, np.int64), "logits_to_keep"))

    graph = helper.make_graph(nodes, "gpt2", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)],
        producer_name="gpt2onnx",
    )
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(model, path)
    return path
