"""The in-memory batch core: requests in, one output row per prompt out, in input order.

For example::

    from gpt2onnx.batch import iter_results
    requests = [{"id": "a", "prompt": "Hello"}, {"input_data": ["Hi", 3]}, {"prompt": "x", "tempreature": 1}]
    for row in iter_results(gen, requests, params={"max_new_tokens": 5}):
        print(row["id"], row.get("text") or row["error"])
    # a Hello, I'm ...
    # 2:0 Hi, ...
    # 2:1 prompt must be a string, got int
    # line-3 unknown generation parameter 'tempreature'; did you mean 'temperature'? allowed: ...

Every entry that runs many prompts goes through here: `gpt2onnx batch` / `run_batch`
(which adds the output file, its ``.state``, resume, the lock and fsync), Azure ML batch
and Ray. A row's parameters are merged onto the job's and checked once when it is parsed
(`gpt2onnx.batch.rows`); its prompt is prepared (`Generator.prepare`: prompt, context
room) once, when it is read. A refused row becomes an error row on the spot (shaped, like
every output row, by `rows.output_row`), and only good `Request`s reach the generator.

Continuous batching (the default): `Generator.generate_iterable` keeps `batch_size`
rows decoding; when one finishes, the next row is read, prepared and prefilled into its
slot. Rows finish out of order; the window holds them until the head of the input is
done (`Window`, also used by static batching and the worker pool), so the output stays
in input order::

    requests ─> rows (parse) ─> prepared when read ─> generate_iterable (slots) ─┐
                    window (input order) <── row finished: `complete` ──────────┘
                    └─> the finished head, in order ─> out

Static batching (``batching="static"``, for comparison): a batch = the oldest pending
row + the pending rows closest to it in prompt length, run to the end by
`Generator.generate_batch` before the next starts. Both give every row exactly the tokens
it gives alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

from .._prefix import DEFAULT_MB, capacity_bytes
from ..errors import InvalidRequestError
from ..params import GenerationParams, resolve
from .rows import Row, error_row, output_row, parse_request

WINDOW_BATCHES = 8  # static batching: rows read ahead = 8 x batch size: room to group by length
PREFIX_CACHE_MB = DEFAULT_MB  # jobs keep full prompt blocks for later prompts that start with them (0 = off)
MAX_BATCH_SIZE = 1024
BATCHING = ("continuous", "static")  # what `batching=` and `gpt2onnx batch --batching` take


def iter_results(generator, requests: Iterable[dict | None], *, batch_size: int = 8,
                 params: GenerationParams | dict | None = None, batching: str = "continuous",
                 prefix_cache_mb: float = PREFIX_CACHE_MB) -> Iterator[dict]:
    """Generate for batch requests held in memory; yields one output row per prompt, in input order.

    Args:
        generator: a loaded `Generator`.
        requests: batch-line objects, ``{"id", "prompt", <params>}`` or ``{"input_data":
            [...], "params": {...}}``; request n (from 1) gives rows with ``"line": n``.
            None stands for a blank line: no row, but the numbering goes on.
        batch_size: prompts per model call; pending prompts of similar length are batched.
        params: job defaults (a `GenerationParams` or a dict); a request's own win.
        batching: ``"continuous"`` (a finished row's slot is refilled at once) or
            ``"static"`` (batches of similar-length prompts, each run to its end).
        prefix_cache_mb: MiB of the generator's prefix cache (full prompt blocks reused by
            later prompts that start with them; same output); 0 turns it off.

    Yields:
        ``{"id", "line", "index", "text", "prompt_tokens", "generated_tokens",
        "finish_reason", "seconds"}``, or ``{"id", "line", "index", "error"}`` for a
        prompt that cannot be generated (the one-line reason); the others go on.

    Raises:
        InvalidRequestError: `batch_size` or `params` is invalid (at the call).
    """
    check_batch_size(batch_size)
    check_batching(batching)
    capacity_bytes(prefix_cache_mb)  # a bad budget fails here too
    base = resolve(params)  # a bad job setting fails here, before any row is read

    def rows() -> Iterator[Row]:
        for n, obj in enumerate(requests, start=1):
            if obj is not None:
                yield from parse_request(n, obj, base)

    return (row.out for ready in iter_batches(generator, rows(), batch_size=batch_size, batching=batching,
                                              prefix_cache_mb=prefix_cache_mb)
            for row in ready)


class Window:
    """Rows in input order, finished or not: the output advances only at its head.

    Every way of running rows (continuous, static, worker processes) finishes them out of
    order and hands them on through here, so the output stays in input order.
    """

    def __init__(self):
        self.rows: deque[Row] = deque()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def pop_done(self, ordered: bool = True) -> list[Row]:
        """The finished rows at the head, removed (empty while the head row is still running); with
        `ordered` False, every finished row."""
        if not ordered:
            done = [r for r in self.rows if r.out is not None]
            if done:
                self.rows = deque(r for r in self.rows if r.out is None)
            return done
        out = []
        while self.rows and self.rows[0].out is not None:
            out.append(self.rows.popleft())
        return out


def iter_batches(generator, rows: Iterable[Row], *, batch_size: int, batching: str = "continuous",
                 ordered: bool = True, prefix_cache_mb: float = PREFIX_CACHE_MB) -> Iterator[list[Row]]:
    """Run parsed rows; yield the rows finished at the head of the input, in order, as the head advances.

    A pending row (``out`` None) is prepared when it is read; one that `Generator.prepare`
    refuses gets its error row there. Every yielded row has ``out``. With `ordered` False,
    every row is yielded as soon as it is finished, for a caller that puts them in order
    itself (a worker process of `gpt2onnx.batch.pool`).
    """
    if batching == "static":
        return _static(generator, rows, batch_size, ordered, prefix_cache_mb)
    return _continuous(generator, rows, batch_size, ordered, prefix_cache_mb)


def _continuous(generator, rows: Iterable[Row], batch_size: int, ordered: bool,
                prefix_cache_mb: float) -> Iterator[list[Row]]:
    window = Window()
    started: dict[int, tuple[Row, float]] = {}

    def requests():  # pulled by the scheduler whenever a slot is free
        n = 0
        for row in rows:
            window.add(prepare_row(generator, row))
            if row.out is None:
                started[n] = (row, time.perf_counter())  # n: the request's index in generate_iterable
                n += 1
                yield row.request

    for i, result in generator.generate_iterable(requests(), batch_size=batch_size, prefix_cache_mb=prefix_cache_mb):
        row, t0 = started.pop(i)
        complete(row, result, time.perf_counter() - t0)
        if head := window.pop_done(ordered):
            yield head
    if head := window.pop_done(ordered):  # error rows after the last generated one
        yield head


def complete(row: Row, result, seconds: float) -> None:
    """Fill a finished row's output (each generated row passes here once, in either batching mode)."""
    row.out = output_row(row, text=result.text, prompt_tokens=result.prompt_tokens,
                         generated_tokens=result.generated_tokens, finish_reason=result.finish_reason,
                         seconds=round(seconds, 6))


