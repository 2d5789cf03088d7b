"""gpt2onnx.eval: WikiText-2 perplexity, LAMBADA scoring, data-file errors, the training recipe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2onnx.eval import fidelity
from gpt2onnx.errors import Gpt2OnnxError, InvalidRequestError
from gpt2onnx.eval import DataError, evaluate, lambada, read_lambada, read_text, wikitext2_text

from helpers.paths import WIKI_SLICE



@pytest.fixture(scope="module")
def wiki_small(tmp_path_factory) -> str:
    """The first ~12 KB of the WikiText-2 slice (whole lines), as a raw file."""
    with open(WIKI_SLICE, encoding="utf-8") as f:
        raw = f.read()
    cut = raw.index("\n", 12000) + 1
    path = tmp_path_factory.mktemp("wiki") / "wiki.test.raw"
    path.write_text(raw[:cut], encoding="utf-8")
    return str(path)


def _hf_guide_ppl(model, ids, max_length: int, stride: int) -> tuple[float, float]:
    """The Hugging Face perplexity guide's loop, verbatim in substance: (its ppl, per-token ppl)."""
    import torch

    encodings = torch.as_tensor(ids)[None]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    exact_nll, exact_n = 0.0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        nll_sum += float(outputs.loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        scored = int((target_ids[:, 1:] != -100).sum())  # what the loss really averaged
        exact_nll += float(outputs.loss) * scored
        exact_n += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), math.exp(exact_nll / exact_n)


def test_wikitext2_equals_pytorch_sliding_window(tiny_fp32, tiny_torch, wiki_small):
    r = evaluate(tiny_fp32, "wikitext2", data=wiki_small, progress=False, threads=1)
    import gpt2onnx

    tok = gpt2onnx.load(tiny_fp32, threads=1).tokenizer
    with open(wiki_small, encoding="utf-8") as f:
        ids = tok.encode(wikitext2_text(f.read())).ids
    n_pos = tiny_torch.config.n_positions
    assert (r["max_length"], r["stride"]) == (n_pos, n_pos // 2)
    ref_ppl, ref_exact = _hf_guide_ppl(tiny_torch, ids, n_pos, n_pos // 2)
    assert r["ppl"] == pytest.approx(ref_ppl, rel=1e-4)
    assert r["ppl_exact"] == pytest.approx(ref_exact, rel=1e-4)
    assert r["tokens_total"] == len(ids) and r["tokens_scored"] == len(ids) - 1  # every token but the first
    assert r["bytes_scored"] == len(wikitext2_text(open(wiki_small, encoding="utf-8").read()).encode()) - \
        len(tok.id_to_token(ids[0]))
    assert r["bits_per_byte"] == pytest.approx(r["nll_per_token"] * r["tokens_scored"] / math.log(2)
                                               / r["bytes_scored"])
    assert r["data_is_original"] is False  # named wiki.test.raw, but not the original file


def test_wikitext2_limit_takes_first_windows(tiny_fp32, wiki_small):
    r = evaluate(tiny_fp32, "wikitext2", data=wiki_small, limit=3, progress=False, threads=1)
    assert r["windows"] == 3 and r["tokens_scored"] == 63 + 32 + 32


def test_windows_follow_the_guide():
    ws = list(fidelity.windows(10, 4, 2))
    assert [(w.begin, w.end, w.trg_len, w.n_scored) for w in ws] == \
        [(0, 4, 4, 3), (2, 6, 2, 2), (4, 8, 2, 2), (6, 10, 2, 2)]
    # stride == max_length: disjoint windows, each loses its first token
    assert [w.n_scored for w in fidelity.windows(10, 4, 4)] == [3, 3, 1]
    with pytest.raises(ValueError):
        list(fidelity.windows(10, 4, 5))


def test_hf_text_rebuilds_dataset_rows():
    raw = " \n = Title = \n \n First line .\n Second line .\n \n"
    rows = ["", " = Title = \n", "", " First line .\n", " Second line .\n", ""]
    assert wikitext2_text(raw) == "\n\n".join(rows)


# -- LAMBADA --------------------------------------------------------------------------

class _CharTokenizer:
    """One token per character (printable ASCII)."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=True):
        return self._Enc([ord(c) - 32 for c in text])


class _ScriptSession:
    """A fake model that always expects one fixed text: at position p it gives the
    script's token p+1 probability 0.9 (the rest uniform)."""

    V = 96

    def __init__(self, script: str):
        self.script = [ord(c) - 32 for c in script]

    def get_inputs(self):
        fake = fidelity.TorchSession._Input
        return [fake("input_ids", ()), fake("past_key_values.0.key", ("b", 1, "p", 1)),
                fake("past_key_values.0.value", ("b", 1, "p", 1)), fake("logits_to_keep", ())]

    def run(self, names, feeds):
        s = feeds["input_ids"].shape[1]
        logits = np.full((1, s, self.V), math.log(0.1 / (self.V - 1)), np.float32)
        for p in range(s):
            if p + 1 < len(self.script):
                logits[0, p, self.script[p + 1]] = math.log(0.9)
        keep = int(feeds["logits_to_keep"])
        return [logits[:, -keep:] if keep else logits]


def test_lambada_whole_word_greedy_and_perplexities():
    script = "the cat sat on the mat"
    texts = [script, "the cat sat on the hat", "the cat sat on the max"]
    r = lambada(_ScriptSession(script), _CharTokenizer(), texts, n_positions=64, bos_token_id=95)
    assert r["correct"] == 1 and r["accuracy"] == pytest.approx(1 / 3)  # "max": 3 of 4 tokens right is wrong
    assert r["target_tokens"] == 12 and r["truncated"] == 0
    hit, miss = -math.log(0.9), -math.log(0.1 / 95)
    total = 4 * hit + (3 * hit + miss) + (3 * hit + miss)
    assert r["ppl_word"] == pytest.approx(math.exp(total / 3), rel=1e-5)
    assert r["ppl_token"] == pytest.approx(math.exp(total / 12), rel=1e-5)


def test_lambada_truncates_long_contexts_from_the_left():
    r = lambada(_ScriptSession("x"), _CharTokenizer(), ["a b c d e f g h i j k l m n o p word"], n_positions=12,
                bos_token_id=95)
    assert r["truncated"] == 1 and r["passages"] == 1


def test_lambada_task_on_the_tiny_model(tiny_fp32, tmp_path):
    path = tmp_path / "lambada_test.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in
                              ["The team won the game and the fans cheered the team", "He said hello to his mother"]),
                    encoding="utf-8")
    r = evaluate(tiny_fp32, "lambada", data=str(path), progress=False, threads=1)
    assert r["passages"] == 2 and 0 <= r["accuracy"] <= 1 and r["ppl_word"] > 1 and r["ppl_token"] > 1


