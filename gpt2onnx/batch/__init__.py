"""Batch jobs over an in-memory core: ordered, resumable, one error row per bad request.

For example::

    from gpt2onnx.batch import iter_results, run_batch
    run_batch("out/gpt2-int8", "prompts.jsonl", "out.jsonl", batch_size=8)
    list(iter_results(gen, [{"id": "a", "prompt": "Hi"}], params={"max_new_tokens": 5}))
    # [{'id': 'a', 'line': 1, 'index': 0, 'text': 'Hi, ...', 'prompt_tokens': 1, ...}]

Modules: `rows` (a request -> rows), `core` (`iter_results`: prepare, batch by length,
generate, in input order), `state` (the output file, its ``.state`` sidecar, resume,
locked fsynced appends), `job` (`run_batch`: the core over files), `pool` (``workers=N``:
the core in N processes, the output still written by one).
"""

from ..errors import BatchError
from .core import MAX_BATCH_SIZE, iter_results
from .job import BatchSummary, run_batch
from .rows import MAX_PROMPTS_PER_LINE
from .state import STATE_FORMAT, STATE_VERSION

__all__ = ["MAX_BATCH_SIZE", "MAX_PROMPTS_PER_LINE", "STATE_FORMAT", "STATE_VERSION", "BatchError", "BatchSummary",
           "iter_results", "run_batch"]
