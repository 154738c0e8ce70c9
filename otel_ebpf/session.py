"""One tracing session: load the program, attach the probes, drain the ring buffers into the exporters, and shut
down within one deadline without losing what was collected."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from typing import Callable, TextIO

from otel_ebpf import symbols
from otel_ebpf.call_data import CallData
from otel_ebpf.clock import WallClock
from otel_ebpf.command import Command
from otel_ebpf.config import (OTEL_EBPF_MAX_THREADS, OTEL_EBPF_RETRY_QUEUE_SIZE, OTEL_EBPF_SHUTDOWN_TIMEOUT,
                              OTEL_EBPF_SPOOL_SIZE, Settings)
from otel_ebpf.console import ConsoleFormat
from otel_ebpf.correlation import Correlator
from otel_ebpf.discovery import Discovery
from otel_ebpf.errors import UserError
from otel_ebpf.kernel import layout
from otel_ebpf.kernel.attach import Attacher, Attachment, Site, choose_mode
from otel_ebpf.kernel.program import Program, Tunables
from otel_ebpf.kernel.ring import Ring, Waiter
from otel_ebpf.live import LiveView, SlowCalls, Sources
from otel_ebpf.metrics import FunctionLatency, MetricsEncoder, MetricsExporter, sidecar_resource
from otel_ebpf.otlp.encode import SpanEncoder
from otel_ebpf.otlp.retry import span_exporter
from otel_ebpf.otlp.transport import otlp_transport
from otel_ebpf.pipeline import BatchProcessor, ConsoleSink, Sink, line_per_item
from otel_ebpf.probes import Probe, ProbeTable, go_hook_sites, go_stream_starts, is_executable, start_site
from otel_ebpf.processes import ProcessInfo, ProcessRegistry
from otel_ebpf.protocols import tls

# How often the ring buffers are read when nothing wakes us: the kernel wakes us for span events only in bursts
# (a wake-up per span would cost every traced call), so this bounds the delay of a quiet trickle.
POLL_S = 0.05
# How often followed processes are looked at again for a libssl they loaded with dlopen (Python's ssl module):
# no event tells of that.
TLS_RESCAN_S = 1.0
# Of the shutdown deadline, what the last metrics export gets: one short attempt (they are cumulative, and the
# spans matter more).
METRICS_SHARE = 0.2
_log = logging.getLogger("otel_ebpf.session")


def _sinks(exporters: tuple[str, ...], make_otlp: Callable[[], Sink], console_format, console: TextIO) -> list:
    return [ConsoleSink(console_format, console) if name == "console" else make_otlp() for name in exporters]


def _describe(settings: Settings) -> str:
    names = [f"otlp {settings.otlp.protocol} {settings.otlp.endpoint}" if name == "otlp" else name
             for name in settings.traces_exporters]
    return ", ".join(names) or "nowhere (OTEL_TRACES_EXPORTER=none)"


def describe_functions(table: ProbeTable, shown: int = 3) -> str:
    """`3 functions (a, b, c)`, or for many `500 functions (a, b, c and 497 more: otel-ebpf symbols BIN lists
    them)`: a start line that fits a terminal."""
    names = sorted({p.symbol.demangled for p in table.probes})
    text = f"{len(names)} function{'s' if len(names) != 1 else ''} ({', '.join(names[:shown])}"
    if len(names) > shown:
        binaries = sorted({p.shown_as or p.binary for p in table.probes})
        text += f" and {len(names) - shown} more: `otel-ebpf symbols {binaries[0]}` lists them"
    return text + ")"


def check_pids(pids: tuple[int, ...]) -> None:
    """Every --pid names a live process."""
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise UserError(f"no process with pid {pid}", f"check the pid (ps -p {pid}); it may have exited")


def _mapped_files(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file process pid maps: what a uprobe on a file reaches in it."""
    files = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0":
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                files.add((os.makedev(major, minor), int(fields[4])))
    return files


