"""Shared fixtures: tiny random GPT-2s saved locally and exported once per session.

No network, ever: the models are built from a `GPT2Config` with a fixed seed, and their
tokenizer is a small byte-level BPE trained here on a slice of WikiText-2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

HERE = os.path.dirname(__file__)
REPO = os.path.dirname(os.path.abspath(HERE))
sys.path.insert(0, os.path.join(REPO, "export"))  # the export recipes (outliers.py) tests build variants with
# The project's shared folder (real GPT-2 tokenizer, data sets, seeds): ../shared beside the
# repository, wherever the checkout is. Tests reach it only through `shared_path`.
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
SHARED_DATA = os.path.join(SHARED, "data")
if os.path.isdir(SHARED_DATA):  # eval finds its data sets through $GPT2ONNX_DATA only
    os.environ.setdefault("GPT2ONNX_DATA", SHARED_DATA)
WIKI_SLICE = os.path.join(HERE, "data", "wiki_slice.txt")
BENCH_FIXTURES = os.path.join(HERE, "fixtures", "bench")  # bench records from three SKUs
TOKENIZER_VOCAB = 900  # below both tiny models' vocab sizes



def shared_path(*parts: str) -> str:
    """The path of a file in the shared folder; the calling test fails (not skips) with one line if it is missing.

    Call it inside a test or a fixture, not at import, so a missing folder fails only the tests
    that need it instead of stopping the collection of the whole suite.
    """
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: this test needs the project's shared folder as ../shared beside the "
                    f"repository ({REPO}); put it (or a symlink to it) there", pytrace=False)
    return path


TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, n_positions=64)
# Odd shapes catch hard-coded sizes: 3 heads, vocab not a multiple of 8, K not a multiple of the block.
ODD = dict(n_layer=3, n_head=3, n_embd=48, vocab_size=997, n_positions=48)


def train_tokenizer(folder: str) -> int:
    """Train a small GPT-2-style byte-level BPE; writes vocab.json + merges.txt; returns eos id."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    with open(WIKI_SLICE, encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text], vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok.save_model(folder)
    return tok.token_to_id("<|endoftext|>")


def save_tiny_gpt2(folder: str, *, seed: int = 0, safe: bool = True, tokenizer: bool = True, **dims) -> str:
    """Save a random GPT-2 (and its tokenizer files) with save_pretrained into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    os.makedirs(folder, exist_ok=True)
    eos = train_tokenizer(folder) if tokenizer else 0
    config = GPT2Config(**{**TINY, **dims}, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen them so greedy tokens are decisive
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=safe)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _bench_cache(tmp_path_factory) -> None:
    """`gpt2onnx bench` caches its baselines' exports in $GPT2ONNX_CACHE: a session folder here, not ~/.cache."""
    os.environ.setdefault("GPT2ONNX_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> str:
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("src") / "tiny"))


@pytest.fixture(scope="session")
def odd_src(tmp_path_factory) -> str:
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("src") / "odd"), seed=1, **ODD)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_src, tmp_path_factory) -> str:
    import gpt2onnx

    out = str(tmp_path_factory.mktemp("models") / "tiny-fp32")
    gpt2onnx.export(tiny_src, out, precision="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_int8(tiny_src, tmp_path_factory) -> str:
    import gpt2onnx

    out = str(tmp_path_factory.mktemp("models") / "tiny-int8")
    gpt2onnx.export(tiny_src, out, precision="int8", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_int8_kvfp32(tiny_src, tmp_path_factory) -> str:
    """int8 weights with an fp32 KV cache (the default for int8 is an int8 cache)."""
    import gpt2onnx

    out = str(tmp_path_factory.mktemp("models") / "tiny-int8-kvfp32")
    gpt2onnx.export(tiny_src, out, precision="int8", kv_cache="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_int4(tiny_src, tmp_path_factory) -> str:
    import gpt2onnx

    out = str(tmp_path_factory.mktemp("models") / "tiny-int4")
    gpt2onnx.export(tiny_src, out, precision="int4", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_kv8(tiny_src, tmp_path_factory) -> dict:
    """The tiny model with an int8 KV cache: {"fp32"|"int8": dir} by weight precision."""
    import gpt2onnx

    root = tmp_path_factory.mktemp("models-kv8")
    return {p: gpt2onnx.export(tiny_src, str(root / p), precision=p, kv_cache="int8", progress=False) and
            str(root / p) for p in ("fp32", "int8")}


@pytest.fixture(scope="session")
def tiny_torch(tiny_src):
    """The PyTorch model the tiny exports came from."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_src).eval()


# -- the real Azure ML inference server (azmlinfsrv) -------------------------------------

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


@pytest.fixture(scope="session")
def gpt2_124m(tmp_path_factory) -> dict:
    """The 124M architecture with seeded random weights, exported once per session: {"fp32"|"int8"|"int4": dir}.

    For the real-scale (`slow`) tests: a property that holds at 32 dimensions can fail at 768.
    """
    import gpt2onnx

    root = tmp_path_factory.mktemp("gpt2-124m")
    return {p: gpt2onnx.export("gpt2", str(root / p), precision=p, random_weights=True, progress=False) and
            str(root / p) for p in ("fp32", "int8", "int4")}


@pytest.fixture(scope="session")
def gpt2_124m_kv8(tmp_path_factory) -> str:
    """The 124M architecture as `gpt2_124m` makes it (same seeded weights), int8 weights with an int8 KV cache.

    Its own fixture so the other real-scale tests do not wait for a fourth export.
    """
    import gpt2onnx

    out = str(tmp_path_factory.mktemp("gpt2-124m-kv8") / "int8")
    gpt2onnx.export("gpt2", out, precision="int8", kv_cache="int8", random_weights=True, progress=False)
    return out


# -- helpers of the reliability cases (bad input, damaged folders, crashes, concurrency) -------


def in_threads(fn: Callable[[int], object], n: int, *, wait_s: float = 120) -> None:
    """Run fn(0) ... fn(n - 1) in n threads; fail if one hangs (bounded wait) or raises."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(wait_s)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: yields (path, remount(kib | 'ro' | 'rw')). Where none can be mounted (not root)
    it yields (an empty folder, None), and the disk-full tests inject OSError(ENOSPC) instead."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield mnt, None
        return

    def remount(opt) -> None:
        opt = f"size={opt}k" if isinstance(opt, int) else opt
        subprocess.run(["mount", "-o", f"remount,{opt}", str(mnt)], check=True, capture_output=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session")
def damaged(tiny_int8, tmp_path_factory) -> dict:
    """{case: folder}: a copy of tiny-int8 damaged in each way of `damaged_folders.DAMAGE` (read only)."""
    from damaged_folders import make_damaged

    return make_damaged(tiny_int8, tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="session")
def probed(damaged) -> dict:
    """{case: what loading it gave}, every damaged folder loaded in a subprocess first (see damaged_folders.probe)."""
    from damaged_folders import probe

    return probe(damaged)
