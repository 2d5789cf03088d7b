"""Crash-test helpers: kill a job hard, interrupt one mid-flight, and never leave a process behind."""

from __future__ import annotations

import signal


def sigkill(proc, wait_s: float) -> None:
    """SIGKILL `proc` and check that it died of it."""
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(wait_s) == -signal.SIGKILL


def reap(proc, wait_s: float) -> None:
    """Kill `proc` if it still runs (a failed test must not leave a job behind)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(wait_s)


def ctrl_c_after(gen, monkeypatch, rows: int) -> None:
    """Make `gen.generate_iterable` raise KeyboardInterrupt once `rows` rows have finished (Ctrl-C mid-job)."""
    real = gen.generate_iterable

    def flaky(requests, batch_size, **kw):
        for k, item in enumerate(real(requests, batch_size=batch_size, **kw)):
            if k == rows:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(gen, "generate_iterable", flaky)