def check_mapped(pids: tuple[int, ...], table: ProbeTable) -> None:
    """Every --pid process maps at least one probed binary: otherwise nothing would ever be traced in it."""
    binaries = {p.binary: p.shown_as or p.binary for p in table.probes}
    identities = {(st.st_dev, st.st_ino) for st in map(os.stat, binaries)}
    for pid in pids:
        try:
            mapped = _mapped_files(pid)
        except OSError as err:
            raise UserError(f"cannot read the memory map of pid {pid}: {err.strerror}",
                            "otel-ebpf needs CAP_SYS_PTRACE for processes of other users") from None
        if not mapped & identities:
            runs = ProcessInfo.from_proc(pid).executable or "something unknown"
            raise UserError(f"pid {pid} runs {runs}, which does not map {', '.join(sorted(binaries.values()))}",
                            f"name what that process runs (see /proc/{pid}/maps), or another pid")


def _loss_counters(stats: dict, kernel: dict) -> dict[str, dict[str, int]]:
    """Every call that did not become an exported span, by reason, in the metrics' vocabulary."""
    failed = stats["failed"] + stats["dropped_retry"] + stats["unsent"]  # given up on after export began
    return {
        "otel.sdk.processor.span.processed": {"": stats["exported"] + failed, "queue_full": stats["dropped_full"]},
        "otel.sdk.exporter.span.exported": {"": stats["exported"] - stats["rejected"],
                                            "rejected": stats["rejected"], "export_failed": failed},
        "otel_ebpf.calls.unrecorded": {"ring_buffer_full": kernel["spans_lost"],
                                       "depth_exceeded": kernel["depth_exceeded"],
                                       "unmatched_return": kernel["unmatched_return"]},
    }


class _Probes:
    """The uprobes of the run, attached when tracing starts and, following processes, for each new one.

    Following (a COMMAND, --pid): an executable's probes are attached once for every process, and the kernel
    keeps to the followed ones, so a forked child is traced from its first instruction; a library's are
    attached per followed process, so that other processes mapping it (libc: all of them) never trap.
    System-wide: every probe once for every process, plus each executable's entry point, which starts
    following the process that runs it. Either way OpenSSL's functions (protocols/tls.py) are attached per
    followed process. With `goroutines`, a probed Go binary's runtime.newproc1 and net/http client are probed too
    (probes.GO_HOOKS), so that requests follow the goroutines their handlers start, and outbound requests the
    goroutine that made them."""

    def __init__(self, program: Program, attacher: Attacher, table: ProbeTable, follow: bool, read_tls: bool,
                 goroutines: bool = False):
        self._attacher = attacher
        self._follow = follow
        self._read_tls = read_tls
        self._shared = []  # (path, sites) attached once for every process
        self._per_process = []  # (path, sites) attached per followed process
        self._links: dict[int, list] = {}  # pid -> its per-process attachments
        self._tls_files: dict[int, set[str]] = {}  # pid -> the files its OpenSSL uprobes are on
        self._program = program
        self._goroutines = goroutines
        for path, probes in table.by_binary().items():
            sites = self._sites(path, probes)
            if not follow or is_executable(path):
                self._shared.append((path, sites))
            else:
                self._per_process.append((path, sites))
        self.uprobes = sum(len(sites) for _, sites in self._shared + self._per_process)

    def _sites(self, path: str, probes: list[tuple[int, Probe]]) -> list[Site]:
        """The uprobe sites of a file's probes; system-wide, an executable's entry point as well."""
        sites = [site for probe_id, probe in probes for site in probe.sites(probe_id)]
        if self._goroutines and any(probe.is_go for _, probe in probes):
            sites += go_hook_sites(path)
            self._program.mark_stream_starts(go_stream_starts(path))
        if not self._follow and is_executable(path):
            start = start_site(path)
            sites += [start] if start else []
        return sites

    def attach_file(self, path: str, probes: list[tuple[int, Probe]]) -> Attachment:
        """A discovered file's probes, for every process (discovery.py: only system-wide)."""
        attachment = self._attacher.attach(path, self._sites(path, probes))
        self.uprobes += attachment.sites
        return attachment

    def detach(self, attachment: Attachment) -> None:
        self.uprobes -= attachment.sites
        self._attacher.detach(attachment)

    def attach(self, pids: list[int], awaiting_exec: int | None = None) -> None:
        """awaiting_exec: the COMMAND, still otel-ebpf's own fork: OpenSSL's uprobes wait for its exec."""
        for path, sites in self._shared:
            self._attacher.attach(path, sites)
        for pid in pids:
            self.follow(pid, openssl=pid != awaiting_exec)

    def follow(self, pid: int, openssl: bool = True) -> None:
        """Library probes for a followed process (once; they stay through its execs), and OpenSSL's for the
        files it maps or will map (again at each of its notices: an exec brings another program)."""
        try:
            if self._per_process and pid not in self._links:
                self._links[pid] = [self._attacher.attach(path, sites, pid) for path, sites in self._per_process]
            if self._read_tls and openssl:
                attached = self._tls_files.setdefault(pid, set())
                for path in tls.libraries(pid) - attached:
                    attached.add(path)
                    sites = tls.sites(path)
                    if sites:
                        self._links.setdefault(pid, []).append(self._attacher.attach(path, sites, pid))
                        _log.debug("reading TLS plaintext of pid %d in %s", pid, path)
        except Exception as exc:  # it may have exited already; its spans are lost, not the session
            _log.debug("could not attach to pid %d: %s", pid, exc)

    def rescan(self) -> None:
        """OpenSSL's uprobes for a libssl a followed process mapped since it was last looked at."""
        for pid in list(self._tls_files):
            self.follow(pid)

    def forget(self, pid: int) -> None:
        self._tls_files.pop(pid, None)
        for attachment in self._links.pop(pid, []):
            self._attacher.detach(attachment)

    def close(self) -> float:
        self._links.clear()
        return self._attacher.close()


