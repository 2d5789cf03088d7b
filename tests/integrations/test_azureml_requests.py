"""Bad input on every surface: the Python API, `gpt2onnx generate` / `batch`, run_batch,
azureml.run in process and the real azmlinfsrv over HTTP.

One table of requests runs through all five; each bad one must give one line that names
the problem (an `InvalidRequestError`, exit code 1, an error row, HTTP 400), each good
one the same text everywhere. Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import gpt2onnx
from gpt2onnx import GenerationParams, cli
from gpt2onnx.integrations import azureml, azureml_kit
from gpt2onnx.batch import run_batch
from gpt2onnx.errors import ArtifactError, InvalidRequestError

from conftest import azmlinfsrv, deployment_root

LONG = "the " * 100  # > 64 tokens: the tiny model's whole context
MB = 1 << 20
BOM = "\ufeff".encode("utf-8")
BOUND_S = 60  # generous: a 1 MB prompt is refused in ~3 s on one slow core; a hang is not

# (id, prompt, params, error regex or None when the request must succeed)
CASES = [
    ("empty-prompt", "", {"max_new_tokens": 3}, None),
    ("temperature-0-sampling", "the sky", {"max_new_tokens": 5, "do_sample": True, "temperature": 0, "seed": 3},
     None),
    ("truncation", LONG, {"max_new_tokens": 5, "truncation": True}, None),
    ("too-long", LONG, {"max_new_tokens": 5}, r"prompt .*has \d+ tokens.*exceeds the context of 64 tokens.*truncation"),
    ("max_new_tokens-0", "a", {"max_new_tokens": 0}, r"max_new_tokens must be an integer in \[1, 100_000\], got 0"),
    ("max_new_tokens-negative", "a", {"max_new_tokens": -3}, r"max_new_tokens must be an integer .*got -3"),
    ("max_new_tokens-huge", "a", {"max_new_tokens": 10**12}, r"max_new_tokens must be an integer .*got 1000000000000"),
    ("max_new_tokens-no-room", "a", {"max_new_tokens": 64},
     r"max_new_tokens 64 leaves no room .*context of 64 tokens; use max_new_tokens <= 63"),
    ("max_new_tokens-float", "a", {"max_new_tokens": 2.5}, r"max_new_tokens must be an integer .*got 2.5"),
    ("max_new_tokens-string", "a", {"max_new_tokens": "5"}, r"max_new_tokens must be an integer .*got '5'"),
    ("temperature-negative", "a", {"temperature": -0.5, "do_sample": True},
     r"temperature must be in \[0, 100\] \(0 = greedy\), got -0.5"),
    ("temperature-nan", "a", {"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
    ("temperature-inf", "a", {"temperature": float("inf"), "do_sample": True},
     r"temperature must be a finite number, got inf"),
    ("top_p-0", "a", {"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
    ("top_p-above-1", "a", {"top_p": 1.01}, r"top_p must be in \(0, 1\], got 1.01"),
    ("top_k-negative", "a", {"top_k": -1}, r"top_k must be an integer >= 0 \(0 disables\), got -1"),
    ("repetition_penalty-0", "a", {"repetition_penalty": 0}, r"repetition_penalty must be in \(0, 100\]"),
    ("repetition_penalty-negative", "a", {"repetition_penalty": -1.5}, r"repetition_penalty must be in \(0, 100\]"),
    ("unknown-name", "a", {"max_tokens": 5},
     r"unknown generation parameter 'max_tokens'; did you mean 'max_new_tokens'\?"),
    ("do_sample-string", "a", {"do_sample": "yes"}, r"do_sample must be true or false, got 'yes'"),
    ("stop-lone-surrogate", "a", {"stop": ["\ud800"]}, r"stop must be valid Unicode text"),
    ("prompt-lone-surrogate", "ok \udcff", {}, r"not valid Unicode \(lone surrogate"),
    ("prompt-not-a-string", 42, {}, r"must be a string"),
]
IDS = [c[0] for c in CASES]
NOT_ON_CLI = {"prompt-not-a-string"}  # argv is always text


def one_line(message: str) -> str:
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
    return message


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


@pytest.fixture(scope="module")
def expected(gen):
    """The API's result of every good case, the reference for the other surfaces."""
    return {cid: gen.generate(prompt, **params)[0] for cid, prompt, params, err in CASES if err is None}


# -- Python API -----------------------------------------------------------------------


