"""Batch jobs: order, error rows, resuming (torn last line, rows done in any order, Ctrl-C), refusals.

SIGKILL at exact moments and at random points, and a full disk: tests/batch/test_job_crashes.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

import gpt2onnx
from gpt2onnx import cli
from gpt2onnx.batch import BatchError, BatchSummary, run_batch
from gpt2onnx.batch.rows import NO_PROMPT
from gpt2onnx.errors import ArtifactError

from helpers.damaged_folders import SURFACE_CASES
from helpers.procs import ctrl_c_after

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


def make_input(path, n: int, seed: int = 0) -> None:
    """n greedy prompts of varied length and max_new_tokens; every 7th line without an id."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 25))),
                   "max_new_tokens": rng.randint(3, 20)}
            if i % 7:
                row["id"] = f"r{i}"
            f.write(json.dumps(row) + "\n")


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def job(tmp_path_factory, gen):
    """A 150-row input and its uninterrupted output (the reference every resume must reproduce)."""
    d = tmp_path_factory.mktemp("job")
    make_input(d / "in.jsonl", 150)
    summary = run_batch(gen, d / "in.jsonl", d / "ref.jsonl", batch_size=4, progress=False)
    assert summary == BatchSummary(rows=150, ok=150, errors=0, skipped_already_done=0,
                                   tokens=summary.tokens, seconds=summary.seconds,
                                   prefix_cache_hits=summary.prefix_cache_hits,
                                   prefix_cache_misses=summary.prefix_cache_misses,
                                   prefix_cache_saved_tokens=summary.prefix_cache_saved_tokens)
    return d, read_rows(d / "ref.jsonl")


MIXED = [
    '\ufeff{"id": "a", "prompt": "the sky is", "max_new_tokens": 5}',  # BOM on line 1
    "",  # blank lines make no row
    '{"prompt": "he was", "max_new_tokens": 4, "top_k": 3}\r',  # CRLF, no id
    "not json",
    "[1, 2]",
    '{"id": 7, "max_new_tokens": 3}',
    '{"id": "n", "prompt": 42}',
    '{"id": "p", "prompt": "x", "top_p": 2}',
    '{"id": "u", "prompt": "x", "tpo_p": 0.5}',
    '{"id": "long", "prompt": "' + "the " * 80 + '", "max_new_tokens": 5}',
    "   ",
    '{"input_data": ["of the", "", "and"], "params": {"max_new_tokens": 6}}',
    '{"id": "q", "input_data": ["in a", 3], "params": {"max_new_tokens": 2}}',
    '{"input_data": [], "params": {}}',
    '{"id": "bad", "input_data": ["a"], "params": {"temperature": -1}}',
    '{"id": "cut", "prompt": "trunc',  # torn last line: no newline, not JSON
]


def test_mixed_input_rows_in_order_with_error_rows(tmp_path, gen):
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(MIXED)).encode("utf-8"))
    s = run_batch(gen, src, tmp_path / "out.jsonl", batch_size=3, params={"max_new_tokens": 8}, progress=False)
    rows = read_rows(tmp_path / "out.jsonl")
    got = [(r["id"], r["line"], r["index"], "error" in r) for r in rows]
    assert got == [
        ("a", 1, 0, False), ("line-3", 3, 0, False), ("line-4", 4, 0, True), ("line-5", 5, 0, True),
        (7, 6, 0, True), ("n", 7, 0, True), ("p", 8, 0, True), ("u", 9, 0, True), ("long", 10, 0, True),
        ("12:0", 12, 0, False), ("12:1", 12, 1, False), ("12:2", 12, 2, False),
        ("q:0", 13, 0, False), ("q:1", 13, 1, True), ("line-14", 14, 0, True), ("bad:0", 15, 0, True),
        ("line-16", 16, 0, True),
    ]
    assert (s.rows, s.ok, s.errors, s.skipped_already_done) == (17, 6, 11, 0)
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert "not valid JSON" in errors["line-4"] and "incomplete line" in errors["line-16"]
    assert "JSON object" in errors["line-5"]
    assert errors[7] == NO_PROMPT  # the wording of every path (Ray, Azure ML batch)
    assert "prompt must be a string" in errors["n"] and "prompt must be a string" in errors["q:1"]
    assert "top_p must be in (0, 1]" in errors["p"]
    assert "did you mean 'top_p'" in errors["u"]
    assert "exceeds the context of 64 tokens" in errors["long"]
    assert "non-empty list" in errors["line-14"]
    assert "temperature" in errors["bad:0"]
    assert all("\n" not in e and len(e) <= 400 for e in errors.values())
    # ok rows carry the fields and the same text as a direct call with the row's params
    ok = {r["id"]: r for r in rows if "error" not in r}
    direct = {
        "a": gen.generate("the sky is", max_new_tokens=5)[0],
        "line-3": gen.generate("he was", max_new_tokens=4, top_k=3)[0],
        "12:0": gen.generate("of the", max_new_tokens=6)[0],
        "12:1": gen.generate("", max_new_tokens=6)[0],
        "q:0": gen.generate("in a", max_new_tokens=2)[0],
    }
    for rid, res in direct.items():
        r = ok[rid]
        assert (r["text"], r["prompt_tokens"], r["generated_tokens"], r["finish_reason"]) == (
            res.text, res.prompt_tokens, res.generated_tokens, res.finish_reason)
        assert r["seconds"] >= 0
    assert ok["a"]["generated_tokens"] == 5 and ok["a"]["text"].startswith("the sky is")


