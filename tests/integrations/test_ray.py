"""Ray Data: the predictor gives what the single-process batch job gives, every row exactly once."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

import gpt2onnx
from gpt2onnx.batch import run_batch
from gpt2onnx.batch.rows import NO_PROMPT
from gpt2onnx.errors import ArtifactError, InvalidRequestError
from gpt2onnx.integrations.ray import Gpt2OnnxPredictor, generate_dataset

from helpers.paths import REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

N_PROMPTS = 240
PARAMS = {"max_new_tokens": 5}
WORDS = ["The tower is", "In 1998 the", "A", "It was", "Valkyria Chronicles III is", "The game", ""]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _requests() -> list[dict]:
    out = []
    for i in range(N_PROMPTS):
        r = {"id": f"r{i}", "prompt": f"{WORDS[i % len(WORDS)]} {i}".strip()}
        if i % 2:  # half sampled with a fixed seed, half greedy
            r.update(do_sample=True, seed=i, temperature=0.9)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    old = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "GPT2ONNX_THREADS")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 * 1024**2)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _bounded():
    """A stuck Ray job fails the test after two minutes instead of hanging the suite."""

    def expire(*_):
        raise TimeoutError("Ray test took over 120 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_predictor_matches_generator_in_process(tiny_int8):
    gen = gpt2onnx.load(tiny_int8, threads=1)
    pred = Gpt2OnnxPredictor(tiny_int8, threads=1, params=PARAMS, batch_size=2)
    batch = {
        "id": np.array(["a", "b", "c", "d"], dtype=object),
        "prompt": np.array(["The tower is", "In 1998 the", "A", "It was"], dtype=object),
        # per-row params; NaN/None keep the job default; a float column of whole numbers is fine (Arrow nulls)
        "seed": np.array([np.nan, 3.0, np.nan, 4.0]),
        "do_sample": np.array([None, True, None, True], dtype=object),
        "top_p": np.array([np.nan, np.nan, 5.0, np.nan]),
    }
    out = pred(batch)
    assert list(out["id"]) == ["a", "b", "c", "d"]
    assert out["text"][0] == gen.generate("The tower is", **PARAMS)[0].text
    assert out["text"][1] == gen.generate("In 1998 the", **PARAMS, do_sample=True, seed=3)[0].text
    assert out["text"][2] is None and "top_p" in out["error"][2]
    assert out["text"][3] == gen.generate("It was", **PARAMS, do_sample=True, seed=4)[0].text
    assert list(out["error"][[0, 1, 3]]) == [None, None, None]
    assert list(out["generated_tokens"]) == [5, 5, 0, 5]


def test_bad_inputs_are_clear(tiny_int8, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist.*Ray node"):
        Gpt2OnnxPredictor(str(tmp_path / "missing"))
    with pytest.raises(InvalidRequestError, match="top_p"):
        Gpt2OnnxPredictor(tiny_int8, params={"top_p": 0})
    with pytest.raises(InvalidRequestError, match="batch_size"):
        Gpt2OnnxPredictor(tiny_int8, batch_size=0)
    pred = Gpt2OnnxPredictor(tiny_int8, threads=1)
    out = pred({"text": np.array(["x", "y"], dtype=object)})  # a block without the column: error rows, not a crash
    assert list(out["error"]) == [NO_PROMPT, NO_PROMPT] and list(out["prompt"]) == [None, None]


def test_bad_rows_become_error_rows_and_the_others_are_generated(tiny_int8):
    """Each bad row gets the message `gpt2onnx batch` gives the same line; none stops the batch."""
    gen = gpt2onnx.load(tiny_int8, threads=1)
    pred = Gpt2OnnxPredictor(tiny_int8, threads=1, params=PARAMS, batch_size=2)
    batch = {
        "id": np.array(["ok1", "typo", "none", "int", "dict", "long", "ok2"], dtype=object),
        "prompt": np.array(["The tower is", "hi", None, 42, {"a": 1}, "the " * 80, "It was"], dtype=object),
        "tempreature": np.array([None, 0.5, None, None, None, None, None], dtype=object),
        "max_new_tokens": np.array([np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 3.0]),
        "note": np.array(["kept out"] * 7, dtype=object),  # not a parameter name: ignored
    }
    out = pred(batch)
    err = dict(zip(out["id"], out["error"]))
    assert err["typo"].startswith("unknown generation parameter 'tempreature'; did you mean 'temperature'?")
    assert err["none"] == NO_PROMPT
    assert err["int"] == "prompt must be a string, got int" and err["dict"] == "prompt must be a string, got dict"
    assert "exceeds the context of 64 tokens" in err["long"]
    assert all("\n" not in e for e in err.values() if e)
    assert out["text"][0] == gen.generate("The tower is", **PARAMS)[0].text
    assert out["text"][6] == gen.generate("It was", max_new_tokens=3)[0].text
    assert [err["ok1"], err["ok2"]] == [None, None] and list(out["generated_tokens"][1:6]) == [0] * 5


def test_ray_dataset_matches_the_batch_job(ray_local, tiny_int8, tmp_path):
    ray = ray_local
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _requests()), encoding="utf-8")
    run_batch(tiny_int8, str(src), str(tmp_path / "single.jsonl"), batch_size=8, params=PARAMS, progress=False,
              threads=1)
    want = {r["id"]: r for r in read_jsonl(str(tmp_path / "single.jsonl"))}
    assert len(want) == N_PROMPTS and not [r for r in want.values() if "error" in r]

    # Several blocks, so two actors can get work; actors x threads = all CPUs of this cluster, the
    # case a fixed actor pool would deadlock on (the read tasks get no CPU).
    ds = ray.data.read_json(str(src)).repartition(6)
    out = generate_dataset(ds, tiny_int8, actors=2, threads=1, params=PARAMS, batch_size=8,
                           rows_per_call=32).take_all()
    ids = [r["id"] for r in out]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids))  # every row exactly once
    for r in out:
        w = want[r["id"]]
        assert (r["text"], r["generated_tokens"], r["finish_reason"], r["error"]) == \
               (w["text"], w["generated_tokens"], w["finish_reason"], None), r["id"]


def test_bad_rows_do_not_stop_the_ray_job(ray_local, tiny_int8):
    ray = ray_local
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({
        "id": ["typo", "ok", "none", "int", "bad-param"],
        "prompt": ["hi", "The tower is", None, 42, "It was"],  # a mixed-type column (object dtype)
        "tempreature": [0.5, None, None, None, None],
        "max_new_tokens": [None, None, None, None, 0],
    })
    out = generate_dataset(ray.data.from_pandas(df), tiny_int8, actors=1, threads=1, params=PARAMS).take_all()
    by_id = {r["id"]: r for r in out}
    assert sorted(by_id) == sorted(df["id"])
    assert "did you mean 'temperature'?" in by_id["typo"]["error"]
    assert by_id["none"]["error"] == NO_PROMPT
    assert by_id["int"]["error"] == "prompt must be a string, got int"
    assert "max_new_tokens must be an integer" in by_id["bad-param"]["error"]
    gen = gpt2onnx.load(tiny_int8, threads=1)
    assert (by_id["ok"]["text"], by_id["ok"]["error"]) == (gen.generate("The tower is", **PARAMS)[0].text, None)


def test_missing_model_folder_on_a_node_fails_the_job_clearly(ray_local, tmp_path):
    ray = ray_local
    ds = ray.data.from_items([{"prompt": "x"}] * 4)
    with pytest.raises(Exception, match="does not exist") as info:
        generate_dataset(ds, str(tmp_path / "not-on-this-node"), actors=1).take_all()
    assert "Ray node" in str(info.value)


def test_example_reads_parquet_and_writes_json(ray_local, tiny_int8, tmp_path):
    import glob
    import runpy

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = _requests()[:20]
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "prompt": r["prompt"]} for r in rows]),
                   str(tmp_path / "in.parquet"))
    example = runpy.run_path(os.path.join(REPO, "examples", "ray_batch.py"))
    assert example["main"]([tiny_int8, str(tmp_path / "in.parquet"), str(tmp_path / "out"), "--actors", "1",
                            "--params", json.dumps(PARAMS)]) == 0
    out = [json.loads(line) for f in glob.glob(str(tmp_path / "out" / "*.json")) for line in open(f)]
    gen = gpt2onnx.load(tiny_int8, threads=1)
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    texts = {r["id"]: r["text"] for r in out}
    assert [texts[r["id"]] for r in rows] == [x.text for x in gen.generate([r["prompt"] for r in rows], **PARAMS)]
