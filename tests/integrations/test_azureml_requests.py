"""Bad input through the Azure ML scoring entry: run() in process and the real azmlinfsrv over HTTP.

The table of requests is tests/helpers/bad_requests.py: each bad one is HTTP 400 {"error": "<one
line>"}, never a 500, each good one the text the API generates. Body quirks (BOM, CRLF,
content types, wrong JSON types) and random bytes, text and JSON (hypothesis) never make
run() raise. Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2onnx
from gpt2onnx.integrations import azureml, azureml_kit
from gpt2onnx.params import FIELDS

from helpers.bad_requests import CASES, IDS, MB, good_results, one_line
from helpers.azureml import azmlinfsrv, deployment_root
from helpers.random_inputs import JSON, PARAM_VALUES, SCALE, SETTINGS

BOM = "\ufeff".encode("utf-8")
BOUND_S = 60  # an HTTP call that takes longer is a hang (a 1 MB prompt is refused in ~3 s on one slow core)


@pytest.fixture(scope="module")
def gen(tiny_int8):
    return gpt2onnx.load(tiny_int8, threads=1)


@pytest.fixture(scope="module")
def expected(gen):
    return good_results(gen)


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

def _post(port: int, body: bytes, content_type: str | None = "application/json") -> tuple[int, bytes]:
    """POST to /score; a server that does not answer within BOUND_S fails the test (a timeout, not a timing)."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=BOUND_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_int8):
    """azmlinfsrv with the tiny int8 model, started once for this module and always killed."""
    d = tmp_path_factory.mktemp("azmlinfsrv")
    kit = azureml_kit.write_kit(tiny_int8, str(d / "kit"))
    with azmlinfsrv(kit, deployment_root(d, tiny_int8), d, ready_s=60) as port:
        yield port


@pytest.mark.parametrize("cid,prompt,params,err", CASES, ids=IDS)
def test_http(server, expected, cid, prompt, params, err):
    status, body = _post(server, _body(prompt, params).encode())
    if err is not None:
        assert status == 400, (status, body[:300])
        assert re.search(err, one_line(json.loads(body)["error"]))
        return
    assert status == 200 and json.loads(body) == [expected[cid].text], body[:300]


def test_http_body_quirks_and_wrong_types(server):
    good = b'{"input_data": ["a"], "params": {"max_new_tokens": 2}}'
    status, ref = _post(server, good)
    assert status == 200
    for body, ctype in [(BOM + good, "application/json"), (good + b"\r\n", "application/json"),
                        (good, "text/plain")]:
        assert _post(server, body, ctype) == (200, ref), (body[:20], ctype)
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
        status, out = _post(server, body, ctype or "application/json")
        assert status == 400, (body[:60], status, out[:300])
        assert re.search(message, one_line(json.loads(out)["error"])), (body[:60], out[:300])
    # not UTF-8: refused by azmlinfsrv itself, before run(), as documented in docs/azureml.md
    status, out = _post(server, b'{"input_data": ["caf\xe9"]}')
    assert status == 400 and "cannot be decoded as UTF-8" in one_line(json.loads(out)["message"]), out


def test_http_megabyte_prompt_is_400(server):
    prompt = "x" * (MB - 100)  # the body just fits the 1 MiB limit; its prompt does not fit the context
    status, out = _post(server, json.dumps({"input_data": [prompt]}).encode())
    assert status == 400, (status, out[:300])
    assert re.search(r"prompt 0 has \d+ tokens.*exceeds the context", one_line(json.loads(out)["error"]))
    status, out = _post(server, _body(prompt, {"max_new_tokens": 3, "truncation": True}).encode())
    assert status == 200 and json.loads(out)[0].startswith(prompt), (status, out[-300:])


# -- azureml.run: never a 500 -------------------------------------------------------------------

REQUESTS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"input_data": st.one_of(st.lists(st.one_of(st.text(max_size=30), JSON), max_size=5), JSON)},
        optional={"params": st.one_of(st.dictionaries(st.sampled_from(FIELDS + ("bogus", "max_tokens")),
                                                      PARAM_VALUES, max_size=5), JSON),
                  "extra": JSON}),
)
LONE = st.text(st.characters(exclude_categories=()), max_size=40)  # with lone surrogates


def _check_answer(out, raw) -> None:
    if isinstance(out, list):
        assert all(isinstance(t, str) for t in out), raw
        return
    assert getattr(out, "status_code", None) == 400, (raw, out)
    body = json.loads(out.get_data())
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"], body


@settings(max_examples=500 * SCALE, **SETTINGS)
@given(raw=st.one_of(st.binary(max_size=120), LONE))
def test_azureml_run_random_bytes_and_text(scoring, raw):
    _check_answer(scoring.run(raw), raw)


@settings(max_examples=500 * SCALE, **SETTINGS)
@given(request=REQUESTS, as_text=st.booleans())
def test_azureml_run_random_json(scoring, request, as_text):
    raw = json.dumps(request) if as_text else request
    out = scoring.run(raw)
    _check_answer(out, raw)
    if isinstance(out, list):
        assert isinstance(request, dict) and len(out) == len(request["input_data"])
