"""Kernel monotonic nanoseconds (bpf_ktime_get_ns) to Unix nanoseconds, with a known error bound."""

from __future__ import annotations

import time

_SAMPLES = 25


def measure_offset() -> tuple[int, int]:
    """Return (realtime - monotonic, error bound) in ns.

    Reads the real-time clock between two monotonic reads; the tightest of several brackets gives the
    offset with an error of half the bracket width (typically well under a microsecond).
    """
    best = None
    for _ in range(_SAMPLES):
        before = time.monotonic_ns()
        real = time.time_ns()
        after = time.monotonic_ns()
        width = after - before
        if best is None or width < best[0]:
            best = (width, real - (before + after) // 2)
    width, offset = best
    return offset, width // 2 + 1


class WallClock:
    """Converts monotonic timestamps to Unix time; re-measures the offset periodically since NTP slews the
    real-time clock while the monotonic one keeps running."""

    def __init__(self, refresh_s: float = 10.0):
        self._refresh_ns = int(refresh_s * 1e9)
        self.refresh()

    def refresh(self) -> None:
        self.offset_ns, self.error_ns = measure_offset()
        self._measured_at = time.monotonic_ns()

    def maybe_refresh(self) -> None:
        if time.monotonic_ns() - self._measured_at >= self._refresh_ns:
            self.refresh()
