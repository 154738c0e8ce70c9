"""The one retry schedule, shared by a transport's own retry loop and by RetryingExporter.

It sits in its own module, below both: the transports need it, and RetryingExporter (otlp/retry.py) needs the
transports, so it cannot live with RetryingExporter without an import cycle.
"""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff from ``initial_s``, doubling up to ``max_s``, with ±20% jitter so that exporters failing
    together do not retry in step. A server's delay hint (Retry-After, RetryInfo) wins when it asks for longer."""

    def __init__(self, initial_s: float, max_s: float):
        self._initial_s = initial_s
        self._max_s = max_s
        self._delay_s = initial_s

    def next(self, hint_s: float | None = None) -> float:
        """Seconds to wait after a failed attempt; each call makes the following wait longer, until reset()."""
        wait = max(hint_s or 0.0, self._delay_s * random.uniform(0.8, 1.2))
        self._delay_s = min(self._delay_s * 2, self._max_s)
        return wait

    def reset(self) -> None:
        """After a request was settled (delivered or refused), the next failure starts from ``initial_s`` again."""
        self._delay_s = self._initial_s
