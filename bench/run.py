"""`make bench`: what tracing a tight loop costs the traced program and the sidecar, and how fast spans arrive.

otel-ebpf is measured side by side with bpftrace (the least any uprobe tracer can cost the target) and with the
stock OpenTelemetry SDK on the same kernel side (bench/stock_sdk.py), all in one run: absolute times drift on a
shared machine, ratios measured together do not. Results are printed and written to bench/results/latest.json.

    python bench/run.py [--calls N] [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.bpf_cost import program_cost
from otel_ebpf.config import load_settings
from tests.otlp_receiver import OtlpReceiver

LOOP = ROOT / "examples" / "build" / "loop"
SYMBOL = "tick"
STOCK_SDK = ROOT / "bench" / "stock_sdk.py"
RESULTS = ROOT / "bench" / "results" / "latest.json"
# The floor: the same pairing of each return with its entry per thread that otel-ebpf does, minus the span.
BPFTRACE_SCRIPT = "uprobe:{0}:{1} {{ @s[tid] = nsecs; }} uretprobe:{0}:{1} {{ delete(@s[tid]); }}"
LOOP_LINE = re.compile(r"^loop calls=(\d+) ns_per_call=([0-9.]+)$", re.MULTILINE)
READY = {"otel_ebpf": "otel-ebpf: tracing", "stock_sdk": "stock-sdk: tracing"}
PIPELINES = tuple(READY)
READY_TIMEOUT_S = 120  # BCC compiles the BPF program at start-up: seconds on a slow machine
RUN_TIMEOUT_S = 300
RSS_SAMPLE_S = 0.01
QUICK_CALLS, QUICK_ROUNDS = 5000, 1
TARGETS = {
    "otel_ebpf_vs_bpftrace": ("<=", 1.15),
    "per_call_cpu_otel_ebpf_vs_bpftrace": ("<=", 1.15),
    "delivery_otel_ebpf_vs_stock": (">=", 10.0),
    "otel_ebpf_peak_rss_mb": ("<=", 120.0),
    "otel_ebpf_spans_lost": ("<=", 0),
}
DEFINITIONS = {
    "bpf_ns_per_call": "kernel CPU time of the entry and return BPF programs per call (bpf_stats run_time_ns), "
                       "otel-ebpf's programs and a bpftrace-equivalent floor compiled from the same sources",
    "per_call_cpu_otel_ebpf_vs_bpftrace": "(bpftrace ns/call + otel-ebpf BPF ns - floor BPF ns) / bpftrace "
                                          "ns/call: the target's per-call cost with only the programs' "
                                          "difference added, free of CPU contention from the sidecar",
    "ns_per_call": "mean wall-clock cost of one tick() call as the loop measures it (CLOCK_MONOTONIC around "
                   "the loop, so time the loop waits for a CPU counts too)",
    "loop_cpu_ns_per_call": "the loop process's own utime+stime (wait4) / calls: the probes' cost without "
                            "time lost to other processes",
    "spans_per_s": "distinct spans received by the OTLP receiver / (arrival of the last one - start time of "
                   "the earliest one); the sidecar is stopped (SIGINT) as soon as the loop exits",
    "cpu_per_100k_spans_s": "sidecar utime+stime from ready (probes attached) to exit, per 100000 spans "
                            "received; the sidecar traces by --pid, so the loop's CPU is not included",
    "cpu_startup_s": "sidecar utime+stime until ready, with children it reaped: imports, BPF compilation, "
                     "attaching",
    "peak_rss_mb": "the sidecar's own peak resident set (VmHWM from /proc, read every 10 ms until it exits), MiB",
    "defaults": "no OTEL_* variable set: the SDK's BatchSpanProcessor uses the specification's queue of 2048 "
                "spans (batch 512, delay 5 s); otel-ebpf its own default queue of {otel_ebpf_queue}",
    "whole_run_queue": "both pipelines with OTEL_BSP_MAX_QUEUE_SIZE big enough for every span of the run",
}


class TimedReceiver(OtlpReceiver):
    """The project's OTLP receiver, also noting when the last trace request arrived."""

    last_arrival_ns = 0

    def _receive(self, request, headers, size):
        answer = super()._receive(request, headers, size)
        if isinstance(request, ExportTraceServiceRequest):
            self.last_arrival_ns = time.time_ns()
        return answer


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without OTEL_* settings a user may have exported, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra, PYTHONUNBUFFERED="1")
    return env