@pytest.mark.parametrize("cid,prompt,params,err", CASES, ids=IDS)
def test_api(gen, expected, cid, prompt, params, err):
    if err is not None:
        with pytest.raises(InvalidRequestError, match=err) as e:
            gen.generate(prompt, **params)
        one_line(str(e.value))
        with pytest.raises(InvalidRequestError, match=err):  # streaming refuses it at the call, not at next()
            gen.generate_tokens(prompt, **params)
        return
    r = expected[cid]
    assert 1 <= r.generated_tokens <= params["max_new_tokens"]
    if cid == "empty-prompt":  # starts from <|endoftext|>
        assert r.prompt_tokens == 1
    if cid == "temperature-0-sampling":  # temperature 0 is greedy, even with do_sample
        assert r.token_ids == gen.generate(prompt, max_new_tokens=5)[0].token_ids
    if cid == "truncation":  # the last 64 - 5 tokens are kept
        assert r.prompt_tokens == 64 - 5
    steps = list(gen.generate_tokens(prompt, **params))
    assert tuple(s.token_id for s in steps) == r.token_ids


def test_api_request_shapes(gen, tiny_int8):
    p = GenerationParams(max_new_tokens=2)
    for bad in (["a"], [("a",)], [("a", p, 1)], None, "a", [["a", p]]):
        with pytest.raises(InvalidRequestError, match=r"or of \(prompt, GenerationParams\) pairs"):
            gen.generate_batch(bad)
        with pytest.raises(InvalidRequestError, match=r"or of \(prompt, GenerationParams\) pairs"):
            gen.stream_batch(bad)  # at the call, not at the first next()
    with pytest.raises(InvalidRequestError, match="request 0: params must be a GenerationParams"):
        gen.stream_batch([("a", {"max_new_tokens": 2})])
    with pytest.raises(InvalidRequestError, match="params must be a GenerationParams or a dict, got str"):
        gen.generate("a", "fast")
    for folder in (None, 3, ["x"]):
        with pytest.raises(ArtifactError, match=r"a model folder must be a path \(str or os.PathLike\)"):
            gpt2onnx.load(folder)
    for threads in (0, -1, 1.5, "2", True):
        with pytest.raises(InvalidRequestError, match="threads must be a positive integer"):
            gpt2onnx.load(tiny_int8, threads=threads)


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize("cid,prompt,params,err", [c for c in CASES if c[0] not in NOT_ON_CLI],
                         ids=[i for i in IDS if i not in NOT_ON_CLI])
def test_cli_generate(tiny_int8, expected, capsys, cid, prompt, params, err):
    rc = cli.main(["generate", tiny_int8, prompt, "--params", json.dumps(params), "--threads", "1", "--json"])
    out = capsys.readouterr()
    if err is not None:
        assert rc == 1 and out.out == "", (rc, out)
        assert re.search(err, one_line(out.err)) and out.err.startswith("gpt2onnx: error: "), out.err
        return
    assert rc == 0, out.err
    assert json.loads(out.out)["text"] == expected[cid].text


def test_cli_flags_and_argparse_errors(tiny_int8, capsys):
    for argv, rc, message in [
        (["--max-new-tokens", "abc"], 2, "argument --max-new-tokens: invalid int value: 'abc'"),
        (["--max-new-tokens", "1.5"], 2, "invalid int value: '1.5'"),
        (["--top-p", "x"], 2, "argument --top-p: invalid float value: 'x'"),
        (["--temperature", "nan"], 1, "temperature must be a finite number, got nan"),
        (["--temperature=-inf", "--do-sample"], 1, "temperature must be a finite number, got -inf"),
        (["--max-new-tokens", "-1"], 1, "max_new_tokens must be an integer in [1, 100_000], got -1"),
        (["--repetition-penalty", "0"], 1, "repetition_penalty must be in (0, 100]"),
        (["--stop", ""], 1, "stop must be a string or a list of at most 16 non-empty strings"),
        (["--params", "[1]"], 1, "--params must be a JSON object"),
        (["--params", '{"top_p": 0.9'], 1, "--params is not valid JSON"),
    ]:
        assert cli.main(["generate", tiny_int8, "hi", "--threads", "1", *argv]) == rc, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.strip().splitlines()[-1].startswith("gpt2onnx"), err  # argparse: usage, then one error line
    assert cli.main(["generate", tiny_int8, "hi", "--temperature", "0", "--do-sample", "--max-new-tokens", "4",
                     "--threads", "1"]) == 0
    greedy = capsys.readouterr().out
    assert cli.main(["generate", tiny_int8, "hi", "--max-new-tokens", "4", "--threads", "1"]) == 0
    assert capsys.readouterr().out == greedy


