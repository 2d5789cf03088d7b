"""Run a function in threads and fail on a hang or an error (the concurrency tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def in_threads(fn: Callable[[int], object], n: int, *, wait_s: float = 120) -> None:
    """Run fn(0) ... fn(n - 1) in n threads; fail if one hangs (bounded wait) or raises."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(wait_s)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors
