"""Damaged model folders: one table of ways to damage a tiny export, and a loader that survives them.

Shared by tests/runtime/test_artifact_damaged.py (every case, every surface of the CLI) and
the batch and Azure ML tests (a sample of cases, `SURFACE_CASES`). The `damaged` and
`probed` fixtures (conftest.py) build the folders once per session and load each in a
subprocess first, so a native crash in onnxruntime fails a test naming the folder instead of
killing the test run. Decisions are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from gpt2onnx import artifact


def edit_manifest(d, change) -> None:
    """Load `d`'s manifest, let `change` edit the dict in place, write it back (no rehash)."""
    path = os.path.join(d, artifact.MANIFEST)
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    change(m)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(m, f)


def _rehash(d) -> None:
    """Rewrite the file table (and the manifest's own sha256) as if the damage had happened before the
    manifest was written."""
    edit_manifest(d, lambda m: (m.update(files=artifact.describe_files(d)), _self_hash(m)))


def _self_hash(m: dict) -> None:
    m[artifact.SELF_HASH] = artifact.content_sha256(m)


def _edit(change, *, self_hash: bool = True):
    """Edit the manifest with its own sha256 recomputed (or dropped, as in a folder exported before it
    existed), so only the checks against config.json and the graph can catch the edit."""
    def damage(d) -> None:
        def apply(m: dict) -> None:
            change(m)
            _self_hash(m) if self_hash else m.pop(artifact.SELF_HASH, None)
        edit_manifest(d, apply)
    return damage


def _config(d, **values) -> None:
    """Edit config.json too, and rehash: the manifest and config.json agree, the graph does not."""
    path = os.path.join(d, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    _rehash(d)


def _swap(names: list, a: str, b: str) -> None:
    i, j = names.index(a), names.index(b)
    names[i], names[j] = names[j], names[i]


def _flip(path, offset) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path, keep) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep if keep >= 0 else os.path.getsize(path) + keep)


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _gpt2_tokenizer(d) -> None:
    from gpt2onnx import tokenizer

    tokenizer.packaged().save(os.path.join(d, "tokenizer.json"))  # 50,257 tokens for a 1,000-token model
    _rehash(d)


def _optimum(d) -> None:
    """What `optimum-cli export onnx` writes: decoder_model*.onnx, config.json, tokenizer files; no manifest."""
    os.rename(os.path.join(d, "model.onnx"), os.path.join(d, "decoder_model.onnx"))
    shutil.copy(os.path.join(d, "decoder_model.onnx"), os.path.join(d, "decoder_with_past_model.onnx"))
    for name in ("gpt2onnx.json", "MODEL_CARD.md"):
        os.remove(os.path.join(d, name))
    _write(os.path.join(d, "generation_config.json"), b'{"bos_token_id": 0, "eos_token_id": 0}')


