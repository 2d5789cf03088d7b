"""Progress on stderr that reads well on a terminal and in a log file.

On a terminal it is a tqdm bar, redrawn in place. Anywhere else (a log file, CI, an Azure
ML job's output, a pipe) a redrawn bar leaves ``\\r`` debris, so it prints plain lines
instead, each complete: one per named step, or for counted work at most one every
`every` seconds plus one at the end::

    gpt2onnx export: build ONNX graph (step 2/6) 00:03
    gpt2onnx batch: 120/1000 rows (12%), 3.4 rows/s, ETA 04:18; 12.3 tok/s

>>> import io
>>> out = io.StringIO()
>>> with Progress("gpt2onnx batch", total=2, unit="rows", file=out, every=0) as p:
...     p.update(2)
>>> out.getvalue().splitlines()[-1].startswith("gpt2onnx batch: 2/2 rows (100%)")
True

Counted work (batch rows, eval windows): ``update(n)``, ``total`` may grow, ``set_postfix``.
Named steps (export): ``step(desc)`` starts the next step, ``note(desc)`` renames it.
"""

from __future__ import annotations

import sys
import time

EVERY_S = 10.0  # seconds between plain progress lines of counted work


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A progress display on `file` (default stderr): a bar on a terminal, plain lines elsewhere.

    Args:
        desc: what is progressing, e.g. ``"gpt2onnx batch"``; starts every plain line.
        total: the number of units (None: unknown).
        unit: the unit's plural name (``"rows"``, ``"windows"``; ``"steps"`` for `step`).
        initial: units already done (a resumed job).
        enabled: False shows nothing.
        file: the stream; default ``sys.stderr``.
        every: seconds between plain lines of counted work.
        terminal: force the bar (True) or plain lines (False); default: whether `file` is a terminal.
        bar_format: tqdm's bar_format for the terminal bar.
    """

    def __init__(self, desc: str, *, total: int | None = None, unit: str = "it", initial: int = 0,
                 enabled: bool = True, file=None, every: float = EVERY_S, terminal: bool | None = None,
                 bar_format: str | None = None):
        self.desc, self.unit, self.every = desc, unit, every
        self.file = file if file is not None else sys.stderr
        self.n, self.start_n, self._total = initial, initial, total
        self.postfix, self.step_desc = "", ""
        self.t0 = self.last = time.monotonic()
        self.printed = (initial, total, "")  # the state of the last plain line
        tty = _isatty(self.file) if terminal is None else terminal
        self.bar = None
        self.lines = enabled and not tty
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc if bar_format is None else "",
                            unit=unit.rstrip("s") or unit, file=self.file, dynamic_ncols=True, smoothing=0.1,
                            bar_format=bar_format)

    # -- counted work ---------------------------------------------------------------

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if self.bar is not None:
            self.bar.total = value

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            now = time.monotonic()
            if now - self.last >= self.every or (self._total is not None and self.n >= self._total):
                self._print_count(now)

    def set_postfix(self, text: str) -> None:
        """Extra figures after the count (``12.3 tok/s``); shown on the next line or redraw."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def _print_count(self, now: float) -> None:
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self._total} {self.unit}" if self._total is not None else f"{self.n} {self.unit}"]
        if self._total:
            parts[0] += f" ({100 * self.n / self._total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self._total is not None and rate > 0 and self.n < self._total:
            parts.append(f"ETA {_clock((self._total - self.n) / rate)}")
        else:
            parts.append(f"elapsed {_clock(elapsed)}")
        self._line(", ".join(parts) + (f"; {self.postfix}" if self.postfix else ""))
        self.last, self.printed = now, (self.n, self._total, self.postfix)

    # -- named steps ----------------------------------------------------------------

    def step(self, desc: str) -> None:
        """Start the next named step (the previous one is done)."""
        self.step_desc = desc
        self.n += 1
        if self.bar is not None:
            self.bar.set_description_str(desc, refresh=False)
            self.bar.update(1)
        elif self.lines:
            self._print_step()

    def note(self, desc: str) -> None:
        """Rename the current step (no new step)."""
        self.step_desc = desc
        if self.bar is not None:
            self.bar.set_description_str(desc, refresh=True)
        elif self.lines:
            self._print_step()

    def _print_step(self) -> None:
        of = f"/{self._total}" if self._total is not None else ""
        self._line(f"{self.step_desc} (step {self.n}{of}) {_clock(time.monotonic() - self.t0)}")

    # -- both -----------------------------------------------------------------------

    def write(self, text: str) -> None:
        """A message line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.file, flush=True)

    def close(self, final: str | None = None) -> None:
        """Finish: the bar is closed; plain mode prints the last count (or `final`) if not shown yet."""
        if self.bar is not None:
            if final:
                self.bar.set_description_str(final, refresh=False)
            self.bar.refresh()
            self.bar.close()
            self.bar = None
        elif self.lines:
            if final:
                self._line(f"{final} {_clock(time.monotonic() - self.t0)}")
            elif (self.n, self._total, self.postfix) != self.printed and not self.step_desc:
                self._print_count(time.monotonic())
            self.lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
