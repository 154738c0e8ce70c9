"""All settings of otel-ebpf, read and validated once at start-up.

Precedence: arguments passed to :func:`load_settings` (the CLI's options) beat the
environment, which beats the defaults. OTEL_* variables follow the OpenTelemetry SDK
specification (empty values count as unset, durations are milliseconds, enum values are
case-insensitive); OTEL_EBPF_* variables are our own. No other module reads the
environment, and every bad value becomes one :class:`UserError` naming the variable.
"""

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_EXPORT_TIMEOUT,
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_BSP_SCHEDULE_DELAY,
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_METRIC_EXPORT_INTERVAL,
    OTEL_METRIC_EXPORT_TIMEOUT,
    OTEL_RESOURCE_ATTRIBUTES,
    OTEL_SERVICE_NAME,
    OTEL_TRACES_SAMPLER,
    OTEL_TRACES_SAMPLER_ARG,
)
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from otel_ebpf.errors import UserError

OTEL_EBPF_PROBES = "OTEL_EBPF_PROBES"
"""What to trace: ``BINARY:SYMBOL[,SYMBOL...]`` entries separated by ``;``."""

OTEL_EBPF_PID = "OTEL_EBPF_PID"
"""Trace only these process ids (comma-separated) and their descendants instead of every process running the
binaries."""

OTEL_EBPF_SHUTDOWN_TIMEOUT = "OTEL_EBPF_SHUTDOWN_TIMEOUT"
"""How long shutting down may take, ms: detaching, draining and the last exports, within a container's grace
period."""

OTEL_EBPF_ATTACH = "OTEL_EBPF_ATTACH"
"""How uprobes are attached: auto, multi (multi-uprobe links), perf (one perf event per probe) or tracefs."""

OTEL_EBPF_EXPORT_CONCURRENCY = "OTEL_EBPF_EXPORT_CONCURRENCY"
"""How many span export requests may be in flight at once."""

OTEL_LOG_LEVEL = "OTEL_LOG_LEVEL"
"""How much otel-ebpf logs (the specification's variable): debug, info, warn or error."""

OTEL_EBPF_MAX_DEPTH = "OTEL_EBPF_MAX_DEPTH"
"""How many nested probed calls are tracked per thread; deeper calls get no span."""

OTEL_EBPF_MAX_THREADS = "OTEL_EBPF_MAX_THREADS"
"""How many threads with probed calls in flight are tracked at once (LRU map size)."""

OTEL_EBPF_RING_BUFFER_SIZE = "OTEL_EBPF_RING_BUFFER_SIZE"
"""Size of the kernel-to-user ring buffer in bytes (suffix K or M allowed)."""

OTEL_EBPF_MIN_DURATION = "OTEL_EBPF_MIN_DURATION"
"""Calls shorter than this get no span unless a call nested in them got one."""

OTEL_EBPF_HTTP = "OTEL_EBPF_HTTP"
"""Whether HTTP/1.x requests to traced processes become SERVER spans that parent their probed calls."""

OTEL_EBPF_TLS = "OTEL_EBPF_TLS"
"""Whether HTTPS requests are read as OpenSSL's SSL_read/SSL_write see them (uprobes in followed processes)."""

OTEL_EBPF_RETRY_QUEUE_SIZE = "OTEL_EBPF_RETRY_QUEUE_SIZE"
"""Bytes of encoded spans kept in memory for a failing backend (suffix K or M allowed); the oldest go first."""

OTEL_EBPF_SPOOL_DIR = "OTEL_EBPF_SPOOL_DIR"
"""Directory that holds the retry queue instead of memory, so spans survive a restart."""

OTEL_EBPF_SPOOL_SIZE = "OTEL_EBPF_SPOOL_SIZE"
"""Bytes of spans OTEL_EBPF_SPOOL_DIR may hold (suffix K or M allowed); the oldest go first."""

DEBUGINFOD_URLS = "DEBUGINFOD_URLS"
"""debuginfod servers to fetch debug files from, space-separated, as elfutils and gdb read it."""

DEBUGINFOD_CACHE_PATH = "DEBUGINFOD_CACHE_PATH"
"""Where files fetched from debuginfod are kept."""

XDG_CACHE_HOME = "XDG_CACHE_HOME"
"""Base directory of otel-ebpf's caches (XDG Base Directory Specification)."""

