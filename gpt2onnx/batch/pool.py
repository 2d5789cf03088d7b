"""Batch jobs over several worker processes (``run_batch(..., workers=N)``, ``gpt2onnx batch --workers N``).

For example::

    from gpt2onnx.batch import run_batch
    run_batch("out/gpt2-int8", "in.jsonl", "out.jsonl", workers=2)   # BatchSummary(rows=1000, ok=1000, ...)

Each worker process loads the model once (before the job's output is created) and runs
one long continuous batch over the rows it is handed (`gpt2onnx.batch.core.iter_batches`
over its own `Generator`), taking the next row into a slot as soon as one frees. The
parent reads the input and hands out rows one at a time, each to the worker with the
fewest rows in hand, keeping each worker `LOOKAHEAD` batches ahead so a free slot never
waits for the parent: a job of 12 rows on 2 workers gives each 6. A worker sends every
row back the moment it is finished (or refused), out of order: a row held back behind a
long one would count against the worker's share while its slot waits for a new row, and
both sides would wait forever. The parent puts them in input order (`core.Window`) and
writes the finished head of the input at once, so the output is flushed as rows complete,
as with one process. The parent stays the only writer of OUTPUT and its ``.state``;
resume, ordering and error rows are exactly those of ``workers=1``::

    input ─> rows ─> row 1 ─> worker A ─┐   (row 2 ─> worker B, row 3 ─> A, ...: the least busy)
                     window (input order) <── finished rows, as they finish
                     └─> the finished head, in order ─> Writer (fsync)

Why processes with a pipe each (`multiprocessing`, 'spawn') and not a
`concurrent.futures` pool: a pool hands out whole tasks and answers once per task, so the
rows of a task reach the output only when its last row ends, and a small job is one task
on one worker. Here rows stream both ways. 'spawn' starts each worker from a fresh
interpreter: onnxruntime sessions (their thread pools) must never be forked. A worker
that dies (killed, out of memory) is seen through its process sentinel
(`multiprocessing.connection.wait`) and stops the job with a one-line `BatchError`; its
rows are not retried (a row that killed a worker would most likely kill the next one
too), the rows already written are kept, and rerunning the same job resumes it. Every
worker exits when the parent goes away (a SIGKILL of the parent leaves no orphan holding
a model in memory).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterable, Iterator

from .. import cpu
from .._prefix import PrefixStats
from ..errors import BatchError, InvalidRequestError
from .core import WINDOW_BATCHES, Window, iter_batches, prepare_row
from .rows import Row

LOOKAHEAD = 1  # batches of rows each worker holds beyond its slots: a freed slot takes the next one at once
PARENT_POLL_S = 1.0  # how often a worker checks that its parent is alive
JOIN_S = 10.0  # how long the parent waits for a worker to exit


def check_workers(workers, threads) -> int:
    """The intra-op threads per worker; raises a one-line `InvalidRequestError` on a bad count."""
    limit = max(cpu.physical_cores(), len(cpu.allowed_cpus()))
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= limit:
        raise InvalidRequestError(f"workers must be an integer from 1 to {limit} (the cores this process may use), "
                                  f"got {workers!r}; use --workers 1 for one process")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
    return threads or max(1, cpu.physical_cores() // workers)


def iter_pool(pool: "Workers", rows: Iterable[Row]) -> Iterator[list[Row]]:
    """Like `core.iter_batches`, over the worker processes of `pool`: yields finished rows, in input order.

    The workers are stopped when this ends, fails or is closed.
    """
    window = Window()
    rows = iter(rows)
    more = finished = False
    try:
        more = True
        while True:
            while more and pool.has_room():
                row = next(rows, None)
                if row is None:
                    more = False
                    pool.end_input()
                    break
                if window.add(row).out is None:
                    pool.submit(row)
                elif head := window.pop_done():  # an error row of the parent at the head
                    yield head
            if head := window.pop_done():
                yield head
            if not more and not pool.busy:
                break
            pool.receive()  # blocks until a worker sends rows back (or fails)
        finished = True
    finally:
        pool.stop(kill=not finished)  # an error, Ctrl-C or the caller stopped: end the workers now


class Workers:
    """The worker processes, a pipe to each, and which rows each holds.

    Made before the job's output: it returns once every worker has loaded the model, so a
    folder that fails to load (a tokenizer of another model, weights onnxruntime refuses)
    stops the job before OUTPUT is created, with the worker's own one-line error.
    """

    def __init__(self, model_dir: str, workers: int, *, threads: int, batch_size: int, batching: str,
                 prefix_cache_mb: float = 0):
        import multiprocessing

        cpu.warn_oversubscribed(workers * threads)
        ctx = multiprocessing.get_context("spawn")
        # static batching reads WINDOW_BATCHES batches ahead before it runs one: hand out that many
        self.per_worker = ((WINDOW_BATCHES if batching == "static" else 1) + LOOKAHEAD) * batch_size
        self.conns, self.procs = [], []
        self.held: list[dict[int, Row]] = [{} for _ in range(workers)]  # worker -> {row key: row}
        self.ended = [False] * workers
        self.loaded = [False] * workers
        self.stats = [PrefixStats()] * workers  # each worker's prefix-cache counts over this job
        try:
            for _ in range(workers):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=_work, args=(theirs, model_dir, threads, os.getpid(), batch_size, batching,
                                                     prefix_cache_mb),
                                daemon=True, name="gpt2onnx-batch-worker")
                p.start()
                theirs.close()
                self.conns.append(mine)
                self.procs.append(p)
            while not all(self.loaded):
                self.receive()
        except BaseException:
            self.stop(kill=True)
            raise

    def prefix_stats(self) -> PrefixStats:
        """The workers' prefix-cache counts over this job, summed."""
        return sum(self.stats, PrefixStats())

    @property
    def busy(self) -> bool:
        return any(self.held)

    def _least_busy(self) -> int:
        return min(range(len(self.held)), key=lambda w: len(self.held[w]))

    def has_room(self) -> bool:
        return len(self.held[self._least_busy()]) < self.per_worker

    def submit(self, row: Row) -> None:
        w = self._least_busy()
        self.held[w][row.key] = row
        try:
            self.conns[w].send(row)
        except OSError:  # its end of the pipe is gone: the worker died
            self._died(w)

    def end_input(self) -> None:
        for w, conn in enumerate(self.conns):
            try:
                conn.send(None)
            except OSError:
                self._died(w)

    def receive(self) -> None:
        """Wait for a message from any worker (or its death); fill the outputs of the rows it finished."""
        from multiprocessing.connection import wait

        live = [w for w in range(len(self.procs)) if not self.ended[w]]
        by_handle = {self.conns[w]: w for w in live} | {self.procs[w].sentinel: w for w in live}
        for handle in wait(list(by_handle)):
            w = by_handle[handle]
            while not self.ended[w] and self.conns[w].poll():
                try:
                    msg = self.conns[w].recv()
                except (EOFError, OSError):  # the pipe closed without an "end": the worker is gone
                    self._died(w)
                self._handle(w, msg)
            if handle is self.procs[w].sentinel and not self.ended[w]:
                self._died(w)

    def _handle(self, w: int, msg) -> None:
        kind, value = msg
        if kind == "rows":
            value, self.stats[w] = value
            for key, out in value:
                row = self.held[w].pop(key)
                row.out, row.worker = out, w
        elif kind == "loaded":
            self.loaded[w] = True
        elif kind == "end":
            self.ended[w] = True
        else:  # "error": the worker's exception (a model that fails to load, a bug), raised here
            raise value

    def _died(self, w: int):
        line = min((r.line for r in self.held[w].values()), default=None)
        where = (f"generating input line {line} onwards" if line is not None else "generating" if all(self.loaded)
                 else "loading the model")
        raise BatchError(f"a worker process died (killed, or out of memory?) while {where}; the rows "
                         "written so far are kept: rerun the same job to resume, with fewer workers if it happens "
                         "again")

    def stop(self, *, kill: bool) -> None:
        for p in self.procs:
            if kill and p.is_alive():
                p.kill()
        for p, conn in zip(self.procs, self.conns):
            p.join(JOIN_S)
            if p.is_alive():
                p.kill()
                p.join(JOIN_S)
            conn.close()