def loop_ns_per_call(output: str, calls: int) -> float:
    """ns_per_call from the loop's own line, wherever it is among a tracer's output."""
    match = LOOP_LINE.search(output)
    if not match or int(match.group(1)) != calls:
        raise RuntimeError(f"no 'loop calls={calls}' line in the output:\n{output[-2000:]}")
    return float(match.group(2))


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Stdout of a command that must succeed."""
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[:300]} exited {result.returncode}:\n"
                           f"{result.stdout[-1000:]}{result.stderr[-2000:]}")
    return result.stdout


def reap(proc: subprocess.Popen) -> float:
    """Wait for a child; returns its CPU seconds (utime+stime, from wait4, which Popen.wait does not give)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


# ----- A: cost to the target


def untraced(calls: int) -> float:
    return loop_ns_per_call(run([str(LOOP), str(calls)]), calls)


def under_bpftrace(calls: int) -> float:
    """bpftrace -c splits its argument at spaces without shell quoting, hence the check in main()."""
    script = BPFTRACE_SCRIPT.format(LOOP, SYMBOL)
    return loop_ns_per_call(run(["bpftrace", "-e", script, "-c", f"{LOOP} {calls}"]), calls)


def under_otel_ebpf(calls: int, export: bool = True) -> float:
    """`otel-ebpf trace BIN tick -- BIN N`, as a user runs it: exporting to a real receiver, or not at all."""
    argv = [sys.executable, "-m", "otel_ebpf", "trace", str(LOOP), SYMBOL, "--", str(LOOP), str(calls)]
    if not export:
        return loop_ns_per_call(run(argv, clean_env(OTEL_TRACES_EXPORTER="none")), calls)
    with TimedReceiver() as receiver:
        return loop_ns_per_call(run(argv, clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint)),
                                calls)


def target_cost(calls: int, rounds: int) -> dict:
    """Rounds alternate the ways of running the loop so that drift hits all of them alike.

    otel-ebpf with export off separates the probes' own cost from the CPU that exporting (sidecar and
    receiver) takes away from the loop on a machine with few cores.
    """
    ways = {"untraced": untraced, "bpftrace": under_bpftrace, "otel_ebpf": under_otel_ebpf,
            "otel_ebpf_no_export": lambda n: under_otel_ebpf(n, export=False)}
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        for name, way in ways.items():
            samples[name].append(way(calls))
            print(f"  round {r + 1}/{rounds}  {name:20s} {samples[name][-1]:10.1f} ns/call", flush=True)
    medians = {f"{name}_ns_per_call": statistics.median(values) for name, values in samples.items()}
    return medians | {"samples_ns_per_call": samples}


# ----- B and C: delivery and sidecar cost


class Sidecar:
    """A tracer process: its stderr collected as it arrives (to wait for its ready line), its memory watched.

    Peak RSS is the sidecar's own VmHWM, sampled from /proc until it exits: wait4's ru_maxrss would also
    count children it reaped, such as a short-lived BPF loader.
    """

    def __init__(self, argv: list[str], env: dict[str, str], ready: str):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        self.lines: list[str] = []
        self.peak_rss_kb = 0
        self._ready_prefix = ready
        self._ready = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._read, self._watch_memory)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(self._ready_prefix):
                self._ready.set()
        self._ready.set()

    def _watch_memory(self) -> None:
        """VmHWM only grows; the last value read before the process's memory is released is its peak."""
        status = Path(f"/proc/{self.proc.pid}/status")
        while True:
            try:
                hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
            except OSError:
                return
            if not hwm:  # a zombie: exited, memory released
                return
            self.peak_rss_kb = max(self.peak_rss_kb, int(hwm[0].split()[1]))
            time.sleep(RSS_SAMPLE_S)

    def wait_ready(self) -> None:
        if not self._ready.wait(READY_TIMEOUT_S) or self.proc.poll() is not None:
            raise RuntimeError("tracer did not get ready:\n" + "\n".join(self.lines[-20:]))

    def cpu_s(self) -> float:
        """utime+stime so far of the process and of the children it reaped, as wait4 will count them."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        """SIGINT: flush and exit. Returns the CPU seconds of the whole life of the process."""
        self.proc.send_signal(signal.SIGINT)
        cpu = reap(self.proc)
        for t in self._threads:
            t.join(10)
        if self.proc.returncode != 0:
            raise RuntimeError(f"tracer exited {self.proc.returncode}:\n" + "\n".join(self.lines[-20:]))
        return cpu


def paused_loop(calls: int) -> subprocess.Popen:
    """The loop, waiting for a line on its stdin before it starts (LOOP_WAIT): a process that already runs the
    traced binary, for the tracer's --pid."""
    return subprocess.Popen([str(LOOP), str(calls)], env={**os.environ, "LOOP_WAIT": "1"}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def pipeline(name: str, calls: int, settings: dict[str, str]) -> dict:
    """One traced run of the loop through a sidecar that traces it by pid and exports to a fresh receiver."""
    with TimedReceiver() as receiver:
        loop = paused_loop(calls)
        tracer = ([sys.executable, str(STOCK_SDK), "--pid", str(loop.pid), str(LOOP), SYMBOL] if name == "stock_sdk"
                  else [sys.executable, "-m", "otel_ebpf", "trace", str(LOOP), SYMBOL, "--pid", str(loop.pid)])
        env = clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint, **settings)
        sidecar = Sidecar(tracer, env, READY[name])
        try:
            sidecar.wait_ready()
            cpu_startup = sidecar.cpu_s()
            loop.stdin.write("go\n")
            loop.stdin.close()
            with loop.stdout:
                output = loop.stdout.read()
            loop_cpu = reap(loop)
        except BaseException:
            loop.kill()
            sidecar.proc.kill()
            raise
        cpu_total = sidecar.stop()
        if loop.returncode != 0:
            raise RuntimeError(f"the loop exited {loop.returncode}")
        spans = [span for _, span in receiver.spans()]
        received = len({span.span_id for span in spans})
        seconds = (receiver.last_arrival_ns - min(s.start_time_unix_nano for s in spans)) / 1e9 if spans else math.nan
    cpu = cpu_total - cpu_startup
    return {
        "received": received,
        "seconds": seconds,
        "spans_per_s": received / seconds if spans else 0.0,
        "loop_ns_per_call": loop_ns_per_call(output, calls),
        "loop_cpu_ns_per_call": loop_cpu * 1e9 / calls,
        "cpu_startup_s": cpu_startup,
        "cpu_s": cpu,
        "cpu_per_100k_spans_s": cpu * 100_000 / received if received else math.nan,
        "peak_rss_mb": sidecar.peak_rss_kb / 1024,
        "summary": sidecar.lines[-1] if sidecar.lines else "",
    }


def whole_run_queue(calls: int) -> dict[str, str]:
    """An export queue with room for every span of the run (the default ring buffer holds 100000 calls)."""
    return {"OTEL_BSP_MAX_QUEUE_SIZE": str(max(calls, 2048))}


def delivery(calls: int, rounds: int) -> dict:
    """Both pipelines with default settings, and both with a queue that holds the whole run (what avoids losses
    when a sidecar cannot keep up with a burst; the stock SDK reads the same OTEL_BSP_* variables).

    Rounds alternate the four runs, as for the target cost; each number is the median over the rounds.
    """
    configs = {"defaults": {}, "whole_run_queue": whole_run_queue(calls)}
    runs: dict[tuple[str, str], list[dict]] = {(config, name): [] for config in configs for name in PIPELINES}
    for r in range(rounds):
        for (config, name), done in runs.items():
            done.append(pipeline(name, calls, configs[config]))
            print(f"  round {r + 1}/{rounds}  {config:16s} {name:10s} {done[-1]['received']:8d} received "
                  f"{done[-1]['spans_per_s']:9.0f} spans/s", flush=True)
    result = {config: {"settings": settings} for config, settings in configs.items()}
    for (config, name), done in runs.items():
        result[config][name] = medians(done, calls)
    return result


