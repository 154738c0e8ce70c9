"""Command line: argv + environment -> Settings -> a subcommand; user errors become one line and exit 2."""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import re
import sys

from otel_ebpf import __version__, config, symbols
from otel_ebpf.errors import UserError
from otel_ebpf.plan import ifunc_choice
from otel_ebpf.symbols import dwarf, golang, usdt

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a program killed by SIGPIPE, as in `otel-ebpf symbols ... | head`
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
LIVE_HELP = ("a full-screen view of the traced functions (calls, latency, errors), the slowest calls and the export, "
             "refreshed every second; the console exporter is off and a traced command's output goes to a file")
# Without a PATTERN, `symbols` shows DWARF parameters only for files this small (read in about a second).
_LISTED_DWARF_BYTES = 1 << 20


def _one_line(text: str) -> str:
    """Messages quote paths and names as given, and a file name may contain a newline."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message; we want the project's one-line error instead."""

    def error(self, message: str):
        raise UserError(message, f"see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otel-ebpf", description="Trace functions of unmodified programs as OpenTelemetry spans.",
                     epilog="Configuration comes from OTEL_* environment variables; see README.md.")
    parser.add_argument("--version", action="version", version=f"otel-ebpf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    trace = sub.add_parser("trace", help="trace SYMBOLs of BINARY",
                           usage="otel-ebpf trace BINARY SYMBOL [SYMBOL ...] [--pid PID] [-- COMMAND [ARG ...]]",
                           description="Trace SYMBOLs (names or glob patterns) of BINARY (an executable or "
                           "shared library). With -- COMMAND: start it, trace it and exit with its status. "
                           "With --pid: that process only. Otherwise every process running BINARY, until "
                           "SIGINT/SIGTERM.")
    trace.add_argument("binary", metavar="BINARY")
    trace.add_argument("symbols", metavar="SYMBOL", nargs="+")
    trace.add_argument("--live", action="store_true", help=LIVE_HELP)
    trace.add_argument("--pid", action="append", metavar="PID", help="trace only this process and its descendants "
                       "(several: repeat --pid, or PID,PID)")

    run = sub.add_parser("run", help="sidecar mode: everything from the environment (OTEL_EBPF_PROBES, ...)")
    run.add_argument("--probes", metavar="SPEC", help="BINARY:SYMBOL[,SYMBOL...][;...] (overrides OTEL_EBPF_PROBES)")
    run.add_argument("--live", action="store_true", help=LIVE_HELP)
    run.add_argument("--pid", action="append", metavar="PID",
                     help="trace only this process and its descendants (overrides OTEL_EBPF_PID)")

    syms = sub.add_parser("symbols", help="list the functions of BINARY that can be traced")
    syms.add_argument("binary", metavar="BINARY")
    syms.add_argument("pattern", metavar="PATTERN", nargs="?", help="glob over names, e.g. 'handle_*'")
    return parser


def _list_symbols(binary: str, pattern: str | None) -> int:
    """Where the names came from on stderr; per function address, size, name, DWARF parameters, IFUNC picks and
    why not traceable; then the USDT probes (a PATTERN starting with usdt: lists only those)."""
    table = symbols.load(binary, symbols.Options.from_settings(config.load_settings()))
    markers = [p for p in usdt.probes(table.path)
               if not pattern or fnmatch.fnmatchcase(f"usdt:{p.full_name}", pattern)]
    if pattern and pattern.startswith("usdt:"):
        found = []
        if not markers:
            raise UserError(f"no USDT probe matching {pattern!r} in {binary}",
                            f"`otel-ebpf symbols {binary}` lists its functions and USDT probes")
    elif pattern:
        found = table.resolve([pattern])
    else:
        found = sorted(table.functions() + table.ifunc_picks(), key=lambda s: (s.ifunc or s.demangled, s.address))
    refused = golang.untraceable(table.path, found) if golang.go_version(table.path) else {}
    signatures, unshown = {}, ""
    if pattern or dwarf.dwarf_size(table.source.file) <= _LISTED_DWARF_BYTES:
        signatures = dwarf.signatures(table.source.file, tuple(s.address for s in found) if pattern else None)
    elif found:
        unshown = "; name a PATTERN to see DWARF parameters"
    print(f"otel-ebpf: {_one_line(table.describe())}{unshown}", file=sys.stderr)
    for s in found:
        name = f"{s.ifunc} -> {ifunc_choice(s)}" if s.ifunc else s.demangled
        signature = signatures.get(s.address)
        shown = f"  {signature.describe()}" if signature and not s.ifunc else ""
        why = f"  [not traceable: {refused[s.address]}]" if s.address in refused else ""
        print(f"{s.address:#014x} {s.size:8d}  {name}{shown}{why}")
    for probe in markers:
        print(probe.describe())
    return 0