J = os.path.join
# (id, damage, verify_hashes, error regex; None = must load and generate)
DAMAGE = [
    ("model.onnx-missing", lambda d: os.remove(J(d, "model.onnx")), True, r"model.onnx is missing; copy the whole"),
    ("data-missing", lambda d: os.remove(J(d, "model.onnx.data")), True, r"model.onnx.data is missing"),
    ("model.onnx-truncated", lambda d: _truncate(J(d, "model.onnx"), -100), True,
     r"model.onnx is \d+ bytes, the manifest says \d+ \(truncated or replaced\); copy the model folder again"),
    ("data-truncated", lambda d: _truncate(J(d, "model.onnx.data"), 5000), True, r"model.onnx.data is 5000 bytes"),
    ("data-truncated-hashes-off", lambda d: _truncate(J(d, "model.onnx.data"), 5000), False,
     r"truncated or replaced"),  # sizes are checked even without hashes
    ("model.onnx-truncated-rehashed", lambda d: (_truncate(J(d, "model.onnx"), 3000), _rehash(d)), True,
     r"model.onnx is not a readable ONNX model \(DecodeError\); the folder is damaged, re-export it"),
    ("data-truncated-rehashed", lambda d: (_truncate(J(d, "model.onnx.data"), 3000), _rehash(d)), True,
     r"onnxruntime cannot load .*model.onnx \(.*\); re-export the model folder"),
    ("model.onnx-garbage-rehashed", lambda d: (_write(J(d, "model.onnx"), os.urandom(14000)), _rehash(d)), True,
     r"model.onnx is not a readable ONNX model|model.onnx holds no graph"),
    ("data-flipped-byte", lambda d: _flip(J(d, "model.onnx.data"), 1000), True,
     r"model.onnx.data does not match its sha256 in the manifest \(damaged or modified\)"),
    ("model.onnx-flipped-byte", lambda d: _flip(J(d, "model.onnx"), 2), True, r"model.onnx does not match its sha256"),
    ("model.onnx-flipped-byte-hashes-off", lambda d: _flip(J(d, "model.onnx"), 2), False,
     r"model.onnx is not a readable ONNX model"),
    ("data-flipped-byte-hashes-off", lambda d: _flip(J(d, "model.onnx.data"), 1000), False, None),  # undetected
    ("manifest-missing", lambda d: os.remove(J(d, "gpt2onnx.json")), True,
     r"has an ONNX model but no gpt2onnx.json: it is not a gpt2onnx export .*'gpt2onnx export SOURCE OUTDIR'"),
    ("manifest-not-json", lambda d: _write(J(d, "gpt2onnx.json"), b'{"format": "gpt2onnx", '), True,
     r"gpt2onnx.json is not valid JSON \(JSONDecodeError\); the folder is damaged, re-export it"),
    ("manifest-binary", lambda d: _write(J(d, "gpt2onnx.json"), b"\xff\xfe\x00\x81" * 64), True,
     r"gpt2onnx.json is not valid JSON"),
    ("manifest-empty", lambda d: _write(J(d, "gpt2onnx.json"), b""), True, r"gpt2onnx.json is not valid JSON"),
    ("manifest-a-list", lambda d: _write(J(d, "gpt2onnx.json"), b"[1, 2]"), True, r"is not a gpt2onnx manifest"),
    ("manifest-newer", lambda d: edit_manifest(d, lambda m: m.update(format_version=artifact.FORMAT_VERSION + 1)), True,
     r"model folder format 2 is newer than this gpt2onnx supports \(1\); upgrade gpt2onnx"),
    ("format_version-string", lambda d: edit_manifest(d, lambda m: m.update(format_version="1")), True,
     r"has no valid format_version"),
    ("format_version-bool", lambda d: edit_manifest(d, lambda m: m.update(format_version=True)), True,
     r"has no valid format_version"),
    ("manifest-wrong-sha256", lambda d: edit_manifest(d, lambda m: m["files"]["tokenizer.json"].update(sha256="0" * 64)),
     True, r"tokenizer.json does not match its sha256"),
    ("manifest-no-dims", lambda d: edit_manifest(d, lambda m: m.pop("dims")), True, r"lacks 'dims'"),
    ("manifest-no-files", lambda d: edit_manifest(d, lambda m: m.pop("files")), True, r"lacks 'files'"),
    ("manifest-no-model-entry", lambda d: edit_manifest(d, lambda m: m["files"].pop("model.onnx")), True,
     r"lists no model.onnx"),
    ("dims-a-string", lambda d: edit_manifest(d, lambda m: m.update(dims="x")), True, r"lacks 'dims'"),
    ("dims-n_layer-string", lambda d: edit_manifest(d, lambda m: m["dims"].update(n_layer="x")), True,
     r"dims.n_layer must be a positive integer, got 'x'; the folder is damaged, re-export it"),
    ("dims-n_head-missing", lambda d: edit_manifest(d, lambda m: m["dims"].pop("n_head")), True,
     r"dims.n_head must be a positive integer, got None"),
    ("dims-head_dim-inconsistent", lambda d: edit_manifest(d, lambda m: m["dims"].update(head_dim=8)), True,
     r"head_dim x n_head != n_embd"),
    ("dims-n_positions-lie", lambda d: edit_manifest(d, lambda m: m["dims"].update(n_positions=1024)), True,
     r"says n_positions 1024 but config.json says 64"),
    ("dims-vocab-lie", lambda d: edit_manifest(d, lambda m: m["dims"].update(vocab_size=500)), True,
     r"says vocab_size 500 but config.json says 1000"),
    ("eos-null", lambda d: edit_manifest(d, lambda m: m.update(eos_token_id=None)), True,
     r"eos_token_id must be a token id in \[0, 1000\), got None"),
    ("bos-out-of-vocab", lambda d: edit_manifest(d, lambda m: m.update(bos_token_id=50256)), True,
     r"bos_token_id must be a token id in \[0, 1000\), got 50256"),
    ("bytes-a-string", lambda d: edit_manifest(d, lambda m: m["files"]["config.json"].update(bytes="x")), True,
     r"config.json is \d+ bytes, the manifest says x"),
    ("file-entry-escapes", lambda d: edit_manifest(d, lambda m: m["files"].update({"../model.onnx": {}})), True,
     r"bad file entry '../model.onnx'"),
    ("tokenizer-missing", lambda d: os.remove(J(d, "tokenizer.json")), True, r"tokenizer.json is missing"),
    ("tokenizer-corrupt", lambda d: (_write(J(d, "tokenizer.json"), b'{"version": "1.0", "model": 7}'), _rehash(d)),
     True, r"cannot read .*tokenizer.json \(.*\); the model folder is damaged, re-export it"),
    ("tokenizer-of-another-model", _gpt2_tokenizer, True,
     r"tokenizer.json has 50257 tokens but the model only 1000; the tokenizer is not this model's"),
    ("config-missing", lambda d: os.remove(J(d, "config.json")), True, r"config.json is missing"),
    ("config-not-json", lambda d: (_write(J(d, "config.json"), b"{oops"), _rehash(d)), True,
     r"config.json is not valid JSON"),
    ("optimum-folder", _optimum, True,
     r"has an ONNX model but no gpt2onnx.json: it is not a gpt2onnx export \(an Optimum export\?\); make one from "
     r"the original model with 'gpt2onnx export SOURCE OUTDIR'"),
    # Hand edits of the manifest fields that decide how the graph is run: the graph or config.json refuses
    # each even with the manifest's own sha256 recomputed (or absent, as in older exports).
    ("precision-int8-to-fp32", _edit(lambda m: m.update(precision="fp32")), True,
     r"gpt2onnx.json says precision 'fp32' but model.onnx has 'int8'; the manifest was edited .*re-export"),
    ("precision-int8-to-fp32-no-self-hash", _edit(lambda m: m.update(precision="fp32"), self_hash=False), True,
     r"says precision 'fp32' but model.onnx has 'int8'"),
    ("precision-int4", _edit(lambda m: m.update(precision="int4")), True, r"says precision 'int4' but model.onnx"),
    ("precision-fp16", _edit(lambda m: m.update(precision="fp16")), True,
     r"precision 'fp16' is not one this gpt2onnx knows \(fp32, int8, int4\); upgrade gpt2onnx or re-export"),
    ("quantization-scheme", _edit(lambda m: m["quantization"].update(scheme="MatMulNBits")), True,
     r"says quantization.scheme 'MatMulNBits' but model.onnx has 'qgemm'"),
    ("quantization-bits", _edit(lambda m: m["quantization"].update(bits=4)), True,
     r"says quantization.bits 4 but model.onnx has 8"),
    ("quantization-block_size", _edit(lambda m: m["quantization"].update(block_size=16)), True,
     r"says quantization.block_size 16 but model.onnx has 0"),
    ("quantization-accuracy_level", _edit(lambda m: m["quantization"].update(accuracy_level=4)), True,
     r"says quantization.accuracy_level 4 but model.onnx has 0"),
    ("quantization-lm_head", _edit(lambda m: m["quantization"].update(lm_head="int4")), True,
     r"says quantization.lm_head 'int4' but model.onnx has 'int8'"),
    ("quantization-embedding", _edit(lambda m: m["quantization"].update(embedding="fp32")), True,
     r"says quantization.embedding 'fp32' but model.onnx has 'int8'"),
    ("quantization-table_block_size", _edit(lambda m: m["quantization"].update(table_block_size=16)), True,
     r"says quantization.table_block_size 16 but model.onnx has None"),
    ("quantization-dropped", _edit(lambda m: m.update(quantization=None)), True,
     r"says quantization.scheme None but model.onnx has 'qgemm'"),
    ("kv_cache-dtype", _edit(lambda m: m.update(kv_cache={"dtype": "fp32"})), True,
     r"says kv_cache.dtype 'fp32' but model.onnx has 'int8'"),
    ("kv_cache-quant_type", _edit(lambda m: m["kv_cache"].update(quant_type="PER_TENSOR")), True,
     r"says kv_cache.quant_type 'PER_TENSOR' but model.onnx has 'PER_CHANNEL'"),
    ("io-past-swapped", _edit(lambda m: _swap(m["io"]["inputs"], "past_key_values.0.key", "past_key_values.0.value")),
     True, r"says io.inputs\[3\] 'past_key_values.0.value' but model.onnx has 'past_key_values.0.key'"),
    ("io-present-renamed", _edit(lambda m: m["io"]["outputs"].__setitem__(-1, "present.1.val")), True,
     r"says io.outputs\[4\] 'present.1.val' but model.onnx has 'present.1.value'"),
    ("opset", _edit(lambda m: m.update(opset=18)), True, r"says opset 18 but model.onnx has 21"),
    ("eos-not-config", _edit(lambda m: m.update(eos_token_id=5)), True, r"says eos_token_id 5 but config.json says"),
    ("dims-n_head-with-config", lambda d: (_config(d, n_head=4), _edit(lambda m: m["dims"].update(n_head=4,
                                                                                             head_dim=8))(d)), True,
     r"says dims.n_head 4 but model.onnx has 2"),
    ("dims-n_positions-with-config", lambda d: (_config(d, n_positions=1024), _edit(
        lambda m: m["dims"].update(n_positions=1024))(d)), True,
     r"says dims.n_positions, n_embd \[1024, 32\] but model.onnx has \[64, 32\]"),
    ("dims-vocab-with-config", lambda d: (_config(d, vocab_size=1001), _edit(
        lambda m: m["dims"].update(vocab_size=1001))(d)), True, r"says dims.vocab_size 1001 but model.onnx has 1000"),
    # Any other edit: the manifest's own sha256.
    ("random_weights-edited", lambda d: edit_manifest(d, lambda m: m["source"].update(random_weights=True)), True,
     r"gpt2onnx.json was edited after export \(its content does not match its manifest_sha256\); restore"),
    ("empty-folder", lambda d: [os.remove(J(d, n)) for n in os.listdir(d)], True,
     r"is not a gpt2onnx model folder \(no gpt2onnx.json\); export one with 'gpt2onnx export SOURCE OUTDIR'"),
]
IDS = [c[0] for c in DAMAGE]
CONTENT_ONLY = {"data-truncated-rehashed", "tokenizer-corrupt", "tokenizer-of-another-model"}

