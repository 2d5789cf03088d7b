"""Bad input through `gpt2onnx generate`: the request table, flag types, argparse errors, bad argv bytes.

The table of requests is tests/helpers/bad_requests.py. Each bad request is exit code 1 and one
line on stderr, nothing on stdout; each good one prints what the API generates.
Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import gpt2onnx
from gpt2onnx import cli

from helpers.bad_requests import CASES, IDS, MB, NOT_ON_CLI, good_results, one_line


@pytest.fixture(scope="module")
def expected(tiny_int8):
    return good_results(gpt2onnx.load(tiny_int8, threads=1))


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


def test_megabyte_prompt_is_one_line(tiny_int8, capsys):
    """A 1 MB prompt is one clear error, and --stream prints nothing before it. (`gpt2onnx generate`
    cannot get it through argv, which the OS limits to 128 KiB per argument; main() is called directly.)"""
    prompt = "the sky is blue " * (MB // 16)
    assert cli.main(["generate", tiny_int8, prompt, "--max-new-tokens", "5", "--threads", "1", "--stream"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "exceeds the context of 64 tokens" in one_line(out.err)
