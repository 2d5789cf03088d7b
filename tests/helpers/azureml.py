"""The real Azure ML inference server (azmlinfsrv) around a kit's score.py, and a deployment's folder layout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

# azmlinfsrv always binds 0.0.0.0 (DEFAULT_HOST; no option). Its own entry point is
# started with that constant set to 127.0.0.1 so the test server is loopback-only.
AZMLINFSRV = ("import sys, azureml_inference_server_http.constants as c; c.DEFAULT_HOST = '127.0.0.1'; "
              "from azureml_inference_server_http.amlserver import run; sys.exit(run())")


def deployment_root(folder, model_dir) -> str:
    """The layout of a managed online deployment: the registered folder one level below AZUREML_MODEL_DIR."""
    root = folder / "azureml-models" / "gpt2onnx-tiny" / "1"
    root.mkdir(parents=True)
    os.symlink(model_dir, root / "tiny-int8")
    return str(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def azmlinfsrv(kit: str, model_root: str, workdir, *, ready_s: float) -> Iterator[int]:
    """Serve ``kit``'s score.py with azmlinfsrv (AZUREML_MODEL_DIR=`model_root`); yield its port once it answers.

    Its output goes to ``workdir/server.log`` (shown when it dies or is not ready within
    `ready_s`); on exit its process group (the server and its gunicorn worker) is killed.
    """
    port = free_port()
    env = dict(os.environ, AZUREML_MODEL_DIR=str(model_root), GPT2ONNX_THREADS="1", HOME=str(workdir),
               GUNICORN_CMD_ARGS="--no-control-socket", PYTHONUNBUFFERED="1")
    log_path = os.path.join(workdir, "server.log")

    def log_tail() -> str:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-c", AZMLINFSRV, "--entry_script", os.path.join(kit, "code", "score.py"),
                             "--port", str(port)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert proc.poll() is None, log_tail()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not ready: " + log_tail()
            time.sleep(0.2)
        yield port
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass  # the whole group has exited
            try:
                proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
