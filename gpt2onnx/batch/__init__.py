"""Batch jobs over JSONL files: ordered, resumable, one error row per bad line.

>>> from gpt2onnx.batch import run_batch
>>> run_batch("out/gpt2-int8", "prompts.jsonl", "out.jsonl", batch_size=8)   # doctest: +SKIP

Modules: `rows` (an input line -> rows, validated), `state` (the output file, its
``.state`` sidecar, resume, locked fsynced appends), `job` (`run_batch`: the loop).
"""

from ..errors import BatchError
from .job import MAX_BATCH_SIZE, BatchSummary, run_batch
from .rows import MAX_PROMPTS_PER_LINE
from .state import STATE_FORMAT, STATE_VERSION

__all__ = ["MAX_BATCH_SIZE", "MAX_PROMPTS_PER_LINE", "STATE_FORMAT", "STATE_VERSION", "BatchError", "BatchSummary",
           "run_batch"]
