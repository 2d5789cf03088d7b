"""Bad input through a batch job: the request table as rows, JSONL quirks, a 1 MB prompt, random lines.

The table of requests is tests/helpers/bad_requests.py. A bad request is an error row
{"id", "line", "index", "error"} with one line, and the job goes on; a good one gives the
text the API generates. Random JSONL lines (hypothesis) never crash run_batch: every
non-blank line gives its rows, keyed (line, index), once each, in order.
Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2onnx
from gpt2onnx import cli
from gpt2onnx.batch import MAX_PROMPTS_PER_LINE, run_batch
from gpt2onnx.params import FIELDS

from helpers.bad_requests import CASES, IDS, MB, good_results, jsonl_line, one_line
from helpers.random_inputs import JSON, PARAM_VALUES, SCALE, SETTINGS

CONTEXT = 64  # the tiny model's


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


@pytest.fixture(scope="module")
def expected(gen):
    return good_results(gen)


@pytest.fixture(scope="module")
def batch_rows(gen, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-cases")
    (d / "in.jsonl").write_text("".join(jsonl_line(*c[:3]) + "\n" for c in CASES), encoding="ascii")
    s = run_batch(gen, d / "in.jsonl", d / "out.jsonl", batch_size=4, progress=False)
    rows = [json.loads(x) for x in (d / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert s.rows == len(rows) == len(CASES) and [r["line"] for r in rows] == list(range(1, len(CASES) + 1))
    return {r["id"]: r for r in rows}


@pytest.mark.parametrize("cid,prompt,params,err", CASES, ids=IDS)
def test_run_batch_row(batch_rows, expected, cid, prompt, params, err):
    row = batch_rows[cid]
    if err is not None:
        assert set(row) == {"id", "line", "index", "error"} and re.search(err, one_line(row["error"])), row
        return
    r = expected[cid]
    assert (row["text"], row["prompt_tokens"], row["generated_tokens"], row["finish_reason"]) == (
        r.text, r.prompt_tokens, r.generated_tokens, r.finish_reason)


JSONL_QUIRKS = (
    b'\xef\xbb\xbf{"id": "bom", "prompt": "he was", "max_new_tokens": 3}\r\n'  # BOM + CRLF
    b"\r\n"
    b"   \n"  # blank lines make no row
    b'{"id": "crlf", "prompt": "of the", "max_new_tokens": 2}\r\n'
    b'\xef\xbb\xbf{"id": "bom-again", "prompt": "it is", "max_new_tokens": 2}\n'  # two files joined with cat
    b'{"id": "latin-1", "prompt": "caf\xe9"}\n'  # not UTF-8
    b'{"id": "surrogate", "prompt": "\\udc80"}\n'  # valid JSON, invalid text
    b'{"id": "surrogate-id-\\ud800", "prompt": "a", "max_new_tokens": 1}\n'
    b'{"id": "emoji", "prompt": "\xf0\x9f\x99\x82 ok", "max_new_tokens": 2}\n'
    + b"[" * 50_000 + b"\n"  # deeper than the JSON parser's recursion limit
    + b'{"id": "digits", "prompt": "a", "max_new_tokens": ' + b"9" * 5000 + b"}\n"
    b'{"id": "nul", "prompt": "a\\u0000b", "max_new_tokens": 2}\n'
    b'{"id": "torn", "prompt": "the last line was cut'  # no newline: a torn copy
)
QUIRK_ROWS = [  # (id, line, error regex or None)
    ("bom", 1, None), ("crlf", 4, None), ("bom-again", 5, None), ("line-6", 6, "line 6 is not valid UTF-8"),
    ("surrogate", 7, "not valid Unicode"), ("surrogate-id-\ud800", 8, None), ("emoji", 9, None),
    ("line-10", 10, "line 10 is not valid JSON"), ("line-11", 11, "line 11 is not valid JSON.*digits"),
    ("nul", 12, None), ("line-13", 13, r"line 13 is not valid JSON \(the file ends with an incomplete line\)"),
]


def test_jsonl_quirks_through_cli_and_run_batch(gen, tiny_int8, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(JSONL_QUIRKS)
    rc = cli.main(["batch", tiny_int8, str(src), str(tmp_path / "cli.jsonl"), "--threads", "1", "--no-progress",
                   "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out.err, out
    assert re.search(r"cli.jsonl: 6 ok, 5 errors; \d+ tokens", out.out), out.out
    s = run_batch(gen, src, tmp_path / "api.jsonl", params={"max_new_tokens": 4}, progress=False)
    assert (s.rows, s.ok, s.errors) == (11, 6, 5)

    def rows(name):
        text = (tmp_path / name).read_text(encoding="utf-8")  # valid UTF-8 even with a lone surrogate id
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in text.splitlines()]

    cli_rows, api_rows = rows("cli.jsonl"), rows("api.jsonl")
    assert cli_rows == api_rows
    assert [(r["id"], r["line"]) for r in cli_rows] == [(i, n) for i, n, _ in QUIRK_ROWS]
    for row, (_, _, err) in zip(cli_rows, QUIRK_ROWS):
        if err is None:
            assert "error" not in row and row["generated_tokens"] >= 1, row
        else:
            assert re.search(err, one_line(row["error"])), row
    by_id = {r["id"]: r for r in cli_rows}
    assert by_id["bom"]["text"] == gen.generate("he was", max_new_tokens=3)[0].text
    assert by_id["emoji"]["text"].startswith("\U0001f642 ok")

def test_megabyte_prompt_is_an_error_row_and_the_job_goes_on(gen, tmp_path):
    prompt = "the sky is blue " * (MB // 16)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "big", "prompt": prompt, "max_new_tokens": 5}) + "\n" + jsonl_line("s", "a", {}))
    s = run_batch(gen, src, tmp_path / "out.jsonl", params={"max_new_tokens": 2}, progress=False)
    assert (s.ok, s.errors) == (1, 1)
    big = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert "exceeds the context of 64 tokens" in big["error"]


# -- random lines: every line accounted for --------------------------------------------------------

LINE_JSON = st.one_of(
    JSON,
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=30), JSON)},
                          optional={"id": JSON, "max_new_tokens": st.integers(-1, 70), "top_p": PARAM_VALUES,
                                    "stop": PARAM_VALUES, "bogus": JSON, "truncation": st.booleans()}),
    st.fixed_dictionaries({"input_data": st.one_of(st.lists(st.one_of(st.text(max_size=20), JSON), max_size=4),
                                                   JSON)},
                          optional={"id": JSON, "params": st.one_of(
                              st.dictionaries(st.sampled_from(FIELDS + ("bogus",)), PARAM_VALUES, max_size=3), JSON),
                              "prompt": JSON}),
)
LINES = st.lists(st.one_of(LINE_JSON.map(lambda v: json.dumps(v).encode()),
                           st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                           st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf", b"{", b"\xff"])),
                 min_size=1, max_size=12)


def _expected_rows(raw: bytes) -> int:
    """How many output rows one input line must give (the batch module's contract, restated)."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        return 0
    try:
        obj = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
    except (ValueError, RecursionError):
        return 1
    if not isinstance(obj, dict) or "input_data" not in obj or isinstance(obj.get("id"), (dict, list)):
        return 1
    if set(obj) - {"id", "input_data", "params"}:
        return 1
    prompts = obj["input_data"]
    return len(prompts) if isinstance(prompts, list) and 0 < len(prompts) <= MAX_PROMPTS_PER_LINE else 1


@settings(max_examples=150 * SCALE, **SETTINGS)
@given(lines=LINES, crlf=st.booleans(), final_newline=st.booleans())
def test_run_batch_random_lines(gen, lines, crlf, final_newline):
    eol = b"\r\n" if crlf else b"\n"
    data = eol.join(lines) + (eol if final_newline else b"")
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "in.jsonl"), os.path.join(d, "out.jsonl")
        with open(src, "wb") as f:
            f.write(data)
        s = run_batch(gen, src, out, batch_size=3, params={"max_new_tokens": 3}, progress=False)
        with open(out, "rb") as f:
            rows = [json.loads(x) for x in f.read().decode("utf-8").splitlines()]
    physical = data.split(b"\n")
    if physical and physical[-1] == b"":
        physical.pop()
    expected = {n: _expected_rows(raw) for n, raw in enumerate(physical, start=1)}
    assert s.rows == len(rows) == sum(expected.values()) and s.ok + s.errors == s.rows
    keys = [(r["line"], r["index"]) for r in rows]
    assert keys == sorted(set(keys))  # once each, in input order
    assert keys == [(n, k) for n, count in expected.items() for k in range(count)]
    for r in rows:
        if "error" in r:
            assert set(r) == {"id", "line", "index", "error"} and r["error"] and "\n" not in r["error"]
        else:
            assert {"text", "prompt_tokens", "generated_tokens", "finish_reason"} <= set(r)
            assert 1 <= r["generated_tokens"] <= CONTEXT and isinstance(r["text"], str)
            assert not (isinstance(r["seconds"], float) and math.isnan(r["seconds"]))


def test_a_prompt_line_takes_its_parameters_in_params_too(gen, tmp_path):
    """The request format's "params" object works on a "prompt" line: same rows as top-level parameters."""
    lines = [{"id": "top", "prompt": "he was", "max_new_tokens": 3, "top_k": 1},
             {"id": "nested", "prompt": "he was", "params": {"max_new_tokens": 3, "top_k": 1}},
             {"id": "both", "prompt": "he was", "max_new_tokens": 3, "params": {"max_new_tokens": 4}},
             {"id": "bad", "prompt": "he was", "params": [3]},
             {"id": "range", "prompt": "he was", "params": {"top_k": -3}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    run_batch(gen, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines())}
    assert rows["top"]["text"] == rows["nested"]["text"] == gen.generate("he was", max_new_tokens=3)[0].text
    assert rows["nested"]["generated_tokens"] == 3
    assert "sets 'max_new_tokens' both at the top level and in \"params\"; keep one" in rows["both"]["error"]
    assert rows["bad"]["error"] == "line 4: params must be a JSON object of generation parameters"
    assert "top_k" in rows["range"]["error"] and "\n" not in rows["range"]["error"]