SIGNALS = ("traces", "metrics")
"""The OTLP signals exported; each has its own OTEL_EXPORTER_OTLP_{SIGNAL}_* variables."""


@dataclass(frozen=True)
class ProbeSpec:
    """One binary and the symbols in it to trace."""

    binary: str
    symbols: tuple[str, ...]

    @property
    def is_pattern(self) -> bool:
        """A path glob (`*/bin/server`): the executables of processes found running or exec'ing that match it."""
        return any(char in self.binary for char in "*?[")


_PROBES_HINT = "write BINARY:SYMBOL[,SYMBOL...], entries separated by ';', e.g. /usr/bin/app:main;libssl.so.3:SSL_read"
# Operator names such as ``operator<<`` or ``operator,`` would otherwise look like brackets or separators.
_OPERATOR = re.compile(r"\boperator\s*(<=>|<<=|>>=|<<|>>|<=|>=|->\*?|<|>|\(\)|\[\]|,)")
_CLOSING = {")": "(", ">": "<", "]": "["}


def _split_symbols(text: str) -> list[str] | None:
    """Split at commas outside (), <> and []; None if those brackets do not balance."""
    masked = _OPERATOR.sub(lambda m: "_" * len(m[0]), text)
    parts, start, open_brackets = [], 0, []
    for i, char in enumerate(masked):
        if char in "(<[":
            open_brackets.append(char)
        elif char in _CLOSING:
            if not open_brackets or open_brackets.pop() != _CLOSING[char]:
                return None
        elif char == "," and not open_brackets:
            parts.append(text[start:i])
            start = i + 1
    if open_brackets:
        return None
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_probes(text: str, source: str = OTEL_EBPF_PROBES) -> list[ProbeSpec]:
    """Parse ``BINARY:SYMBOL[,SYMBOL...]`` entries separated by ``;``.

    The binary ends at the first ``:`` because C++ names contain ``::``; symbols are split
    only at top-level commas because demangled names like ``f(int, char)`` contain some.
    """
    specs = []
    for entry in (entry.strip() for entry in text.split(";")):
        if not entry:
            continue
        binary, colon, rest = entry.partition(":")
        if not colon:
            raise UserError(f"{source}: entry {entry!r} has no ':' between binary and symbols", _PROBES_HINT)
        if not binary.strip() or rest.startswith(":"):
            raise UserError(f"{source}: entry {entry!r} names no binary", _PROBES_HINT)
        symbols = _split_symbols(rest)
        if symbols is None:
            raise UserError(f"{source}: unbalanced brackets in {rest.strip()!r}", "check the (), <> and []")
        if not symbols:
            raise UserError(f"{source}: entry {entry!r} names no symbols", _PROBES_HINT)
        if any(symbol.startswith(":") for symbol in symbols):  # "x: :f" would read back as "x::f"
            raise UserError(f"{source}: a symbol in {entry!r} starts with ':'", _PROBES_HINT)
        specs.append(ProbeSpec(binary.strip(), tuple(symbols)))
    return specs


def parse_key_values(text: str, strict: bool = True) -> dict[str, str]:
    """``k=v,k2=v2`` as the spec defines it for resource attributes and OTLP headers: percent-decoded.

    Not strict, items that are not key=value are left out: a traced process's own OTEL_RESOURCE_ATTRIBUTES must
    not stop the tracer."""
    pairs = {}
    for item in filter(str.strip, text.split(",")):
        key, equals, value = item.partition("=")
        key = unquote(key.strip())
        if not equals or not key:
            if not strict:
                continue
            raise ValueError(f"{item.strip()!r} is not key=value (percent-encode ',' and '=' inside keys and values)")
        pairs[key] = unquote(value.strip())
    return pairs


def _headers(text: str) -> dict[str, str]:
    """Header names are case-insensitive and gRPC metadata keys must be lower case."""
    return {key.lower(): value for key, value in parse_key_values(text).items()}


def _milliseconds(text: str) -> float:
    """The spec gives durations in milliseconds; we keep seconds, which the SDK's classes take."""
    try:
        return float(text) / 1000
    except ValueError:
        raise ValueError("expected a number of milliseconds") from None


