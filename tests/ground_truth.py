"""The ground truth that examples/nested prints about its own calls.

nested reports every call of its traced functions on stdout; the unit tests of
the example and the end-to-end tests compare what a tracer exported with it.
Format, one item per line:

    pid <PID>
    call fn=<name> tid=<tid> seq=<n> parent=<n> start=<ns> end=<ns>
    done calls=<number of call lines>

seq numbers the calls of one thread from 1, in entry order; parent is the seq
of the enclosing traced call on the same thread (0 at top level); start and
end are CLOCK_REALTIME ns read inside the function, so a span measured by a
uprobe starts no later than start and ends no earlier than end.
"""

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
BUILD_DIR = EXAMPLES_DIR / "build"
NESTED = BUILD_DIR / "nested"
LIBGREET = BUILD_DIR / "libgreet.so"
LOOP = BUILD_DIR / "loop"

TRACED_FUNCTIONS = ("handle_request", "parse_request", "greet", "compute", "fib")

_PID = re.compile(r"pid (\d+)")
_CALL = re.compile(
    r"call fn=(\w+) tid=(\d+) seq=(\d+) parent=(\d+) start=(\d+) end=(\d+)"
)
_DONE = re.compile(r"done calls=(\d+)")


@dataclass(frozen=True)
class Call:
    fn: str
    tid: int
    seq: int
    parent: int
    start: int
    end: int


@dataclass
class GroundTruth:
    pid: int
    calls: list[Call]
    done: int

    def by_key(self) -> dict[tuple[int, int], Call]:
        """Calls keyed by (tid, seq), which identifies a call in one run."""
        return {(c.tid, c.seq): c for c in self.calls}


def parse(text: str) -> GroundTruth:
    """Parses nested's stdout; raises ValueError on a malformed or missing line.

    Lines that start with none of the keywords are skipped, so the output may be
    mixed with another program's (a tracer run in the same terminal).
    """
    pid = done = None
    calls = []
    for number, line in enumerate(text.splitlines(), 1):
        keyword = line.split(" ", 1)[0]
        if keyword not in ("pid", "call", "done"):
            continue
        pattern = {"pid": _PID, "call": _CALL, "done": _DONE}[keyword]
        match = pattern.fullmatch(line)
        if not match:
            raise ValueError(f"line {number}: malformed {keyword} line: {line!r}")
        if keyword == "call":
            fn, *numbers = match.groups()
            calls.append(Call(fn, *map(int, numbers)))
        elif keyword == "pid":
            if pid is not None:
                raise ValueError(f"line {number}: second pid line")
            pid = int(match.group(1))
        else:
            if done is not None:
                raise ValueError(f"line {number}: second done line")
            done = int(match.group(1))
    if pid is None or done is None:
        raise ValueError("no pid line" if pid is None else "no done line: did nested finish?")
    return GroundTruth(pid, calls, done)


def fib_calls(n: int) -> int:
    """Calls of fib() that fib(n) makes, itself included."""
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def expected_counts(threads: int, requests: int) -> Counter:
    """Calls per function of `nested THREADS REQUESTS`.

    Request ids run from 0 to threads*requests-1 and request id computes
    fib(3 + id % 3).
    """
    counts = Counter()
    for request_id in range(threads * requests):
        counts.update(["handle_request", "parse_request", "greet", "compute"])
        counts["fib"] += fib_calls(3 + request_id % 3)
    return counts


def build_examples() -> None:
    """Runs `make -C examples`; cheap when everything is up to date."""
    result = subprocess.run(
        ["make", "-C", str(EXAMPLES_DIR)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"make -C examples failed:\n{result.stdout}{result.stderr}")
