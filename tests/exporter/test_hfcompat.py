"""The model folder as a drop-in for Hugging Face consumers (Optimum's ORTModelForCausalLM).

A tiny GPT-2 with an untied, wide LM head: its greedy continuations vary from token to
token (the shared tiny models mostly repeat their last token), so equal token lists mean
something.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

import gpt2onnx
from gpt2onnx import artifact
from gpt2onnx.eval.gate import GATE
from gpt2onnx.graphio import GraphSpec, log_softmax, open_session
from gpt2onnx.exporter import parity

from helpers.models import TINY, train_tokenizer

PROMPTS = ["The game", "Valkyria Chronicles III is a tactical role", "In 2011 the", "He"]


@pytest.fixture(scope="module")
def vary_src(tmp_path_factory) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = str(tmp_path_factory.mktemp("src") / "vary")
    os.makedirs(folder)
    eos = train_tokenizer(folder)
    config = GPT2Config(**TINY, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vary(vary_src, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("vary")
    folders = {}
    for precision in ("fp32", "int8"):
        folders[precision] = str(out / precision)
        gpt2onnx.export(vary_src, folders[precision], precision=precision, progress=False)
    return folders


@pytest.fixture(scope="module")
def vary_torch(vary_src):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(vary_src).eval()


def _session(folder):
    return open_session(os.path.join(folder, "model.onnx"))


def _empty_past(b: int, session=None) -> dict:
    """Empty past tensors in the graph's own cache type (what Optimum does; int8 for an int8-KV folder)."""
    dtype = np.float32 if session is None else GraphSpec.of(session).cache_dtype
    return {f"past_key_values.{i}.{kv}": np.zeros((b, TINY["n_head"], 0, TINY["n_embd"] // TINY["n_head"]),
                                                   dtype) for i in range(TINY["n_layer"]) for kv in ("key", "value")}


def _optimum(folder):
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.log_severity_level = 3  # onnxruntime warns that logits_to_keep is an overridable initializer
    return ORTModelForCausalLM.from_pretrained(folder, session_options=so)


# -- logits_to_keep: optional, Hugging Face default, still bound to 1 by the runtime ----

def test_logits_to_keep_is_optional_with_the_hugging_face_default(vary):
    s = _session(vary["fp32"])
    assert "logits_to_keep" not in [i.name for i in s.get_inputs()]
    assert [i.name for i in s.get_overridable_initializers()] == ["logits_to_keep"]
    ids = np.array([[5, 17, 300, 42]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None], **_empty_past(1)}
    every, *_ = s.run(None, feeds)
    assert every.shape == (1, 4, 1000)  # not fed: every position, as Hugging Face means 0
    last, *_ = s.run(None, dict(feeds, logits_to_keep=np.array(1, np.int64)))
    assert last.shape == (1, 1, 1000)
    np.testing.assert_allclose(last[0, 0], every[0, -1], atol=1e-5)


def test_io_binding_binds_the_overridable_logits_to_keep_as_an_ortvalue_only(vary):
    """What graph.py claims: bind_cpu_input cannot find an overridable initializer (it looks
    the name up among the required inputs); bind_ortvalue_input binds it, and the value is used."""
    s = _session(vary["fp32"])
    ids = np.array([[5, 17, 300, 42]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None], **_empty_past(1)}

    def run(keep, how):
        io = s.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        if how == "cpu":
            io.bind_cpu_input("logits_to_keep", np.array(keep, np.int64))
        elif how == "ortvalue":
            io.bind_ortvalue_input("logits_to_keep", ort.OrtValue.ortvalue_from_numpy(np.array(keep, np.int64)))
        io.bind_output("logits")
        s.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    with pytest.raises(RuntimeError, match="logits_to_keep"):
        run(1, "cpu")
    assert run(2, "ortvalue").shape == (1, 2, 1000)
    assert run(None, "none").shape == (1, 4, 1000)  # not bound: the default, 0 = all


def test_runtime_still_runs_the_lm_head_on_the_last_position_only(vary):
    from gpt2onnx._engine import Engine

    engine = Engine(vary["fp32"], artifact.read_manifest(vary["fp32"]), threads=1)
    cache = engine.cache(1, 8)
    binding = engine.bind(cache)
    ids = np.array([[5, 17, 300, 42]])
    logits = engine.step(binding, ids, np.array([4]), np.arange(4)[None])
    assert binding.logits.shape == (1, 1, 1000)  # a (B, S, V) output would not fit this buffer
    s = _session(vary["fp32"])
    every, *_ = s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None],
                             **_empty_past(1)})
    np.testing.assert_allclose(logits[0], every[0, -1], atol=1e-5)


# -- the files Hugging Face consumers read --------------------------------------------

