"""Shared fixtures: tiny random GPT-2s saved locally and exported once per session.

The helpers they use (and tests import by name) live in tests/helpers/; this file holds
fixtures only. No network, ever (see helpers.models).
"""

from __future__ import annotations

import os
import subprocess

import pytest

pytest.register_assert_rewrite("helpers")  # helpers' asserts explain themselves like a test's

from helpers.models import ODD, save_tiny_gpt2  # noqa: E402
from helpers.paths import SHARED_DATA  # noqa: E402

if os.path.isdir(SHARED_DATA):  # eval finds its data sets through $GPT2ONNX_DATA only
    os.environ.setdefault("GPT2ONNX_DATA", SHARED_DATA)


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


# -- the reliability cases (bad input, damaged folders, crashes, concurrency) ------------------


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
    from helpers.damaged_folders import make_damaged

    return make_damaged(tiny_int8, tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="session")
def probed(damaged) -> dict:
    """{case: what loading it gave}, every damaged folder loaded in a subprocess first (see damaged_folders.probe)."""
    from helpers.damaged_folders import probe

    return probe(damaged)