class Session:
    """One run, from loading the program to the last summary line."""

    def __init__(self, settings: Settings, table: ProbeTable, command: Command | None, console: TextIO,
                 log: TextIO, live: bool = False):
        self.settings = settings
        self.table = table
        self.command = command
        self.log = log
        self.pids = list(settings.pids)
        self.follow = command is not None or bool(self.pids)
        mode = choose_mode(settings.attach)
        self.program = Program(Tunables.from_settings(settings, follow_only=self.follow), mode)
        self.clock = WallClock()
        self.registry = ProcessRegistry(settings.service_name, settings.resource_attributes)
        self.correlator = Correlator(self.registry, settings.sampler.samples, settings.sampler.parent_based,
                                     table.binary)
        self.call_data = CallData(table)
        for probe_id, probe in enumerate(table.probes):
            self._configure(probe_id, probe)
        encoder = SpanEncoder(table.info, self.clock)
        self.sinks = _sinks(settings.traces_exporters, lambda: span_exporter(settings),
                            ConsoleFormat(table.info, self.clock), console)
        self.processor = BatchProcessor(
            encoder.encode, self.sinks,
            max_queue_size=settings.bsp_max_queue_size, max_batch_size=settings.bsp_max_export_batch_size,
            schedule_delay_s=settings.bsp_schedule_delay_s, export_timeout_s=settings.bsp_export_timeout_s,
            exporters=settings.export_concurrency)
        self.metrics = self._metrics(console)
        self.spans_ring, self.notices_ring = self.program.rings()
        self.waiter = Waiter([self.spans_ring, self.notices_ring])
        self.probes = _Probes(self.program, Attacher(self.program, mode), table, self.follow,
                              settings.http and settings.tls, goroutines=settings.http)
        patterns = [spec for spec in settings.probes if spec.is_pattern]
        self.discovery = Discovery(patterns, symbols.Options.from_settings(settings), self._register,
                                   self.probes.attach_file, self.probes.detach) if patterns else None
        self.slow = SlowCalls() if live else None
        # Set by the signal handler: a plain flag, since a handler that takes a lock (Event.set) deadlocks when the
        # next signal interrupts it inside that lock. The loop looks at it at least every POLL_S.
        self.stopping = False

    def _configure(self, probe_id: int, probe: Probe) -> None:
        """What the kernel keeps per probe beside its uprobes: what it reads, which calls it keeps."""
        if probe.captures:
            self.program.set_capture_plan(probe_id, probe.captures.encode())
        if probe.name_filter:
            self.program.set_name_filter(probe_id, probe.name_filter)

    def _register(self, probes: list[Probe]) -> list[int]:
        """Ids for discovered probes, configured in the kernel and known to every stage before any span."""
        ids = self.table.add(probes)
        for probe_id, probe in zip(ids, probes):
            self._configure(probe_id, probe)
            self.call_data.add(probe_id)
        return ids

    def _metrics(self, console: TextIO) -> MetricsExporter | None:
        """Per-function latency histograms and loss counters, on their own schedule."""
        settings = self.settings
        encoder = MetricsEncoder(sidecar_resource(settings.service_name, settings.resource_attributes), time.time_ns())
        # No retry queue for metrics: they are cumulative, the next export carries what a failed one had.
        sinks = _sinks(settings.metrics_exporters, lambda: otlp_transport(settings.otlp_metrics),
                       line_per_item(str), console)
        if not sinks:
            return None

        def collect():
            latencies = []
            for probe_id, probe in enumerate(self.table.probes):
                counts, total, _ = self.program.latency(probe_id)
                latencies.append(FunctionLatency(probe.symbol.demangled, probe.shown_as or probe.binary,
                                                 tuple(counts), total))
            kernel = self.program.counters()
            counters = _loss_counters(self.processor.stats, kernel)
            evicted = self.program.evicted(kernel)
            if evicted:
                counters["otel_ebpf.http.evicted"] = {f"{name}_map_full": n for name, n in evicted.items()}
            if self.correlator.http2.broken:
                counters["otel_ebpf.http2.unfollowed"] = {"frames_unseen": self.correlator.http2.broken}
            counters["otel_ebpf.call_stacks"] = {"": self.program.call_stacks()}
            return latencies, counters

        return MetricsExporter(collect, encoder, sinks, settings.metric_export_interval_s,
                               settings.metric_export_timeout_s)

    def start(self) -> None:
        """Follow the given processes and attach: from here on their calls are traced."""
        if self.command:
            self.program.follow(self.command.pid, await_exec=True)  # its identity comes with its exec
        for pid in self.pids:
            info = ProcessInfo.from_proc(pid)
            self.registry.remember(info)
            parent = info.parent
            self.program.follow(pid, parent.trace_id if parent else b"", parent.span_id if parent else b"",
                                bool(parent and parent.sampled))
        started = time.monotonic()
        self.probes.attach(([self.command.pid] if self.command else []) + self.pids,
                           self.command.pid if self.command else None)
        _log.debug("attached %d uprobes in %.3f s", self.probes.uprobes, time.monotonic() - started)
        target = (f"pid {self.command.pid} and its descendants" if self.command else
                  f"pid {', '.join(map(str, self.pids))} and descendants" if self.pids else "all processes")
        if self.discovery:
            self.discovery.scan()
        what = describe_functions(self.table) if len(self.table) else "no function yet"
        if self.discovery:
            what += f" and the executables matching {' '.join(s.binary for s in self.discovery.specs)}"
            what += f" (now {', '.join(self.discovery.attached)})" if self.discovery.attached else ""
        print(f"otel-ebpf: tracing {what} in {target}; exporting to {_describe(self.settings)}", file=self.log,
              flush=True)
        for probe in self.table.probes:
            if probe.captures:
                print(f"otel-ebpf: reading {probe.symbol.demangled}{probe.captures.describe()}: these values are "
                      "exported as span attributes", file=self.log, flush=True)

    def drain(self, limit: int | None = None) -> int:
        """Read what the kernel sent: notices first, then the spans committed before them, so that a request or a
        process is always known before the spans that refer to it. Returns the spans read."""
        until = self.spans_ring.producer_position
        notices = [n for n in map(layout.decode_notice, self.notices_ring.records()) if n is not None]
        if notices:
            if self.call_data:
                self.call_data.notices(notices)
            server_spans = self.correlator.notices(notices)
            if server_spans:
                self.processor.add(server_spans)
            for notice in notices:
                if isinstance(notice, layout.ProcessNotice):
                    (self.probes.forget if notice.kind == layout.NOTICE_PROCESS_EXIT else self.probes.follow)(
                        notice.pid)
                elif isinstance(notice, layout.ExecNotice) and self.discovery:
                    self.discovery.on_exec(notice.pid)
        records = self.spans_ring.spans(self.processor.room() if limit is None else limit, until)
        if len(records):
            correlated = self.correlator.spans(records)
            if self.slow:
                self.slow.add(correlated.records)
            chunk, with_values = self.call_data.split(correlated)
            if len(chunk):
                self.processor.add(chunk)
            if with_values:
                self.processor.add(with_values)
        self.registry.evict_exited()
        self.clock.maybe_refresh()
        return len(records)

    def live_view(self, output: str | None) -> LiveView:
        """The --live view of this session; `output`: where a traced command's output goes."""
        def export_state() -> str:
            states = [sink.state for sink in self.sinks if hasattr(sink, "state")]
            return ", ".join(states) if states else "none (OTEL_TRACES_EXPORTER)"

        target = f"pid {self.command.pid}" if self.command else ", ".join(map(str, self.pids)) or "all processes"
        title = (f"otel-ebpf --live: {target}, exporting to {_describe(self.settings)}; Ctrl-C stops"
                 + (f"; the command's output is in {output}" if output else ""))
        sources = Sources(
            functions=lambda: [(p.symbol.demangled, p.shown_as or p.binary) for p in list(self.table.probes)],
            latency=self.program.latency, errors=lambda: dict(self.call_data.errors),
            lost=lambda: sum(self._lost(self.processor.stats, self.program.counters()).values()),
            exported=lambda: self.processor.stats["exported"], export_state=export_state, title=title)
        return LiveView(sources, self.slow)

    def trace(self) -> None:
        """Until the command exits, or SIGINT/SIGTERM."""
        rescan_at = time.monotonic() + TLS_RESCAN_S
        while not (self.command.poll() is not None if self.command else self.stopping):
            if self.processor.room():
                self.waiter.wait(POLL_S)
            else:
                self.processor.wait_for_room(POLL_S)
            self.drain()
            if time.monotonic() >= rescan_at:
                self.probes.rescan()
                if self.discovery:
                    self.discovery.sweep()
                rescan_at = time.monotonic() + TLS_RESCAN_S

    def shut_down(self) -> None:
        """Within OTEL_EBPF_SHUTDOWN_TIMEOUT: detach first (nothing new arrives), drain what the kernel holds,
        export it (what is left at the deadline goes to the spool, or is counted as lost), one short metrics
        export, the summary line. A container's runtime sends SIGKILL after its grace period."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        still_followed = self.program.followed_count() if self.command else 0
        detach_s = self.probes.close()
        _log.debug("detached in %.3f s", detach_s)
        metrics_s = self.settings.shutdown_timeout_s * METRICS_SHARE if self.metrics else 0.0
        spans_deadline = deadline - metrics_s
        while time.monotonic() < spans_deadline:
            if not self.processor.room():
                self.processor.wait_for_room(POLL_S)
                continue
            if self.drain():
                continue
            # The consumer can never pass a record still being written (reserved, not yet submitted), and a
            # program on another CPU may be about to submit it: wait for it rather than stop short of it.
            if not (self.spans_ring.head_busy() or self.notices_ring.head_busy()):
                break
            time.sleep(0.001)
        drained = time.monotonic()
        self.processor.shutdown(max(0.0, min(self.settings.bsp_export_timeout_s, spans_deadline - time.monotonic())))
        exported = time.monotonic()
        if self.metrics:
            self.metrics.shutdown(max(0.1, min(self.settings.metric_export_timeout_s, deadline - time.monotonic())))
        _log.debug("shutdown: drained in %.3f s, spans exported in %.3f s, metrics in %.3f s",
                   drained - (deadline - self.settings.shutdown_timeout_s) - detach_s, exported - drained,
                   time.monotonic() - exported)
        self._summarise(still_followed)

    def close(self) -> None:
        self.waiter.close()
        self.spans_ring.close()
        self.notices_ring.close()
        self.program.close()

    def _lost(self, stats: dict, kernel: dict) -> dict[str, int]:
        """Spans lost so far, by why."""
        retry_bound = f"spool full ({OTEL_EBPF_SPOOL_SIZE})" if self.settings.spool_dir else (
            f"retry queue full ({OTEL_EBPF_RETRY_QUEUE_SIZE})")
        return {
            "ring buffer full": kernel["spans_lost"],
            "export queue full (OTEL_BSP_MAX_QUEUE_SIZE)": stats["dropped_full"],
            f"oldest dropped, {retry_bound}": stats["dropped_retry"],
            "export failed": stats["failed"],
            f"not exported within {OTEL_EBPF_SHUTDOWN_TIMEOUT} at shutdown": stats["dropped_shutdown"] + stats["unsent"],
        }

    def _summarise(self, still_followed: int) -> None:
        """One line on shutdown: every span that did not reach the exporters is accounted for, or said to be
        spooled; a run that traced nothing says why."""
        stats, kernel, settings = self.processor.stats, self.program.counters(), self.settings
        lost = self._lost(stats, kernel)
        if settings.traces_exporters:
            line = f"otel-ebpf: {stats['exported']} spans exported, {sum(lost.values())} lost"
        else:
            line = f"otel-ebpf: {stats['exported']} spans made, none exported (OTEL_TRACES_EXPORTER=none)"
        details = [f"{n} {why}" for why, n in lost.items() if n]
        if details:
            line += f" ({', '.join(details)})"
        if kernel["depth_exceeded"]:
            line += f"; {kernel['depth_exceeded']} calls nested deeper than OTEL_EBPF_MAX_DEPTH not recorded"
        if kernel["unmatched_return"]:
            line += f"; {kernel['unmatched_return']} returns without a recorded entry"
        if kernel["filtered_unpaired"]:
            line += (f"; {kernel['filtered_unpaired']} Python calls returned without their entry reported, so were "
                     "not traced (Python 3.11 reports function__entry for few calls: CPython gh-98894)")
        if kernel["notices_lost"]:
            line += f"; {kernel['notices_lost']} HTTP, process or captured-value notices lost to a full ring buffer"
        evicted = [f"{n} {layout.COUNTED_MAPS[name][1]}" for name, n in self.program.evicted(kernel).items() if n]
        if evicted:
            line += f"; the kernel forgot {', '.join(evicted)} to make room (raise {OTEL_EBPF_MAX_THREADS})"
        if self.correlator.client_spans_owned:
            line += (f"; {self.correlator.client_spans_owned} outbound requests carried a traceparent (the "
                     "program's own CLIENT spans), none made for them")
        if self.correlator.http2.broken:
            line += (f"; {self.correlator.http2.broken} HTTP/2 connections could not be followed (frames not all "
                     "seen), their requests not reported")
        if stats["spooled"]:
            line += f"; {stats['spooled']} spans kept in {settings.spool_dir} for the next run"
        if still_followed:
            line += (f"; {still_followed} descendant process{'es' if still_followed > 1 else ''} still running "
                     "when the command exited, no longer traced")
        calls = sum(sum(self.program.latency(i)[0]) for i in range(len(self.table)))
        if not calls:
            line += "; " + self._why_nothing()
        print(line, file=self.log, flush=True)

    def _why_nothing(self) -> str:
        if self.discovery and not len(self.table):
            return (f"no process ran an executable matching {' '.join(s.binary for s in self.discovery.specs)} "
                    "(matched against the path the process names it by, e.g. /app/bin/server in its container)")
        probed = {p.binary for p in self.table.probes}
        binaries = ", ".join(sorted({p.shown_as or p.binary for p in self.table.probes}))
        ran = self.registry.executables()
        if ran and not probed & {os.path.realpath(path) for path in ran}:
            return f"no probed function was called: the traced processes ran {', '.join(ran)}, not {binaries}"
        return f"no probed function was called ({binaries}): check that the workload reaches them"


def run(settings: Settings, table: ProbeTable, command: Command | None = None,
        console: TextIO = sys.stdout, log: TextIO = sys.stderr, live: bool = False) -> int:
    """Trace until the command exits (returning its status) or SIGINT/SIGTERM arrives (returning 0). `live`: with
    the --live view, the command's output going to a file."""
    output = None
    if command:
        if live:
            fd, output = tempfile.mkstemp(prefix="otel-ebpf-command-", suffix=".log")
            try:
                command.spawn_paused(fd)
            finally:
                os.close(fd)
        else:
            command.spawn_paused()
    try:
        session = Session(settings, table, command, console, log, live)
    except BaseException:
        if command:
            command.abandon()
        raise
    try:
        def on_signal(signum, _frame):
            session.stopping = True
            if command:
                command.signal(signum)  # the command decides when to end; we trace until it does

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                session.start()
            except BaseException:
                if command:
                    command.abandon()
                raise
            view = session.live_view(output) if live else None
            try:
                if command:
                    command.release()
                if view:
                    view.start()
                try:
                    session.trace()
                finally:
                    if view:
                        view.stop()
                        if output:
                            print(f"otel-ebpf: the command's output is in {output}", file=log, flush=True)
            finally:
                session.shut_down()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return command.exit_status if command else 0
    finally:
        session.close()