def _static(generator, rows: Iterable[Row], batch_size: int, ordered: bool,
            prefix_cache_mb: float) -> Iterator[list[Row]]:
    rows = iter(rows)
    window = Window()
    limit = WINDOW_BATCHES * batch_size
    exhausted = False
    while True:
        while not exhausted and len(window) < limit:
            row = next(rows, None)
            if row is None:
                exhausted = True
            else:
                window.add(prepare_row(generator, row))
        if not window:
            return
        pending = [r for r in window.rows if r.out is None]
        if pending:
            run_one_batch(generator, _pick_batch(pending, batch_size), prefix_cache_mb)
        if head := window.pop_done(ordered):
            yield head


def prepare_row(generator, row: Row) -> Row:
    """Check and tokenize a pending row (`Generator.prepare`) unless it is already; a refused one gets its error row."""
    if row.out is None and row.request is None:
        try:
            row.request = generator.prepare(row.prompt, row.params)
        except InvalidRequestError as e:
            row.out = error_row(row, str(e))
    return row


def run_one_batch(generator, batch: list[Row], prefix_cache_mb: float = 0) -> int:
    """Generate for prepared rows in one `generate_batch` call, filling each row's output; returns tokens generated."""
    t0 = time.perf_counter()
    results = generator.generate_batch([r.request for r in batch], prefix_cache_mb=prefix_cache_mb)
    share = (time.perf_counter() - t0) / len(batch)
    for r, res in zip(batch, results):
        complete(r, res, share)
    return sum(res.generated_tokens for res in results)


def _pick_batch(pending: list[Row], size: int) -> list[Row]:
    """The oldest pending row and the pending rows closest to it in length.

    Always taking the oldest row lets the in-order output advance after every batch;
    its companions are chosen by prompt length so the batch wastes little padding.
    """
    head, rest = pending[0], pending[1:]
    if len(rest) >= size:
        rest = sorted(rest, key=lambda r: abs(r.tokens - head.tokens))[: size - 1]  # stable: ties by input order
    return [head, *rest]


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InvalidRequestError(f"batch_size must be an integer in [1, {MAX_BATCH_SIZE}], got {batch_size!r}")


def check_batching(batching) -> None:
    if batching not in BATCHING:
        raise InvalidRequestError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