def medians(runs: list[dict], calls: int) -> dict:
    """Each number's median over the rounds (an observed value, so counts stay whole), every sidecar's summary."""
    result = {key: statistics.median_low(run[key] for run in runs) for key in runs[0] if key != "summary"}
    result["lost"] = calls - result["received"]
    result["samples_spans_per_s"] = [run["spans_per_s"] for run in runs]
    result["summaries"] = [run["summary"] for run in runs]
    return result


# ----- report


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def ratios(cost: dict, pipes: dict) -> dict:
    ours, stock = pipes["defaults"]["otel_ebpf"], pipes["defaults"]["stock_sdk"]
    big_ours, big_stock = pipes["whole_run_queue"]["otel_ebpf"], pipes["whole_run_queue"]["stock_sdk"]
    return {
        "bpftrace_vs_untraced": ratio(cost["bpftrace_ns_per_call"], cost["untraced_ns_per_call"]),
        "otel_ebpf_vs_bpftrace": ratio(cost["otel_ebpf_ns_per_call"], cost["bpftrace_ns_per_call"]),
        "otel_ebpf_no_export_vs_bpftrace": ratio(cost["otel_ebpf_no_export_ns_per_call"],
                                                 cost["bpftrace_ns_per_call"]),
        "delivery_otel_ebpf_vs_stock": ratio(ours["spans_per_s"], stock["spans_per_s"]),
        "delivery_otel_ebpf_vs_stock_whole_run_queue": ratio(big_ours["spans_per_s"], big_stock["spans_per_s"]),
        "cpu_per_span_stock_vs_otel_ebpf": ratio(stock["cpu_per_100k_spans_s"], ours["cpu_per_100k_spans_s"]),
        "peak_rss_stock_vs_otel_ebpf": ratio(stock["peak_rss_mb"], ours["peak_rss_mb"]),
        "bpf_time_otel_ebpf_vs_floor": ratio(cost["otel_ebpf_bpf_ns_per_call"], cost["floor_bpf_ns_per_call"]),
        "per_call_cpu_otel_ebpf_vs_bpftrace": ratio(cost["bpftrace_ns_per_call"] + cost["otel_ebpf_bpf_ns_per_call"]
                                                    - cost["floor_bpf_ns_per_call"], cost["bpftrace_ns_per_call"]),
    }


def targets(results: dict) -> dict:
    ours = results["delivery"]["defaults"]["otel_ebpf"]
    values = {**results["ratios"], "otel_ebpf_peak_rss_mb": ours["peak_rss_mb"], "otel_ebpf_spans_lost": ours["lost"]}
    out = {}
    for name, (op, limit) in TARGETS.items():
        met = values[name] <= limit if op == "<=" else values[name] >= limit
        out[name] = {"value": values[name], "target": f"{op} {limit:g}", "met": met}
    return out


def definitions() -> dict[str, str]:
    """DEFINITIONS, with otel-ebpf's default queue size as its configuration has it today."""
    queue = load_settings(environ={}).bsp_max_queue_size
    return {name: text.format(otel_ebpf_queue=queue) for name, text in DEFINITIONS.items()}


def _verdict(target: dict) -> str:
    return f"  target {target['target']}: {'met' if target['met'] else 'NOT MET'}"