# -- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\xff\xfe caf\xe9\n", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(str(path))


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not JSON"),
    ('{"txt": "a b"}', "line 2 has no \"text\""),
    ('["a b"]', "line 2 has no \"text\""),
    ('{"text": "single"}', "no space-separated last word"),
])
def test_bad_lambada_lines(tmp_path, line, message):
    path = tmp_path / "lambada_test.jsonl"
    path.write_text('{"text": "a fine passage"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_lambada(str(path))


def test_evaluate_errors(tiny_fp32, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        evaluate(tiny_fp32, "wikitext2", data=str(tmp_path / "missing.raw"), progress=False)
    with pytest.raises(InvalidRequestError, match="unknown task"):
        evaluate(tiny_fp32, "hellaswag", progress=False)
    with pytest.raises(InvalidRequestError, match="limit"):
        evaluate(tiny_fp32, "wikitext2", limit=0, progress=False)
    assert issubclass(DataError, Gpt2OnnxError)


def test_missing_default_data_says_where_to_get_it(tiny_fp32, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2ONNX_DATA", str(tmp_path))
    monkeypatch.setattr("gpt2onnx.eval.data.candidates", lambda name: [str(tmp_path / name)])
    with pytest.raises(DataError, match="lambada_test.jsonl not found.*openaipublic"):
        evaluate(tiny_fp32, "lambada", progress=False)


def test_cli_parser_prints_json(tiny_fp32, wiki_small, capsys):
    from gpt2onnx.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", tiny_fp32, "--task", "wikitext2", "--data", wiki_small, "--limit", "2",
                              "--json", "--threads", "1"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "wikitext2" and out["windows"] == 2


def test_wikitext2_and_lambada_do_not_import_torch(tiny_fp32, wiki_small, tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "one two three"}\n', encoding="utf-8")
    code = ("import sys; from gpt2onnx.eval import evaluate; "
            f"evaluate({tiny_fp32!r}, 'wikitext2', data={wiki_small!r}, limit=2, progress=False, threads=1); "
            f"evaluate({tiny_fp32!r}, 'lambada', data={str(path)!r}, progress=False, threads=1); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the training recipe (export/train_small.py), at toy size -------------------------

def test_train_small_recipe_runs_and_learns(tmp_path):
    import train_small as ts  # export/ is on pytest's path (pyproject.toml)

    recipe = ts.Recipe(n_layer=1, n_head=2, n_embd=32, context=32, batch_size=4, lr=3e-3, max_steps=40)
    out = tmp_path / "small"
    r = ts.train(str(out), WIKI_SLICE, recipe, log=lambda s: None)
    assert r["steps"] == 40
    assert np.mean(r["losses"][-10:]) < np.mean(r["losses"][:5]) - 0.5  # it learns
    assert math.isfinite(r["heldout_ppl"])
    assert {"config.json", "tokenizer.json", "heldout.raw", "train_info.json"} <= set(os.listdir(out))
    from transformers import GPT2LMHeadModel

    assert GPT2LMHeadModel.from_pretrained(str(out)).config.n_positions == 32