# -- the worker side ------------------------------------------------------------------


def _work(conn, model_dir: str, threads: int, parent: int, batch_size: int, batching: str,
          prefix_cache_mb: float) -> None:
    """A worker: load the model once, then run every row the parent sends in one continuous batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        from ..runtime import load

        gen = load(model_dir, threads=threads, verify_hashes=False)  # the parent verified the folder
        conn.send(("loaded", None))
        before = gen.prefix_cache_stats()

        def send(done: list) -> None:  # finished rows and this worker's prefix-cache counts so far
            conn.send(("rows", ([(r.key, r.out) for r in done], gen.prefix_cache_stats().since(before))))

        inbox: queue.SimpleQueue = queue.SimpleQueue()
        # a thread empties the pipe at once, so the parent's sends never wait for a free slot here
        threading.Thread(target=_receive, args=(conn, inbox), daemon=True).start()

        def rows() -> Iterator[Row]:  # every row goes back the moment it is done, a refused one too:
            while (row := inbox.get()) is not None:  # the parent counts on it to hand out more
                if prepare_row(gen, row).out is not None:
                    send([row])
                else:
                    yield row

        for done in iter_batches(gen, rows(), batch_size=batch_size, batching=batching, ordered=False,
                                 prefix_cache_mb=prefix_cache_mb):
            send(done)
        conn.send(("end", None))
    except OSError:  # the pipe is gone: the parent stopped (it kills the workers) or died
        os._exit(1)
    except BaseException as e:  # sent to the parent, which raises it: the real reason, in one line
        try:
            conn.send(("error", e))
        except OSError:
            os._exit(1)
        except Exception:  # an exception that does not pickle
            conn.send(("error", BatchError(f"a worker failed: {type(e).__name__}: {e}")))


def _receive(conn, inbox: queue.SimpleQueue) -> None:
    while True:
        try:
            inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)
            return


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