_DURATION_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def _duration_ns(text: str) -> int:
    """A duration with a unit (``2ms``, ``500us``, ``1.5s``); a bare number is milliseconds, as in OTEL_* variables."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s)?", text.lower())
    if not match:
        raise ValueError("expected a duration such as 2ms, 500us, 1.5s or 250ns (a bare number is milliseconds)")
    return round(float(match[1]) * _DURATION_UNITS_NS[match[2] or "ms"])


def _pids(text: str) -> tuple[int, ...]:
    pids = []
    for item in filter(str.strip, text.split(",")):
        if not item.strip().isdigit() or int(item) <= 0:
            raise ValueError(f"{item.strip()!r} is not a process id")
        pids.append(int(item))
    return tuple(dict.fromkeys(pids))


def parse_pids(text: str, source: str = OTEL_EBPF_PID) -> tuple[int, ...]:
    """Comma-separated process ids, as OTEL_EBPF_PID and --pid take them."""
    try:
        return _pids(text)
    except ValueError as exc:
        raise UserError(f"{source} {text!r} is invalid: {exc}", "give process ids, e.g. --pid 4711") from None


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number from 0 to 1") from None


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError("expected true or false")
    return text.lower() == "true"


def _protocol(text: str) -> str:
    if text.lower() == "http/json":
        raise ValueError("http/json is not supported, use http/protobuf (or grpc)")
    return text.lower()


_EXPORTERS = ("otlp", "console", "none")


def _exporters(text: str) -> tuple[str, ...]:
    """Comma-separated exporter names; ``none`` contributes nothing, so ``none`` alone exports nothing."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in _EXPORTERS:
            raise ValueError(f"unknown exporter {name!r}, valid ones are {', '.join(_EXPORTERS)}")
    return tuple(dict.fromkeys(name for name in names if name != "none"))


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kKmM]?)", text)
    if not match:
        raise ValueError("expected a whole number of bytes, optionally with suffix K or M, e.g. 8M")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def _with_suffix(size: int) -> str:
    for suffix, unit in (("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def _power_of_two(size: int) -> int:
    """The kernel rejects BPF ring buffers whose size is not a power-of-two number of pages."""
    if size < 4096 or size & (size - 1):
        lower = 1 << max(size.bit_length() - 1, 12)
        nearest = lower if size - lower <= 2 * lower - size else 2 * lower
        raise ValueError(f"must be a power of two >= 4096, nearest valid value is {_with_suffix(nearest)}")
    return size


def _urls(text: str) -> tuple[str, ...]:
    """Space-separated http(s) URLs; elfutils' ima: policy words are not ours to apply and are skipped."""
    urls = tuple(word for word in text.split() if not word.startswith("ima:"))
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return urls


def _xdg_directory(path: str) -> str | None:
    """The XDG Base Directory Specification says to ignore a relative path, as if the variable were unset."""
    return path if os.path.isabs(path) else None


def _existing_file(path: str) -> str:
    """Fail at start-up rather than at the first export, which may be minutes later."""
    if not os.path.isfile(path):
        raise ValueError("no such file")
    return path


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
ExistingFile = Annotated[str, AfterValidator(_existing_file)]


class OtlpSettings(BaseModel):
    """Where and how the OTLP exporter sends one signal; ``endpoint`` is final, exporters use it as-is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: Literal[SIGNALS] = "traces"
    protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    endpoint: str = Field("", validate_default=True)
    headers: dict[str, str] = {}
    timeout_s: Seconds = 10.0
    compression: Literal["gzip", "none"] = "none"
    insecure: bool = Field(False, validate_default=True)
    certificate: ExistingFile | None = None
    client_key: ExistingFile | None = None
    client_certificate: ExistingFile | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, endpoint: str, info: ValidationInfo) -> str:
        """An empty endpoint means the spec's default for the protocol and signal."""
        grpc = info.data.get("protocol") == "grpc"
        if not endpoint:
            return "http://localhost:4317" if grpc else f"http://localhost:4318/v1/{info.data.get('signal')}"
        url = urlsplit(endpoint)
        if not grpc and not (url.scheme in ("http", "https") and url.netloc):
            raise ValueError("expected an http:// or https:// URL")
        if "://" in endpoint and url.scheme not in ("http", "https"):
            raise ValueError("the scheme must be http or https")
        return endpoint

    @field_validator("insecure")
    @classmethod
    def _scheme_decides(cls, insecure: bool, info: ValidationInfo) -> bool:
        """The spec lets an http:// or https:// scheme take precedence over the insecure setting."""
        scheme = urlsplit(info.data.get("endpoint", "")).scheme
        return scheme == "http" if scheme in ("http", "https") else insecure


_TRACE_ID_RANGE = 1 << 64


class SamplerSettings(BaseModel):
    """OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, reduced to the decision the kernel makes for a new trace.

    The kernel has no floating point, so a trace root is sampled iff ``sample_all`` or the lower 64 bits of its
    trace id, read as a big-endian unsigned integer, are below ``bound``: the algorithm of the Python SDK's
    TraceIdRatioBased, so a trace sampled at some ratio is also sampled at every higher ratio.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal[
        "always_on", "always_off", "traceidratio",
        "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
    ] = "parentbased_always_on"
    ratio: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0

    @property
    def parent_based(self) -> bool:
        """ParentBased: a span with a parent follows the parent's decision, only roots consult the rule below.

        The other samplers decide from the trace id alone, so all spans of a trace agree anyway; the
        difference will matter for parents in other processes (remote parents).
        """
        return self.name.startswith("parentbased_")

    @property
    def _exact_bound(self) -> int:
        root = self.name.removeprefix("parentbased_")
        if root == "traceidratio":
            return round(self.ratio * _TRACE_ID_RANGE)
        return _TRACE_ID_RANGE if root == "always_on" else 0

    @property
    def sample_all(self) -> bool:
        """Every root is sampled: 2**64 does not fit the kernel's 64-bit comparison, hence this flag."""
        return self._exact_bound == _TRACE_ID_RANGE

    @property
    def bound(self) -> int:
        """Roots whose trace id's lower 64 bits are below this are sampled (0: none); fits in a u64."""
        return min(self._exact_bound, _TRACE_ID_RANGE - 1)

    def samples(self, trace_id: bytes) -> bool:
        """The same rule the kernel applies, for traces whose root user space decides (HTTP requests)."""
        return self.sample_all or int.from_bytes(trace_id[8:16], "big") < self.bound


class Settings(BaseModel):
    """Everything the tracer needs; built by :func:`load_settings`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    probes: list[ProbeSpec] = []
    pids: tuple[Annotated[int, Field(gt=0)], ...] = ()
    service_name: str | None = None
    resource_attributes: dict[str, str] = {}
    traces_exporters: tuple[Literal["otlp", "console"], ...] = ("console",)
    metrics_exporters: tuple[Literal["otlp", "console"], ...] = ()
    otlp: OtlpSettings = OtlpSettings(signal="traces")
    otlp_metrics: OtlpSettings = OtlpSettings(signal="metrics")
    sampler: SamplerSettings = SamplerSettings()
    bsp_schedule_delay_s: Seconds = 5.0
    bsp_max_export_batch_size: Annotated[int, Field(gt=0)] = 4096
    bsp_max_queue_size: Annotated[int, Field(gt=0)] = 16384
    bsp_export_timeout_s: Seconds = 30.0
    metric_export_interval_s: Seconds = 60.0
    metric_export_timeout_s: Seconds = 30.0
    max_depth: Annotated[int, Field(ge=1, le=128)] = 32
    max_threads: Annotated[int, Field(ge=64, le=1 << 20)] = 16384
    ring_buffer_size: Annotated[int, AfterValidator(_power_of_two)] = 8 << 20
    min_duration_ns: Annotated[int, Field(ge=0)] = 0
    http: bool = True
    tls: bool = True
    retry_queue_size: Annotated[int, Field(ge=0)] = 64 << 20
    spool_dir: str | None = None
    spool_size: Annotated[int, Field(gt=0)] = 256 << 20
    shutdown_timeout_s: Seconds = 5.0
    export_concurrency: Annotated[int, Field(ge=1, le=16)] = 4
    attach: Literal["auto", "multi", "perf", "tracefs"] = "auto"
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    debuginfod_urls: tuple[str, ...] = ()
    debuginfod_cache_path: str | None = None
    cache_home: str | None = None

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> "Settings":
        if self.bsp_max_export_batch_size > self.bsp_max_queue_size:
            raise UserError(
                f"{OTEL_BSP_MAX_EXPORT_BATCH_SIZE}={self.bsp_max_export_batch_size} is larger than "
                f"{OTEL_BSP_MAX_QUEUE_SIZE}={self.bsp_max_queue_size}",
                "a batch is taken from the queue, so make the batch size at most the queue size",
            )
        return self


@dataclass(frozen=True)
class _Var:
    """One setting read from the environment: the first of ``names`` that is set wins.

    For OTLP exporter options ``signal`` names the signal whose specific variable comes first in ``names``.
    """

    field: str
    names: tuple[str, ...]
    default: str | None
    meaning: str
    parse: Callable[[str], Any] = str
    signal: str | None = None


_OTLP_GROUPS = {"traces": "otlp", "metrics": "otlp_metrics"}
"""The Settings field holding each signal's OtlpSettings."""

# (field, variable suffix, default, meaning, parse) of each OTLP exporter option: the spec reads it from
# OTEL_EXPORTER_OTLP_{SIGNAL}_{SUFFIX}, then from OTEL_EXPORTER_OTLP_{SUFFIX}.
_OTLP_OPTIONS = (
    ("protocol", "PROTOCOL", "http/protobuf", "grpc or http/protobuf.", _protocol),
    ("endpoint", "ENDPOINT", None,
     "Collector URL; for http/protobuf /v1/traces or /v1/metrics is appended (not to the signal-specific variables). "
     "Default http://localhost:4318 (grpc: http://localhost:4317).", str),
    ("headers", "HEADERS", None, "Request headers, k=v,k2=v2, percent-encoded.", _headers),
    ("timeout_s", "TIMEOUT", "10000", "Export request timeout, ms.", _milliseconds),
    ("compression", "COMPRESSION", "none", "gzip or none.", str.lower),
    ("insecure", "INSECURE", "false",
     "true: grpc without TLS; only used when the endpoint has no http:// or https:// scheme.", _boolean),
    ("certificate", "CERTIFICATE", None, "CA certificate file to verify the collector.", str),
    ("client_key", "CLIENT_KEY", None, "Client private key file for mTLS.", str),
    ("client_certificate", "CLIENT_CERTIFICATE", None, "Client certificate file for mTLS.", str),
)

_OTLP_VARS = tuple(
    _Var(f"{_OTLP_GROUPS[signal]}.{field}",
         (f"OTEL_EXPORTER_OTLP_{signal.upper()}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"),
         default, meaning, parse, signal)
    for field, suffix, default, meaning, parse in _OTLP_OPTIONS
    for signal in SIGNALS
)


def _exporters_meaning(signal: str, fallback: str) -> str:
    return (f"Comma-separated otlp, console, none. Default: otlp if {OTEL_EXPORTER_OTLP_ENDPOINT} or "
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT is set, else {fallback}.")


# The only list of variables: load_settings reads them and SETTINGS_DOC documents them.
_VARS = (
    _Var("probes", (OTEL_EBPF_PROBES,), None,
         "What to trace: BINARY:SYMBOL[,SYMBOL...] entries separated by ';'.", parse_probes),
    _Var("pids", (OTEL_EBPF_PID,), None,
         "Trace only these process ids (comma-separated) and the processes they start.", _pids),
    _Var("service_name", (OTEL_SERVICE_NAME,), None, "service.name of the spans' and metrics' resource."),
    _Var("resource_attributes", (OTEL_RESOURCE_ATTRIBUTES,), None,
         "Resource attributes, k=v,k2=v2, percent-encoded.", parse_key_values),
    _Var("traces_exporters", (OTEL_TRACES_EXPORTER,), None, _exporters_meaning("traces", "console"), _exporters),
    _Var("metrics_exporters", (OTEL_METRICS_EXPORTER,), None, _exporters_meaning("metrics", "none"), _exporters),
    _Var("sampler.name", (OTEL_TRACES_SAMPLER,), "parentbased_always_on",
         "Which traces get spans: always_on, always_off, traceidratio, or parentbased_ and one of these. "
         "The root call of a trace decides, nested calls follow it.", str.lower),
    _Var("sampler.ratio", (OTEL_TRACES_SAMPLER_ARG,), "1.0",
         "Share of traces the traceidratio samplers keep, 0 to 1.", _ratio),
    *_OTLP_VARS,
    _Var("bsp_schedule_delay_s", (OTEL_BSP_SCHEDULE_DELAY,), "5000",
         "Delay between two batch exports, ms.", _milliseconds),
    _Var("bsp_max_export_batch_size", (OTEL_BSP_MAX_EXPORT_BATCH_SIZE,), "4096",
         "Most spans per export; at most the queue size. Not the SDK's 512: a request costs the sidecar about "
         "0.5 ms of CPU whatever its size, 1 us a span at 512 (4096 spans are about 0.7 MB, far below gRPC's 4 MiB "
         "limit)."),
    _Var("bsp_max_queue_size", (OTEL_BSP_MAX_QUEUE_SIZE,), "16384",
         "Most spans waiting for export in the sidecar; more wait in the kernel's ring buffer. Not the SDK's 2048: "
         "four batches of 4096, one for each request in flight."),
    _Var("bsp_export_timeout_s", (OTEL_BSP_EXPORT_TIMEOUT,), "30000",
         "Longest a batch export may take, ms; at exit, also how long queued spans may take to be delivered.",
         _milliseconds),
    _Var("metric_export_interval_s", (OTEL_METRIC_EXPORT_INTERVAL,), "60000",
         "Delay between two metric exports, ms.", _milliseconds),
    _Var("metric_export_timeout_s", (OTEL_METRIC_EXPORT_TIMEOUT,), "30000",
         "Longest a metric export may take, ms.", _milliseconds),
    _Var("max_depth", (OTEL_EBPF_MAX_DEPTH,), "32",
         "Nested probed calls tracked per thread (1-128); deeper ones get no span."),
    _Var("max_threads", (OTEL_EBPF_MAX_THREADS,), "16384",
         "Threads with probed calls in flight tracked at once (64-1048576); as many connections and requests "
         "for HTTP, beyond which the oldest are forgotten (counted: otel_ebpf.http.evicted)."),
    _Var("ring_buffer_size", (OTEL_EBPF_RING_BUFFER_SIZE,), "8M",
         "Kernel-to-user ring buffer, bytes (K/M suffix), a power of two >= 4096.", _byte_size),
    _Var("min_duration_ns", (OTEL_EBPF_MIN_DURATION,), "0",
         "Calls shorter than this get no span unless a call nested in them got one; "
         "unit ns, us, ms or s (a bare number is ms); 0: off.", _duration_ns),
    _Var("http", (OTEL_EBPF_HTTP,), "true",
         "true: HTTP/1.x requests to traced processes become SERVER spans, parents of the probed calls "
         "that serve them (joining the caller's trace through its traceparent header).", _boolean),
    _Var("tls", (OTEL_EBPF_TLS,), "true",
         "true (with OTEL_EBPF_HTTP): HTTPS requests too, read in plaintext at OpenSSL's SSL_read and SSL_write "
         "(uprobes on the libssl each followed process maps, or on its own binary if it exports them).",
         _boolean),
    _Var("retry_queue_size", (OTEL_EBPF_RETRY_QUEUE_SIZE,), "64M",
         "Encoded spans kept in memory while the backend fails, bytes (K/M suffix); past it the oldest are "
         "dropped. 0: a failed batch is dropped.", _byte_size),
    _Var("spool_dir", (OTEL_EBPF_SPOOL_DIR,), None,
         "Keep the retry queue in this directory instead of memory, one file per batch, so that spans not yet "
         "delivered at exit are sent by the next run. Created if missing; one otel-ebpf per directory."),
    _Var("spool_size", (OTEL_EBPF_SPOOL_SIZE,), "256M",
         "Most bytes of spans in OTEL_EBPF_SPOOL_DIR (K/M suffix); past it the oldest are dropped.", _byte_size),
    _Var("shutdown_timeout_s", (OTEL_EBPF_SHUTDOWN_TIMEOUT,), "5000",
         "Longest shutting down may take after SIGTERM/SIGINT or the command's exit, ms: probes are detached first, "
         "then what is left is drained and exported; it caps OTEL_BSP_EXPORT_TIMEOUT and OTEL_METRIC_EXPORT_TIMEOUT "
         "then. Keep it below the grace period before SIGKILL (Docker 10 s, Kubernetes "
         "terminationGracePeriodSeconds).", _milliseconds),
    _Var("attach", (OTEL_EBPF_ATTACH,), "auto",
         "How uprobes are attached: multi (one multi-uprobe link per file, Linux 6.6+), perf (one perf event per "
         "probe), tracefs (one per probe, through tracefs's uprobe_events), or auto: multi where the kernel has "
         "them, else perf, else tracefs.", str.lower),
    _Var("export_concurrency", (OTEL_EBPF_EXPORT_CONCURRENCY,), "4",
         "Span export requests in flight at once (1-16): on a busy machine a request's round trip is mostly waiting "
         "for the backend, and one at a time would make that wait the limit of what is exported."),
    _Var("log_level", (OTEL_LOG_LEVEL,), "info", "debug, info, warn or error.", str.lower),
    _Var("debuginfod_urls", (DEBUGINFOD_URLS,), None,
         "Space-separated debuginfod servers: the debug file of a stripped binary that has none installed is "
         "fetched from them (GET URL/buildid/ID/debuginfo).", _urls),
    _Var("debuginfod_cache_path", (DEBUGINFOD_CACHE_PATH,), None,
         "Where debug files fetched from debuginfod are kept. Default: otel-ebpf/debuginfod in XDG_CACHE_HOME, "
         "or a private directory in the temp directory when that cannot be written (a read-only root filesystem)."),
    _Var("cache_home", (XDG_CACHE_HOME,), None,
         "Base of otel-ebpf's caches: parsed symbol tables in otel-ebpf/symbols (none if it cannot be written), "
         "debuginfod downloads in otel-ebpf/debuginfod. Default ~/.cache.", _xdg_directory),
)


def _doc_rows() -> list[tuple[str, str, str]]:
    """One row per variable; a generic OTLP variable shared by several signals is listed once."""
    rows: dict[str, tuple[str, str, str]] = {}
    for var in _VARS:
        *specific, general = var.names
        rows.setdefault(general, (general, var.default or "", var.meaning))
        for name in specific:
            rows[name] = (name, var.default or "", f"Like {general}, for {var.signal} only; wins over it.")
    return list(rows.values())


SETTINGS_DOC: list[tuple[str, str, str]] = _doc_rows()
"""(variable, default, meaning) for every variable read, for the README and ``--help``."""


def _invalid(var: _Var | None, name: str, value: object, reason: str) -> UserError:
    if var is None:
        return UserError(f"{name}={value!r} is invalid: {reason}", f"check the value given for {name}")
    default = f" to use the default {var.default}" if var.default else ""
    return UserError(f"{name}={value!r} is invalid: {reason}", f"fix {name} or unset it{default}")


def _lookup(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of ``names`` with a value; the spec treats empty values as unset."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _from_validation_error(exc: ValidationError, found: dict[str, tuple[_Var, str, str]]) -> UserError:
    """Name the environment variable (or argument) and the value the user gave, not pydantic's field path."""
    error = exc.errors()[0]
    reason = str(error["ctx"]["error"]) if "error" in error.get("ctx", {}) else error["msg"]
    path = [str(part) for part in error["loc"]]
    for depth in range(len(path), 0, -1):
        if ".".join(path[:depth]) in found:
            var, name, text = found[".".join(path[:depth])]
            return _invalid(var, name, text, reason)
    return _invalid(None, ".".join(path), error["input"], reason)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``overrides`` (None means not given), then ``environ`` (default os.environ), then defaults.

    Raises UserError naming the variable and its value for anything invalid.
    """
    environ = os.environ if environ is None else environ
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if unknown := overrides.keys() - Settings.model_fields.keys():
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {group: {"signal": signal} for signal, group in _OTLP_GROUPS.items()}
    found: dict[str, tuple[_Var, str, str]] = {}
    for var in _VARS:
        hit = _lookup(environ, var.names)
        if var.field in overrides or (hit is None and var.default is None):
            continue
        name, text = hit or (var.names[-1], var.default)
        try:
            value = var.parse(text)
        except ValueError as exc:
            raise _invalid(var, name, text, str(exc)) from None
        if hit:
            found[var.field] = (var, name, text)
        group, _, key = var.field.rpartition(".")
        (values.setdefault(group, {}) if group else values)[key] = value

    for signal, group in _OTLP_GROUPS.items():
        endpoint = found.get(f"{group}.endpoint")
        if endpoint and endpoint[1] == OTEL_EXPORTER_OTLP_ENDPOINT and values[group]["protocol"] == "http/protobuf":
            values[group]["endpoint"] = endpoint[2].rstrip("/") + f"/v1/{signal}"
        exporters = f"{signal}_exporters"
        if exporters not in found and exporters not in overrides:
            values[exporters] = ("otlp",) if endpoint else Settings.model_fields[exporters].default

    values.update(overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise _from_validation_error(exc, found) from None