def report(results: dict) -> str:
    cost, pipes, s = results["target_cost"], results["delivery"], results["settings"]
    lines = [
        "",
        f"otel-ebpf benchmark: {s['calls']} calls of {SYMBOL}() in {LOOP.relative_to(ROOT)}; {results['machine']}",
        "",
        f"Every number is the median of {s['rounds']} interleaved round(s).",
        "",
        "A) cost to the traced program: ns per call as the loop measures it",
        f"   {'untraced':34s} {cost['untraced_ns_per_call']:10.1f}",
        f"   {'bpftrace (the floor)':34s} {cost['bpftrace_ns_per_call']:10.1f}",
        f"   {'otel-ebpf, exporting to a receiver':34s} {cost['otel_ebpf_ns_per_call']:10.1f}",
        f"   {'otel-ebpf, export off':34s} {cost['otel_ebpf_no_export_ns_per_call']:10.1f}",
        "   BPF program time per call (kernel bpf_stats: entry + return programs, no trap, no contention)",
        f"   {'floor (bpftrace-equivalent)':34s} {cost['floor_bpf_ns_per_call']:10.1f}",
        f"   {'otel-ebpf':34s} {cost['otel_ebpf_bpf_ns_per_call']:10.1f}",
        "",
        "B) delivery: the sidecar traces the loop by --pid and exports OTLP/HTTP to a receiver",
        f"   {'':34s} {'received':>9s} {'lost':>7s} {'spans/s':>9s} {'loop ns/call':>12s} {'loop CPU ns/call':>16s}",
    ]
    rows = [(config, name, f"{'otel-ebpf' if name == 'otel_ebpf' else 'stock SDK'}, {config.replace('_', ' ')}")
            for config in pipes for name in PIPELINES]
    for config, name, label in rows:
        p = pipes[config][name]
        lines.append(f"   {label:34s} {p['received']:9d} {p['lost']:7d} {p['spans_per_s']:9.0f} "
                     f"{p['loop_ns_per_call']:12.1f} {p['loop_cpu_ns_per_call']:16.1f}")
    for config in pipes:
        settings = " ".join(f"{k}={v}" for k, v in pipes[config]["settings"].items()) or "none set"
        lines.append(f"   {config}: {settings}")
    lines += ["", "C) sidecar cost",
              f"   {'':34s} {'CPU s/100k spans':>16s} {'startup CPU s':>13s} {'peak RSS MiB':>12s}"]
    for config, name, label in rows:
        p = pipes[config][name]
        lines.append(f"   {label:34s} {p['cpu_per_100k_spans_s']:16.2f} {p['cpu_startup_s']:13.2f} "
                     f"{p['peak_rss_mb']:12.1f}")
    lines += ["", "   the sidecars' last words:"]
    lines += [f"   {label:34s} {line}" for config, name, label in rows for line in pipes[config][name]["summaries"]]
    lines += ["", "ratios"]
    for name, value in results["ratios"].items():
        target = results["targets"].get(name)
        lines.append(f"   {name:44s} {value:10.2f}{_verdict(target) if target else ''}")
    for name in ("otel_ebpf_peak_rss_mb", "otel_ebpf_spans_lost"):
        target = results["targets"][name]
        lines.append(f"   {name:44s} {target['value']:10.6g}{_verdict(target)}")
    lines += ["", "definitions"] + [f"   {k}: {v}" for k, v in results["definitions"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls of tick() per run (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_CALLS} calls, {QUICK_ROUNDS} round, whatever --calls and --rounds say")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)
    calls, rounds = (QUICK_CALLS, QUICK_ROUNDS) if args.quick else (args.calls, args.rounds)
    if calls < 1 or rounds < 1:
        parser.error("--calls and --rounds must be at least 1")
    if os.geteuid() != 0:
        parser.error("attaching uprobes needs root: run `sudo make bench`")
    if not LOOP.exists():
        parser.error(f"{LOOP} is missing: run `make examples`")
    if any(c.isspace() for c in str(LOOP)):
        parser.error(f"bpftrace -c cannot run a path containing spaces: {LOOP}")

    started = time.monotonic()
    print(f"A) target cost: {rounds} round(s) of {calls} calls", flush=True)
    cost = target_cost(calls, rounds)
    cost.update(program_cost(str(LOOP), SYMBOL, calls))
    print(f"B, C) delivery and sidecar cost: {rounds} round(s) of {calls} calls", flush=True)
    pipes = delivery(calls, rounds)
    results = {
        "machine": f"Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "settings": {"calls": calls, "rounds": rounds, "binary": str(LOOP), "symbol": SYMBOL},
        "target_cost": cost,
        "delivery": pipes,
        "ratios": ratios(cost, pipes),
        "definitions": definitions(),
    }
    results["targets"] = targets(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    print(report(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.output} (benchmark took {results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