def test_job_params_are_defaults_and_rows_override_them(tmp_path, gen):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": "a", "max_new_tokens": 2, "return_full_text": false}\n')
    run_batch(gen, src, tmp_path / "out.jsonl", params=gpt2onnx.GenerationParams(max_new_tokens=4, ignore_eos=True),
              progress=False)
    a, b = read_rows(tmp_path / "out.jsonl")
    assert (a["generated_tokens"], b["generated_tokens"]) == (4, 2)
    assert a["text"].startswith("a") and b["text"] == gen.generate("a", max_new_tokens=2, ignore_eos=True,
                                                                   return_full_text=False)[0].text


def test_grouping_by_length_reduces_padding_and_keeps_order(tmp_path, gen, monkeypatch):
    """Static batching groups prompts of similar length (continuous batching prefills each alone)."""
    make_input(tmp_path / "in.jsonl", 96, seed=3)
    lengths, real = [], gen.generate_batch

    def spy(requests, **kw):
        toks = [len(r.input_ids) for r in requests]  # prepared Requests: the batch job tokenizes each prompt once
        lengths.append(toks)
        return real(requests, **kw)

    monkeypatch.setattr(gen, "generate_batch", spy)
    run_batch(gen, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=8, progress=False, batching="static")
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["line"] for r in rows] == list(range(1, 97))
    padding = sum(max(b) * len(b) - sum(b) for b in lengths)
    order = [len(gen.tokenizer.encode(r["prompt"]).ids) or 1 for r in read_rows(tmp_path / "in.jsonl")]
    naive = sum(max(c) * len(c) - sum(c) for c in (order[i:i + 8] for i in range(0, 96, 8)))
    assert padding < naive / 2
    assert max(len(b) for b in lengths) == 8


def test_rerun_of_a_finished_job_does_nothing(job, gen):
    d, ref = job
    before = (d / "ref.jsonl").read_bytes()
    s = run_batch(gen, d / "in.jsonl", d / "ref.jsonl", batch_size=4, progress=False)
    assert (s.rows, s.ok, s.errors, s.skipped_already_done, s.tokens) == (150, 0, 0, 150, 0)
    assert (d / "ref.jsonl").read_bytes() == before


@pytest.mark.parametrize("keep", [0, 1, 37, 149])
def test_resume_after_torn_last_line(job, gen, tmp_path, keep):
    d, ref = job
    lines = (d / "ref.jsonl").read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])  # killed mid-write
    (tmp_path / "out.jsonl.state").write_bytes((d / "ref.jsonl.state").read_bytes())
    s = run_batch(gen, d / "in.jsonl", out, batch_size=4, progress=False)
    assert s.skipped_already_done == keep and s.ok == 150 - keep
    assert without_timing(read_rows(out)) == without_timing(ref)