PROBE = r"""
import contextlib, io, json, sys
import gpt2onnx
from gpt2onnx import cli

for name, folder, verify in json.load(sys.stdin):
    print(json.dumps({"start": name}), flush=True)  # the last line names the folder if this process dies
    out = {"name": name}
    try:
        g = gpt2onnx.load(folder, threads=1, verify_hashes=verify)
        out["load"] = ["ok", g.generate(["hi there", ""], max_new_tokens=4)[0].text]
    except Exception as e:
        out["load"] = [type(e).__name__, str(e)]
    if verify:
        for cmd in (["generate", folder, "hi", "--threads", "1"], ["inspect", folder]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(cmd)
            out[cmd[0]] = [rc, err.getvalue()]
    print(json.dumps(out), flush=True)
"""


def probe(folders: dict) -> dict:
    """Load every damaged folder ({case: folder}) in one subprocess, with the API, `gpt2onnx generate`
    and `gpt2onnx inspect`; returns {case: results}. A native crash fails naming the folder."""
    cases = [[name, folders[name], verify] for name, _, verify, _ in DAMAGE]
    r = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(cases), capture_output=True, text=True,
                       timeout=300)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    last = lines[-1] if lines else "?"
    assert r.returncode == 0, f"the loader died (rc {r.returncode}) on {last}: {r.stderr[-2000:]}"
    return {x["name"]: x for x in lines if "start" not in x}

# The other surfaces (run_batch, Azure ML init) refuse the same folders with the same line.
SURFACE_CASES = ["data-flipped-byte", "manifest-newer", "optimum-folder", "tokenizer-of-another-model",
                 "dims-n_layer-string"]


def make_damaged(tiny_int8: str, root) -> dict:
    """Copy `tiny_int8` once per case of `DAMAGE` under `root` and damage it; returns {case: folder}."""
    folders = {}
    for name, damage, _, _ in DAMAGE:
        d = str(root / name)
        shutil.copytree(tiny_int8, d)
        damage(d)
        folders[name] = d
    return folders