def _trace(args: argparse.Namespace, command_argv: list[str] | None) -> int:
    from otel_ebpf import probes as planning
    from otel_ebpf import session
    from otel_ebpf.command import Command
    from otel_ebpf.plan import plan_binary

    overrides = {}
    if args.pid is not None:
        overrides["pids"] = config.parse_pids(",".join(args.pid), source="--pid")
    if args.command == "trace":
        overrides["probes"] = [config.ProbeSpec(args.binary, tuple(args.symbols))]
    elif args.probes is not None:
        overrides["probes"] = config.parse_probes(args.probes, source="--probes")
    settings = config.load_settings(**overrides)
    # OTEL_LOG_LEVEL: otel-ebpf's own messages are warnings, which info shows as warn does.
    logging.getLogger().setLevel({"debug": logging.DEBUG, "error": logging.ERROR}.get(settings.log_level,
                                                                                      logging.WARNING))
    if not settings.probes:
        raise UserError("nothing to trace: OTEL_EBPF_PROBES is empty",
                        "set OTEL_EBPF_PROBES=BINARY:SYMBOL[,SYMBOL...] or use `otel-ebpf trace`")
    if command_argv is not None and settings.pids:
        raise UserError("--pid and -- COMMAND exclude each other", "use one of them")
    patterns = [spec.binary for spec in settings.probes if spec.is_pattern]
    if patterns and (args.command == "trace" or settings.pids):
        raise UserError(f"{patterns[0]} is a path pattern: it finds processes node-wide, not in a traced command "
                        "or --pid", "use `otel-ebpf run` without --pid, or name the binary's path")
    session.check_pids(settings.pids)
    if args.live:
        if not (sys.stderr.isatty() and sys.stdout.isatty()):
            raise UserError("--live needs a terminal", "run it in a terminal, or leave --live out")
        settings = settings.model_copy(update={
            "traces_exporters": tuple(e for e in settings.traces_exporters if e != "console"),
            "metrics_exporters": tuple(e for e in settings.metrics_exporters if e != "console")})

    probes = planning.ProbeTable()
    options = symbols.Options.from_settings(settings)
    view = settings.pids[0] if len(settings.pids) == 1 else None  # files as that process sees them
    for spec in settings.probes:
        if not spec.is_pattern:
            probes.add(plan_binary(spec.binary, spec.symbols, options, view))
    session.check_mapped(settings.pids, probes)
    command = Command(command_argv) if command_argv is not None else None
    return session.run(settings, probes, command, live=args.live)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_argv = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command_argv = argv[:cut], argv[cut + 1:]
    logging.basicConfig(level=logging.WARNING, format="otel-ebpf: %(message)s")
    # gRPC's C core logs every connection loss on stderr; export failures are reported by us, briefly.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        args = _parser().parse_args(argv)
        if command_argv is not None and args.command != "trace":
            raise UserError("-- COMMAND is only for `otel-ebpf trace`", "see `otel-ebpf trace --help`")
        if args.command == "symbols":
            return _list_symbols(args.binary, args.pattern)
        return _trace(args, command_argv)
    except UserError as err:
        print(f"otel-ebpf: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away; without this, flushing stdout at exit would fail again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