def test_out_of_order_rows_are_never_duplicated(job, gen, tmp_path):
    d, ref = job
    done = random.Random(1).sample(ref, 60)  # as if rows had completed in any order
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in done))
    (tmp_path / "out.jsonl.state").write_bytes((d / "ref.jsonl.state").read_bytes())
    s = run_batch(gen, d / "in.jsonl", out, batch_size=4, progress=False)
    assert s.skipped_already_done == 60 and s.ok == 90
    rows = read_rows(out)
    assert sorted((r["line"], r["index"]) for r in rows) == [(r["line"], r["index"]) for r in ref]
    by_key = {(r["line"], r["index"]): r for r in without_timing(rows)}
    assert [by_key[(r["line"], r["index"])] for r in without_timing(ref)] == without_timing(ref)


def test_interrupted_in_process_then_resumed(job, gen, tmp_path, monkeypatch):
    d, ref = job
    ctrl_c_after(gen, monkeypatch, 20)  # Ctrl-C after 20 rows have finished
    with pytest.raises(KeyboardInterrupt):
        run_batch(gen, d / "in.jsonl", tmp_path / "out.jsonl", batch_size=4, progress=False)
    partial = read_rows(tmp_path / "out.jsonl")
    assert 4 <= len(partial) < 150 and without_timing(partial) == without_timing(ref[: len(partial)])
    monkeypatch.undo()  # the real generate_iterable again
    s = run_batch(gen, d / "in.jsonl", tmp_path / "out.jsonl", batch_size=4, progress=False)
    assert s.skipped_already_done == len(partial)
    assert without_timing(read_rows(tmp_path / "out.jsonl")) == without_timing(ref)


def test_refuses_output_of_another_job(job, gen, tmp_path):
    d, _ = job
    out = tmp_path / "out.jsonl"
    other = tmp_path / "other.jsonl"
    make_input(other, 10, seed=9)
    (tmp_path / "out.jsonl").write_bytes((d / "ref.jsonl").read_bytes()[:500])
    (tmp_path / "out.jsonl.state").write_bytes((d / "ref.jsonl.state").read_bytes())
    before = out.read_bytes()
    with pytest.raises(BatchError, match="different input file"):
        run_batch(gen, other, out, progress=False)
    with pytest.raises(BatchError, match="different generation parameters"):
        run_batch(gen, d / "in.jsonl", out, params={"top_k": 3}, progress=False)
    os.remove(tmp_path / "out.jsonl.state")
    with pytest.raises(BatchError, match="not written by 'gpt2onnx batch'"):
        run_batch(gen, d / "in.jsonl", out, progress=False)
    assert out.read_bytes() == before


def test_damaged_output_in_the_middle_is_refused(job, gen, tmp_path):
    d, _ = job
    lines = (d / "ref.jsonl").read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines[0] + b"garbage\n" + lines[1])
    (tmp_path / "out.jsonl.state").write_bytes((d / "ref.jsonl.state").read_bytes())
    with pytest.raises(BatchError, match="damaged at line 2"):
        run_batch(gen, d / "in.jsonl", out, progress=False)


