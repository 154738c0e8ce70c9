"""What captures and Python probes cost the traced program, side by side in each round (`make bench` runs it
after run.py): the loop's tick(i) untraced, under bpftrace (the floor), under otel-ebpf without captures, with
its argument captured, and with argument and result captured; and a Python loop of function calls untraced and
with `py:` probes enabled that match none of them (what every Python call pays: two USDT traps and the kernel's
name filter). Results are printed and written to bench/results/captures.json.

    python bench/capture_cost.py [--calls N] [--python-calls N] [--rounds R] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import BPFTRACE_SCRIPT, LOOP, SYMBOL, clean_env, loop_ns_per_call, run, trace_argv

RESULTS = ROOT / "bench" / "results" / "captures.json"
PYTHON = "/usr/bin/python3.11"
PYTHON_LINE = re.compile(r"^python calls=(\d+) ns_per_call=([0-9.]+)$", re.MULTILINE)
PYTHON_LOOP = """import sys, time
def f(i):
    return i
n = int(sys.argv[1])
start = time.perf_counter_ns()
for i in range(n):
    f(i)
print(f"python calls={n} ns_per_call={(time.perf_counter_ns() - start) / n:.1f}")
"""
WAYS = {"untraced": None, "bpftrace": None, "no_captures": SYMBOL, "argument": f"{SYMBOL}(i:uint)",
        "argument_and_result": f"{SYMBOL}(i:uint)->uint"}


def tick_cost(way: str, calls: int) -> float:
    loop = [str(LOOP), str(calls)]
    if way == "untraced":
        output = run(loop).stdout
    elif way == "bpftrace":
        output = run(["bpftrace", "-e", BPFTRACE_SCRIPT.format(LOOP, SYMBOL), "-c", " ".join(loop)]).stdout
    else:
        output = run(trace_argv(LOOP, WAYS[way], "--", *loop), clean_env(OTEL_TRACES_EXPORTER="none")).stdout
    return loop_ns_per_call(output, calls)


def python_cost(traced: bool, calls: int, script: Path) -> float:
    command = [PYTHON, str(script), str(calls)]
    argv = trace_argv(Path(PYTHON), "py:no_such_function", "--", *command) if traced else command
    match = PYTHON_LINE.search(run(argv, clean_env(OTEL_TRACES_EXPORTER="none")).stdout)
    if not match:
        raise RuntimeError("the Python loop printed no result line")
    return float(match.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--python-calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    samples = {way: [] for way in WAYS}
    python = {"untraced": [], "py_probes_enabled": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "calls.py"
        script.write_text(PYTHON_LOOP)
        for round_ in range(args.rounds):
            for way in WAYS:
                samples[way].append(tick_cost(way, args.calls))
            python["untraced"].append(python_cost(False, args.python_calls, script))
            python["py_probes_enabled"].append(python_cost(True, args.python_calls, script))
            print(f"round {round_ + 1}: " + ", ".join(f"{w} {v[-1]:.0f}" for w, v in samples.items()) +
                  f"; python {python['untraced'][-1]:.0f} -> {python['py_probes_enabled'][-1]:.0f} ns/call",
                  flush=True)
    floor = samples["bpftrace"]
    results = {
        "ns_per_call_median": {w: statistics.median(v) for w, v in samples.items()},
        "ratio_to_bpftrace_median": {w: statistics.median(o / f for o, f in zip(v, floor))
                                     for w, v in samples.items() if w not in ("untraced", "bpftrace")},
        "ratio_to_no_captures_median": {
            w: statistics.median(o / n for o, n in zip(samples[w], samples["no_captures"]))
            for w in ("argument", "argument_and_result")},
        "python_ns_per_call_median": {k: statistics.median(v) for k, v in python.items()},
        "python_added_ns_per_call_median": statistics.median(t - u for t, u in zip(python["py_probes_enabled"],
                                                                                    python["untraced"])),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    print(json.dumps(results, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
