"""Generate for a JSONL or Parquet file of prompts with Ray Data, one model per actor.

    pip install 'gpt2onnx[ray]'
    python examples/ray_batch.py models/gpt2-int8 prompts.jsonl results/ --threads 2
    python examples/ray_batch.py models/gpt2-int8 s3://bucket/prompts/ results/ --input-format parquet \\
        --format parquet --address auto --actors 16 --threads 2 --params '{"max_new_tokens": 40}'

Input rows need a ``prompt`` column; ``id`` and generation parameters (``seed``,
``max_new_tokens``, ...) are optional columns. The output folder gets files of rows with
``id``, ``prompt``, ``text``, ``prompt_tokens``, ``generated_tokens``, ``finish_reason``
and ``error``. Size actors x threads to the physical cores (docs/ray.md).
"""

from __future__ import annotations

import argparse
import json
import os

import ray

from gpt2onnx.cpu import physical_cores
from gpt2onnx.integrations.ray import generate_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="model folder (on every node)")
    p.add_argument("input", help="JSONL or Parquet file or folder")
    p.add_argument("output", help="output folder")
    p.add_argument("--input-format", choices=("auto", "json", "parquet"), default="auto",
                   help="input format (default: parquet for *.parquet files or folders of them, else json)")
    p.add_argument("--format", choices=("json", "parquet"), default="json", help="output format (default json)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per actor (default 1)")
    p.add_argument("--actors", type=int, help="model replicas (default: this machine's physical cores / threads)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per model call (default 8)")
    p.add_argument("--params", default="{}", help="job defaults as JSON, e.g. '{\"max_new_tokens\": 40}'")
    p.add_argument("--address", help="Ray cluster address ('auto' to join a running cluster; default: start one)")
    a = p.parse_args(argv)

    actors = a.actors or max(1, physical_cores() // a.threads)
    started = not ray.is_initialized()
    if started:
        ray.init(address=a.address, include_dashboard=False)
    try:
        parquet = a.input_format == "parquet" or (a.input_format == "auto" and _is_parquet(a.input))
        ds = ray.data.read_parquet(a.input) if parquet else ray.data.read_json(a.input)
        out = generate_dataset(ds, a.model_dir, actors=actors, threads=a.threads, batch_size=a.batch_size,
                               params=json.loads(a.params))
        (out.write_parquet if a.format == "parquet" else out.write_json)(a.output)
        print(f"wrote {a.output} ({actors} actors x {a.threads} threads)")
    finally:
        if started:
            ray.shutdown()
    return 0


def _is_parquet(path: str) -> bool:
    if os.path.isdir(path):
        return any(name.endswith(".parquet") for name in os.listdir(path))
    return path.rstrip("/").endswith(".parquet")


if __name__ == "__main__":
    raise SystemExit(main())