def test_folder_has_what_transformers_and_optimum_read(vary):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = vary["int8"]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "gpt2" and config.use_cache and config.n_layer == TINY["n_layer"]
    gen_config = GenerationConfig.from_pretrained(folder)
    eos = artifact.read_manifest(folder).eos_token_id
    assert gen_config.eos_token_id == eos and gen_config.pad_token_id == eos
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["The game", "Valkyria Chronicles III is"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1  # padded on the left
    assert tok("The game")["input_ids"] == gpt2onnx.load(folder).tokenizer.encode("The game").ids
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert name in artifact.verify(folder).files  # hashed like every file of the folder


# -- Optimum: loads the folders as they are, same greedy tokens -----------------------

@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_optimum_greedy_generate_gives_the_runtime_tokens(vary, precision):
    """One prompt at a time. Optimum runs the LM head over every prompt position (our runtime
    over the last only) at batch 1. int8 (qgemm) rows do not depend on the row count, so the
    tokens are equal; a MatMulNBits folder (the gate's fallback) sees other row counts, so a
    token may differ only where the two best logits are within the kernels' rounding."""
    import torch

    folder = vary[precision]
    before = artifact.read_manifest(folder).files
    model = _optimum(folder)
    gen = gpt2onnx.load(folder, threads=1)
    s = _session(folder)
    for prompt in PROMPTS:
        ours = list(gen.generate(prompt, max_new_tokens=12)[0].token_ids)
        ids = torch.tensor([gen.tokenizer.encode(prompt).ids])
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False)[0, ids.shape[1]:].tolist()
        if precision == "fp32" or ours == theirs or artifact.read_manifest(folder).quantization["scheme"] == "qgemm":
            assert ours == theirs, prompt
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)  # first difference: a near tie
        seq = np.array([ids[0].tolist() + ours[:k]])
        n = seq.shape[1]
        logits = s.run(None, {"input_ids": seq, "attention_mask": np.ones_like(seq),
                              "position_ids": np.arange(n)[None], **_empty_past(1)})[0][0, -1]
        assert logits[ours[k]] - logits[theirs[k]] < 0.05, (prompt, k)
    assert artifact.verify(folder).files == before  # loaded unchanged


def test_optimum_left_padded_batch_matches_pytorch_and_the_runtime(vary, vary_src, vary_torch):
    from transformers import AutoTokenizer

    folder = vary["fp32"]
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # really padded
    theirs = _optimum(folder).generate(**batch, max_new_tokens=10, do_sample=False)
    torch_out = vary_torch.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert theirs.tolist() == torch_out.tolist()
    gen = gpt2onnx.load(folder, threads=1)
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        ours = list(gen.generate(prompt, max_new_tokens=10)[0].token_ids)
        assert theirs[row, width:width + len(ours)].tolist() == ours, prompt


# -- a plain Hugging Face-style onnxruntime loop ---------------------------------------

def _hf_loop(session, model, ids, mask, steps=4):
    """Feed only input_ids, attention_mask, position_ids, past_key_values.* (no logits_to_keep),
    present -> past, mask grown by one 1 per step; yield (onnx logits, torch logits, valid)."""
    import torch

    past, pkv = _empty_past(ids.shape[0], session), None
    cur, pos = ids, parity.hf_position_ids(mask)
    for step in range(steps + 1):
        logits, *present = session.run(None, {"input_ids": cur, "attention_mask": mask, "position_ids": pos, **past})
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(cur), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        ref = out.logits.numpy()
        yield logits, ref, mask[:, -cur.shape[1]:].astype(bool)
        past = dict(zip(past, present))
        cur = ref[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(cur)], 1)
        pos = (mask.sum(-1) - 1)[:, None]


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_hugging_face_style_loop_reproduces_pytorch(vary, vary_torch, precision, padding):
    """Left padding is what batched generate feeds; right padding leaves gaps in the mask
    (new tokens after the padding). Both are masked, so every real position matches PyTorch:
    fp32 within the export's parity tolerance, int8 within the fidelity gate's mean KL."""
    ids, mask = parity.prompts(TINY["vocab_size"], TINY["n_positions"], seed=4)
    if padding == "left":
        ids, mask = parity.left_padded(ids, mask)
    s = _session(vary[precision])
    diffs, kls = [], []
    for got, ref, valid in _hf_loop(s, vary_torch, ids, mask):
        assert np.isfinite(got).all()
        diffs.append(np.abs(got - ref)[valid].max())
        lp, lq = log_softmax(ref[valid]), log_softmax(got[valid])
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
    if precision == "fp32":
        assert max(diffs) <= parity.FP32_TOLERANCE
    else:
        assert np.concatenate(kls).mean() <= GATE["mean_kl"]


def test_a_row_with_no_token_is_an_error_not_garbage(vary):
    s = _session(vary["fp32"])
    ids = np.array([[5, 17, 300], [6, 7, 8]])
    mask = np.array([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(Exception, match="seqlens_k"):
        s.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(3), (2, 1)),
                     **_empty_past(2)})


def test_export_records_both_paddings(vary):
    par = artifact.read_manifest(vary["fp32"]).parity
    assert par["paddings"] == "right, left"
    assert max(par["fp32_max_abs_diff_by_padding"].values()) <= parity.FP32_TOLERANCE
    assert json.load(open(os.path.join(vary["fp32"], "config.json")))["use_cache"] is True


def test_optimum_runs_an_int8_kv_folder_and_gives_the_runtime_tokens(vary_src, tmp_path):
    """Optimum makes its empty past in the graph's own cache type, so an int8-KV folder loads and runs as it
    is; a consumer that makes float32 past tensors itself gets onnxruntime's type error (README)."""
    import torch

    folder = str(tmp_path / "kv8")
    gpt2onnx.export(vary_src, folder, kv_cache="int8", progress=False)
    model = _optimum(folder)
    gen = gpt2onnx.load(folder, threads=1)
    for prompt in PROMPTS:
        ours = list(gen.generate(prompt, max_new_tokens=12)[0].token_ids)
        ids = torch.tensor([gen.tokenizer.encode(prompt).ids])
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False)[0, ids.shape[1]:].tolist()
        assert ours == theirs, prompt
    with pytest.raises(Exception, match="tensor\\(float\\).*tensor\\(int8\\)|int8"):
        _session(folder).run(None, {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64),
                                    "position_ids": np.arange(2)[None], **_empty_past(1)})