def test_missing_input_fails_before_the_model_is_loaded(tmp_path):
    with pytest.raises(BatchError, match="does not exist"):
        run_batch(str(tmp_path / "no-model"), tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_unwritable_output_is_one_clear_error(job, gen, tmp_path):
    d, _ = job
    with pytest.raises(BatchError, match="check the output folder exists"):
        run_batch(gen, d / "in.jsonl", tmp_path / "no" / "such" / "out.jsonl", progress=False)


@pytest.mark.parametrize("name", SURFACE_CASES)
def test_run_batch_refuses_before_writing_rows(damaged, probed, tmp_path, name):
    """A damaged model folder (tests/helpers/damaged_folders.py) is refused with load's line before OUTPUT or its .state
    is created (it left an empty output and a .state behind)."""
    assert probed[name]["load"][0] == "ArtifactError"  # safe in process: the subprocess survived it
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n')
    with pytest.raises(ArtifactError, match=re.escape(probed[name]["load"][1][:40])):
        run_batch(damaged[name], src, tmp_path / "out.jsonl", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    with pytest.raises(ArtifactError, match=re.escape(probed[name]["load"][1][:40])):  # workers verify it first
        run_batch(damaged[name], src, tmp_path / "out.jsonl", progress=False, workers=2, threads=1)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_bad_arguments(job, gen, tmp_path):
    d, _ = job
    with pytest.raises(gpt2onnx.InvalidRequestError, match="batch_size"):
        run_batch(gen, d / "in.jsonl", tmp_path / "o.jsonl", batch_size=0)
    with pytest.raises(gpt2onnx.InvalidRequestError, match="top_p"):
        run_batch(gen, d / "in.jsonl", tmp_path / "o.jsonl", params={"top_p": 3})
    with pytest.raises(BatchError, match="is the input"):
        run_batch(gen, d / "in.jsonl", d / "in.jsonl")


def test_progress_bar_on_stderr(tmp_path, gen, capsys):
    make_input(tmp_path / "in.jsonl", 10)
    run_batch(gen, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and "tok/s" in err
    run_batch(gen, tmp_path / "in.jsonl", tmp_path / "out2.jsonl")  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_cli(tmp_path, tiny_int8, capsys):
    make_input(tmp_path / "in.jsonl", 12)
    rc = cli.main(["batch", tiny_int8, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--batch-size", "5",
                "--max-new-tokens", "3", "--ignore-eos", "--params", '{"top_k": 5}', "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0 and "12 ok, 0 errors" in out.out
    rows = read_rows(tmp_path / "out.jsonl")
    assert len(rows) == 12
    state = json.loads((tmp_path / "out.jsonl.state").read_text())
    assert state["params"]["top_k"] == 5 and state["params"]["ignore_eos"] is True
    rc = cli.main(["batch", tiny_int8, str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "nope.jsonl' does not exist" in err
    rc = cli.main(["batch", tiny_int8, str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), "--params", "{"])
    assert rc == 1 and "--params is not valid JSON" in capsys.readouterr().err


def test_cli_progress_in_a_log_is_plain_lines(tiny_int8, tmp_path):
    """Under nohup / CI (stderr not a terminal) the job reports progress as whole lines, no \\r redraws."""
    make_input(tmp_path / "in.jsonl", 12, seed=2)
    r = subprocess.run([sys.executable, "-m", "gpt2onnx", "batch", tiny_int8, str(tmp_path / "in.jsonl"),
                        str(tmp_path / "out.jsonl"), "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    assert any(line.startswith("gpt2onnx batch: 12/12 rows (100%)") for line in r.stderr.splitlines()), r.stderr


def test_sampled_rows_get_their_own_seeds_from_the_job_seed(gen, tmp_path):
    """vLLM-style per-row seeds: a row without a seed of its own gets one from the job seed and its place in the
    input (the same prompt on two lines gives two texts), a row's own seed wins, the job seed is recorded and
    another one is refused on the same output."""
    from gpt2onnx.batch.rows import row_seed

    prompt = "the cat sat on the"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": prompt}, {"id": "b", "prompt": prompt}, {"id": "own", "prompt": prompt, "seed": 11},
        {"input_data": [prompt, prompt], "params": {"max_new_tokens": 6}}]))
    params = {"do_sample": True, "max_new_tokens": 12, "ignore_eos": True, "seed": 5}
    run_batch(gen, src, tmp_path / "out.jsonl", params=params, progress=False)
    rows = {r["id"]: r["text"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    one = lambda seed, **kw: gen.generate(prompt, **{**params, **kw, "seed": seed})[0].text  # noqa: E731
    assert rows["a"] == one(row_seed(5, 1, 0)) and rows["b"] == one(row_seed(5, 2, 0)) and rows["a"] != rows["b"]
    assert rows["own"] == one(11)
    assert rows["4:1"] == one(row_seed(5, 4, 1), max_new_tokens=6) != rows["4:0"]
    assert json.loads((tmp_path / "out.jsonl.state").read_text())["seed"] == 5
    with pytest.raises(BatchError, match="different generation parameters"):
        run_batch(gen, src, tmp_path / "out.jsonl", params={**params, "seed": 6}, progress=False)
    run_batch(gen, src, tmp_path / "again.jsonl", params={**params, "seed": 6}, progress=False)
    assert (tmp_path / "again.jsonl").read_text().count(rows["a"]) == 0  # another job seed, other texts
