"""Waiting on a condition instead of sleeping a guessed time: a slow machine then costs time, not a failure."""

from __future__ import annotations

import time
from typing import Callable

_POLL_S = 0.01


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` was awaited once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(_POLL_S)


def never_within(condition: Callable[[], object], what: str, window_s: float) -> None:
    """Fail as soon as ``condition`` is true during ``window_s``.

    Seeing nothing proves something only if it would have been seen: run a positive control first, the same
    observation in a set-up where it must come true, with wait_until(..., timeout_s=window_s).
    """
    deadline = time.monotonic() + window_s
    while True:
        if condition():
            raise AssertionError(f"{what} within {window_s}s")
        if time.monotonic() >= deadline:
            return
        time.sleep(_POLL_S)