@pytest.mark.parametrize("stream", [False, True])
def test_cli_invalid_utf8_argv_prints_nothing_but_one_line(tiny_int8, stream):
    """Undecodable argv bytes reach Python as lone surrogates (surrogateescape)."""
    argv = [sys.executable, "-m", "gpt2onnx", "generate", tiny_int8, "caf\xe9 \udcff", "--threads", "1",
            "--max-new-tokens", "3"] + (["--stream"] if stream else [])
    r = subprocess.run([os.fsencode(a) for a in argv], capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stdout == b"", r  # --stream used to print the prompt before refusing it
    err = one_line(r.stderr.decode())
    assert "is not valid Unicode" in err


# -- batch: run_batch and `gpt2onnx batch` --------------------------------------------


def _line(cid, prompt, params) -> str:
    return json.dumps({"id": cid, "prompt": prompt, **params})  # ASCII: lone surrogates stay \ud800 escapes


@pytest.fixture(scope="module")
def batch_rows(gen, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-cases")
    (d / "in.jsonl").write_text("".join(_line(*c[:3]) + "\n" for c in CASES), encoding="ascii")
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


def test_megabyte_prompt_is_refused_within_a_bound(gen, tiny_int8, tmp_path, capsys):
    """A 1 MB prompt is one clear error, quickly (it is tokenized once): API, CLI, batch.

    (`gpt2onnx generate` cannot get it through argv, which the OS limits to 128 KiB per
    argument; main() is called directly.)"""
    prompt = "the sky is blue " * (MB // 16)
    t0 = time.monotonic()
    with pytest.raises(InvalidRequestError, match=r"prompt 0 has \d{6} tokens.*exceeds the context of 64"):
        gen.generate(prompt, max_new_tokens=5)
    assert time.monotonic() - t0 < BOUND_S
    t0 = time.monotonic()
    assert cli.main(["generate", tiny_int8, prompt, "--max-new-tokens", "5", "--threads", "1", "--stream"]) == 1
    out = capsys.readouterr()
    assert time.monotonic() - t0 < BOUND_S and out.out == ""
    assert "exceeds the context of 64 tokens" in one_line(out.err)
    t0 = time.monotonic()
    r = gen.generate(prompt, max_new_tokens=5, truncation=True, ignore_eos=True)[0]
    assert time.monotonic() - t0 < BOUND_S and r.prompt_tokens == 59 and r.generated_tokens == 5
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "big", "prompt": prompt, "max_new_tokens": 5}) + "\n" + _line("s", "a", {}))
    t0 = time.monotonic()
    s = run_batch(gen, src, tmp_path / "out.jsonl", params={"max_new_tokens": 2}, progress=False)
    assert time.monotonic() - t0 < BOUND_S and (s.ok, s.errors) == (1, 1)
    big = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert "exceeds the context of 64 tokens" in big["error"]


# -- Azure ML scoring: run() in process -------------------------------------------------


def _body(prompt, params) -> str:
    return json.dumps({"input_data": [prompt], "params": params})  # NaN/Infinity as Python's json writes them


def error_of(response) -> str:
    assert getattr(response, "status_code", None) == 400, response
    body = json.loads(response.get_data())
    assert list(body) == ["error"]
    return one_line(body["error"])


@pytest.fixture
def scoring(gen, monkeypatch):
    monkeypatch.setattr(azureml, "_generator", gen)
    return azureml


@pytest.mark.parametrize("cid,prompt,params,err", CASES, ids=IDS)
def test_azureml_run(scoring, expected, cid, prompt, params, err):
    out = scoring.run(_body(prompt, params))
    if err is not None:
        assert re.search(err, error_of(out))
        return
    assert out == [expected[cid].text]


def test_azureml_body_quirks(scoring):
    good = '{"input_data": ["a"], "params": {"max_new_tokens": 2}}'
    ref = scoring.run(good)
    assert scoring.run("\ufeff" + good) == ref  # a BOM (Windows tools) is ignored
    assert scoring.run(BOM + good.encode()) == ref
    assert scoring.run(good + "\r\n") == ref
    assert scoring.run(bytearray(good.encode())) == ref
    assert "Content-Type: application/json" in error_of(scoring.run(""))  # what azmlinfsrv passes for a form body
    huge = '{"input_data": ["a"], "params": {"max_new_tokens": ' + "9" * 5000 + "}}"
    assert "not valid JSON (Exceeds the limit (4300 digits)" in error_of(scoring.run(huge))
    assert "unknown generation parameter '\\ud800'" in error_of(scoring.run('{"input_data": ["a"], '
                                                                           '"params": {"\\ud800": 1}}'))
    assert "input_data[0] must be a string, got null" in error_of(scoring.run('{"input_data": [null]}'))


# -- Azure ML scoring: the real server over HTTP ----------------------------------------

def _post(port: int, body: bytes, content_type: str | None = "application/json") -> tuple[int, bytes, float]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body, headers=headers, method="POST")
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=BOUND_S) as r:
            return r.status, r.read(), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.monotonic() - t0


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_int8):
    """azmlinfsrv with the tiny int8 model, started once for this module and always killed."""
    d = tmp_path_factory.mktemp("azmlinfsrv")
    kit = azureml_kit.write_kit(tiny_int8, str(d / "kit"))
    with azmlinfsrv(kit, deployment_root(d, tiny_int8), d, ready_s=60) as port:
        yield port


@pytest.mark.parametrize("cid,prompt,params,err", CASES, ids=IDS)
def test_http(server, expected, cid, prompt, params, err):
    status, body, _ = _post(server, _body(prompt, params).encode())
    if err is not None:
        assert status == 400, (status, body[:300])
        assert re.search(err, one_line(json.loads(body)["error"]))
        return
    assert status == 200 and json.loads(body) == [expected[cid].text], body[:300]


def test_http_body_quirks_and_wrong_types(server):
    good = b'{"input_data": ["a"], "params": {"max_new_tokens": 2}}'
    status, ref, _ = _post(server, good)
    assert status == 200
    for body, ctype in [(BOM + good, "application/json"), (good + b"\r\n", "application/json"),
                        (good, "text/plain")]:
        assert _post(server, body, ctype)[:2] == (200, ref), (body[:20], ctype)
    bad = [
        (good, "application/x-www-form-urlencoded", "Content-Type: application/json"),  # the form eats the body
        (b'{"input_data": ["a"], "params": {"max_new_tokens": ' + b"9" * 5000 + b"}}", None, "not valid JSON"),
        (good[:-9], None, r"not valid JSON \(Unterminated string starting at character 33\)"),  # cut short
        (b'{"input_data": "a"}', None, "input_data must be a list of prompt strings, got a string"),
        (b'{"input_data": [null]}', None, r"input_data\[0\] must be a string, got null"),
        (b'{"input_data": [["a"]]}', None, r"input_data\[0\] must be a string, got a list"),
        (b'{"input_data": ["a"], "params": [1]}', None, "generation parameters must be a JSON object"),
        (b'{"input_data": ["a"], "params": {"stop": 5}}', None, "stop must be a string or a list"),
        (b'{"input_data": ["a"], "params": {"top_k": true}}', None, "top_k must be an integer"),
        (b'{"input_data": ["a"], "params": {"seed": 1e3}}', None, "seed must be an integer"),
        (b'{"input_data": ["a"], "params": {"\\ud800": 1}}', None, "unknown generation parameter"),
        (b"[]", None, "must be a JSON object"), (b"true", None, "must be a JSON object"),
        (b'"x"', None, "must be a JSON object"), (b"1e999", None, "must be a JSON object"),
    ]
    for body, ctype, message in bad:
        status, out, _ = _post(server, body, ctype or "application/json")
        assert status == 400, (body[:60], status, out[:300])
        assert re.search(message, one_line(json.loads(out)["error"])), (body[:60], out[:300])
    # not UTF-8: refused by azmlinfsrv itself, before run(), as documented in docs/azureml.md
    status, out, _ = _post(server, b'{"input_data": ["caf\xe9"]}')
    assert status == 400 and "cannot be decoded as UTF-8" in one_line(json.loads(out)["message"]), out


def test_http_megabyte_prompt_is_400_within_a_bound(server):
    prompt = "x" * (MB - 100)  # the body just fits the 1 MiB limit; its prompt does not fit the context
    status, out, seconds = _post(server, json.dumps({"input_data": [prompt]}).encode())
    assert status == 400 and seconds < BOUND_S, (status, out[:300])
    assert re.search(r"prompt 0 has \d+ tokens.*exceeds the context", one_line(json.loads(out)["error"]))
    status, out, _ = _post(server, _body(prompt, {"max_new_tokens": 3, "truncation": True}).encode())
    assert status == 200 and json.loads(out)[0].startswith(prompt), (status, out[-300:])
