"""Batch jobs over several worker processes (``run_batch(..., workers=N)``, ``gpt2onnx batch --workers N``).

>>> from gpt2onnx.batch import run_batch
>>> run_batch("out/gpt2-int8", "in.jsonl", "out.jsonl", workers=2)   # doctest: +SKIP
BatchSummary(rows=1000, ok=1000, errors=0, ...)

The parent reads the input, cuts the rows still to do into contiguous chunks of
`CHUNK_BATCHES` x batch size rows, and hands each chunk to a worker process, which runs
it through the same core as a one-process job (`gpt2onnx.batch.core.iter_batches` over
its own `Generator`, loaded once). The parent stays the only writer of OUTPUT and its
``.state``: it writes the chunks back in input order as their head completes, so
resume, ordering and error rows are exactly those of ``workers=1``::

    input ─> rows ─> chunk 1 ─> worker A ─┐
                     chunk 2 ─> worker B ─┤   at most IN_FLIGHT chunks per worker
                     chunk 3 ─> (queued) ─┤
                     <── in order: chunk 1, chunk 2, ... ─> Writer (fsync)

Why `concurrent.futures.ProcessPoolExecutor` over a 'spawn' context and not
`multiprocessing.Pool` or a scheduler of our own: the executor notices a worker that
dies (its futures fail with `BrokenProcessPool`) where `Pool` waits forever for the lost
task; 'spawn' starts each worker from a fresh interpreter, and onnxruntime sessions
(their thread pools) must never be forked.

A worker that dies (killed, out of memory) stops the job with a one-line `BatchError`;
its chunk is not retried: a row that killed a worker would most likely kill the next
one too, and the rows already written are kept, so rerunning the same job resumes it.
Every worker exits when the parent goes away (a SIGKILL of the parent leaves no orphan
holding a model in memory).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from .. import cpu
from ..errors import BatchError, InvalidRequestError
from .rows import Row

CHUNK_BATCHES = 8  # rows per chunk = 8 x batch size: long enough that a chunk's tail (slots draining) stays small
IN_FLIGHT = 2  # chunks per worker handed out ahead: one running, one waiting, so a worker never idles
PARENT_POLL_S = 1.0  # how often a worker checks that its parent is alive

_gen = None  # the worker's Generator (or the exception its load raised)


def check_workers(workers, threads) -> int:
    """The intra-op threads per worker; raises a one-line `InvalidRequestError` on a bad count."""
    limit = max(cpu.physical_cores(), len(cpu.allowed_cpus()))
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= limit:
        raise InvalidRequestError(f"workers must be an integer from 1 to {limit} (the cores this process may use), "
                                  f"got {workers!r}; use --workers 1 for one process")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
    return threads or max(1, cpu.physical_cores() // workers)


def iter_pool(model_dir: str, rows: Iterable[Row], *, workers: int, threads: int, batch_size: int,
              batching: str, prefix_cache_mb: float = 0, counts: list | None = None) -> Iterator[list[Row]]:
    """Like `core.iter_batches`, over `workers` processes: yields finished rows, in input order.

    `counts`: a one-item list whose `PrefixStats` grows by each chunk's prefix-cache counts.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cpu.warn_oversubscribed(workers * threads)
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                             initargs=(model_dir, threads, os.getpid()))
    pending: deque = deque()  # (rows of a chunk, future or None when no row needs a model)
    finished = False
    try:
        for chunk in _chunks(rows, CHUNK_BATCHES * batch_size):
            todo = [(r.key, r.id, r.line, r.index, r.prompt, r.params) for r in chunk if r.out is None]
            pending.append((chunk, ex.submit(_run_chunk, todo, batch_size, batching, prefix_cache_mb) if todo
                            else None))
            while pending and (len(pending) > IN_FLIGHT * workers or pending[0][1] is None or pending[0][1].done()):
                yield _collect(*pending.popleft(), counts)
        while pending:
            yield _collect(*pending.popleft(), counts)
        finished = True
    finally:
        if not finished:  # an error, Ctrl-C or the caller stopped: end the workers now, not after their chunk
            _kill_workers(ex)
        ex.shutdown(wait=finished, cancel_futures=True)


def _chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _collect(chunk: list[Row], future, counts: list | None = None) -> list[Row]:
    """Wait for a chunk and fill its pending rows' outputs (an error row of the parent keeps its own)."""
    if future is not None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            outs, stats = future.result()
            outs = iter(outs)
        except BrokenProcessPool:
            raise BatchError(f"a worker process died (killed, or out of memory?) while generating input line "
                             f"{chunk[0].line} onwards; the rows written so far are kept: rerun the same job to "
                             "resume, with fewer workers if it happens again") from None
        for row in chunk:
            if row.out is None:
                row.out = next(outs)
        if counts is not None:
            counts[0] = counts[0] + stats
    return chunk


def _kill_workers(ex) -> None:
    # ProcessPoolExecutor has no public way to stop running workers before Python 3.14
    # (terminate_workers); its process table is the documented-by-source way until then.
    stop = getattr(ex, "terminate_workers", None)
    if stop is not None:
        stop()
        return
    for p in list((getattr(ex, "_processes", None) or {}).values()):
        try:
            p.kill()
        except (OSError, ValueError):
            pass  # already gone


# -- the worker side ------------------------------------------------------------------


def _init(model_dir: str, threads: int, parent: int) -> None:
    """Load the worker's Generator once; ignore Ctrl-C (the parent handles it) and exit with the parent."""
    global _gen
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        from ..runtime import load

        _gen = load(model_dir, threads=threads, verify_hashes=False)  # the parent verified the folder
    except Exception as e:  # raised again by the first chunk, so the parent shows the real reason
        _gen = e


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _run_chunk(todo: list[tuple], batch_size: int, batching: str, prefix_cache_mb: float = 0) -> tuple[list[dict], object]:
    """The chunk's output rows, and the worker's prefix-cache counts over it (a `PrefixStats`)."""
    from .core import iter_batches

    if isinstance(_gen, Exception):
        raise _gen
    rows = [Row(key, id_, line, index, prompt, params) for key, id_, line, index, prompt, params in todo]
    before = _gen.prefix_cache_stats()
    outs = [r.out for ready in iter_batches(_gen, rows, batch_size=batch_size, batching=batching,
                                            prefix_cache_mb=prefix_cache_mb) for r in ready]
    return outs, _gen.prefix_cache_stats().since(before)
