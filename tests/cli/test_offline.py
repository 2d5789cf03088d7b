"""Offline: importing gpt2onnx, loading a model folder and every way of running it open no
network connection; neither does exporting from a local folder.

Each check runs in a subprocess whose audit hook refuses (and records) every DNS lookup,
connect, send and bind — audit hooks cannot be removed, so they must not leak into the
test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

GUARD = r"""
import json, socket, sys
attempts = []
BLOCKED = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
           "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "socket.bind", "http.client.connect",
           "urllib.Request"}

def audit(event, args):
    if event == "socket.bind" and isinstance(args[1], tuple) and args[1][0] in ("::1", "127.0.0.1"):
        return  # urllib3 binds ('::1', 0) at import to learn whether IPv6 exists: local, no traffic
    if event in BLOCKED:
        attempts.append([event, repr(args)[:200]])
        raise OSError(f"network access blocked in this test: {event}")

sys.addaudithook(audit)
for name in ("connect", "connect_ex"):  # belt and braces: the socket methods themselves
    def blocked(self, *a, _name=name):
        attempts.append([f"socket.socket.{_name}", repr(a)[:200]])
        raise OSError("network access blocked in this test")
    setattr(socket.socket, name, blocked)
"""

RUN = GUARD + r"""
import contextlib, io, os, tempfile
model_dir = sys.argv[1]
import gpt2onnx
from gpt2onnx import batch, cli
from gpt2onnx.integrations import azureml

g = gpt2onnx.load(model_dir, threads=1)
g.generate(["Hello", ""], max_new_tokens=4, do_sample=True, seed=1)
list(g.generate_tokens("Hi", max_new_tokens=3))
azureml._generator = g
assert isinstance(azureml.run('{"input_data": ["a"], "params": {"max_new_tokens": 2}}'), list)
assert azureml.run('{"input_data": []}').status_code == 400
with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "in.jsonl")
    with open(src, "w") as f:
        f.write('{"prompt": "a"}\nnot json\n')
    batch.run_batch(model_dir, src, os.path.join(d, "out.jsonl"), params={"max_new_tokens": 2}, threads=1)
with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(["generate", model_dir, "hi", "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert cli.main(["inspect", model_dir]) == 0
print(json.dumps(attempts))
"""

EXPORT = GUARD + r"""
import gpt2onnx
gpt2onnx.export(sys.argv[1], sys.argv[2], precision="int8", progress=False)
print(json.dumps(attempts))
"""


def _run(code: str, *args: str) -> list:
    # No proxy or hub variables: nothing should need them.
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_load_and_run_open_no_connection(tiny_int8):
    assert _run(RUN, tiny_int8) == []


def test_export_from_a_local_folder_opens_no_connection(tiny_src, tmp_path):
    from gpt2onnx import artifact

    assert _run(EXPORT, tiny_src, str(tmp_path / "m")) == []
    assert artifact.verify(str(tmp_path / "m")).precision == "int8"
