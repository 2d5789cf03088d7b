"""Benchmarks and per-SKU reports.

For example::

    from gpt2onnx.bench import run_bench, format_table
    rec = run_bench("models/gpt2-int8", batch_sizes=[1, 8], out_dir="results")
    print(format_table(rec))

Modules: `run` (`run_bench`: the grid, the record), `worker` (one measurement in a fresh
process: ``python -m gpt2onnx.bench.worker``), `ovgenai` (the OpenVINO GenAI baseline in it), `runs` (which baselines can run, the
worker call, result rows, weight bytes), `env` (the machine, memory bandwidth), `record`
(the record schema, load/dump, ratios), `table` (a record as a terminal table), `report`
(records of many machines -> report.md/html with plots and a VM recommendation), `skus`
(the Azure VM catalog, prices, CPU checks).
"""

from .env import BANDWIDTH_MIB, environment, git_revision, measure_bandwidth
from .run import BASELINES, parse_int_list, record_path, run_bench
from .runs import onnx_weight_bytes
from .table import format_table

__all__ = ["BANDWIDTH_MIB", "BASELINES", "environment", "format_table", "git_revision", "measure_bandwidth",
           "onnx_weight_bytes", "parse_int_list", "record_path", "run_bench"]
