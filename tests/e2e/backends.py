"""Real backends on loopback: Jaeger v2 and an OpenTelemetry Collector, built by tests/backends/Makefile, each
run from a configuration the test writes, and Jaeger's query API read the way its UI reads it."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from pathlib import Path

import requests
from google.protobuf import json_format
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from tests.e2e.conftest import Lines, clean_env
from tests.otlp_receiver import any_value
from tests.waiting import wait_until

BACKENDS = Path(__file__).resolve().parents[1] / "backends"
JAEGER, OTELCOL = BACKENDS / "bin" / "jaeger", BACKENDS / "bin" / "otelcol"
READY = r".*Everything is ready"  # what both log once every pipeline runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_backends() -> None:
    """`make -C tests/backends`: nothing to do once built; the first build takes minutes."""
    result = subprocess.run(["make", "-C", str(BACKENDS)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"make -C tests/backends failed:\n{result.stdout}{result.stderr}")


class Backend:
    """A collector-style program (Jaeger v2 is one) run with a configuration written as JSON, which YAML reads;
    subclasses set the ports its OTLP receiver listens on."""

    grpc_port: int
    http_port: int

    def __init__(self, binary: Path, config: dict, workdir: Path, name: str):
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self._argv = [str(binary), "--config", str(self.config_path)]
        self.proc: subprocess.Popen | None = None
        self.log: Lines | None = None

    def start(self, ready: bool = True) -> Backend:
        self.proc = subprocess.Popen(self._argv, env=clean_env(), text=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.log = Lines(self.proc.stderr)
        if ready:
            try:
                self.log.wait_for(READY, timeout=60)
            except AssertionError as exc:
                self.stop()
                raise AssertionError(f"{self._argv[0]} did not start: {exc}\n{self.log.text()}") from None
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def otlp_receiver_config(grpc_port: int, http_port: int) -> dict:
    return {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{grpc_port}"},
                                   "http": {"endpoint": f"127.0.0.1:{http_port}"}}}}


class Jaeger(Backend):
    """Jaeger v2 all-in-one with in-memory storage: OTLP in on two ports, the query service (UI API and /api/v3)
    on a third."""

    def __init__(self, workdir: Path, http_port: int | None = None):
        """`http_port`: where OTLP/HTTP is received, e.g. the port a Collector already exports to."""
        self.grpc_port, self.query_port, query_grpc = (free_port() for _ in range(3))
        self.http_port = http_port or free_port()
        config = {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]}},
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
            },
            "extensions": {
                "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 100000}}}},
                # enable_tracing off: Jaeger would trace its own queries to localhost:4317 and, finding nothing
                # there, wait out its export timeout at every shutdown.
                "jaeger_query": {"storage": {"traces": "memstore"}, "enable_tracing": False,
                                 "http": {"endpoint": f"127.0.0.1:{self.query_port}"},
                                 "grpc": {"endpoint": f"127.0.0.1:{query_grpc}"}},
            },
            "receivers": otlp_receiver_config(self.grpc_port, self.http_port),
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
        }
        super().__init__(JAEGER, config, workdir, f"jaeger-{self.query_port}")
        self.query = f"http://127.0.0.1:{self.query_port}"

    def get(self, path: str, **params) -> dict:
        response = requests.get(self.query + path, params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def services(self) -> set[str]:
        """What the UI's service drop-down lists (the UI's /api/services and /api/v3 agree)."""
        ui = set(self.get("/api/services")["data"] or ())
        assert ui == set(self.get("/api/v3/services")["services"]), "the two APIs list different services"
        return ui

    def ui_traces(self, service: str, limit: int = 1000) -> list[dict]:
        """The traces the UI's search shows for a service: Jaeger's JSON (spans, processes, references)."""
        return self.get("/api/traces", service=service, limit=limit, lookback="1h")["data"]

    def ui_trace(self, trace_id: str) -> dict:
        """One trace as the UI's trace view gets it."""
        [trace] = self.get(f"/api/traces/{trace_id}")["data"]
        return trace

    def otlp_trace(self, trace_id: str) -> list[tuple[dict, object]]:
        """One trace from /api/v3 as (resource attributes, OTLP Span) pairs, the receiver's shape."""
        return otlp_spans(self.get(f"/api/v3/traces/{trace_id}", raw_traces="true")["result"])

    def wait_for_spans(self, service: str, count: int, timeout_s: float = 30) -> list[dict]:
        """The UI's traces of `service` once they hold `count` spans of that service (Jaeger stores a batch
        asynchronously after acknowledging it)."""
        found: list[dict] = []

        def complete() -> bool:
            found[:] = self.ui_traces(service)
            return sum(own_spans(trace, service) for trace in found) >= count

        wait_until(complete, f"{count} spans of {service} in Jaeger", timeout_s)
        return found


def own_spans(trace: dict, service: str) -> int:
    return sum(trace["processes"][span["processID"]]["serviceName"] == service for span in trace["spans"])


def otlp_spans(result: dict) -> list[tuple[dict, object]]:
    """/api/v3's OTLP JSON (ids in hex, as OTLP/JSON writes them) parsed into TracesData."""
    for resource_spans in result.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                for link in span.get("links", ()):
                    for key in ("traceId", "spanId"):
                        link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
    data = json_format.ParseDict(result, TracesData(), ignore_unknown_fields=True)
    out = []
    for group in data.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in group.resource.attributes}
        out.extend((resource, span) for scope in group.scope_spans for span in scope.spans)
    return out


class Collector(Backend):
    """The Collector built from tests/backends/collector: OTLP gRPC and HTTP in (with `grpc` and `http` receiver
    options, on `ports` if given), `processors` (names: configs), then OTLP/HTTP out to `export_to` (a base URL)
    with `exporter` options."""

    def __init__(self, workdir: Path, export_to: str, processors: dict | None = None, exporter: dict | None = None,
                 grpc: dict | None = None, http: dict | None = None, ports: tuple[int, int] | None = None):
        self.grpc_port, self.http_port = ports or (free_port(), free_port())
        processors = processors or {}
        receivers = otlp_receiver_config(self.grpc_port, self.http_port)
        receivers["otlp"]["protocols"]["grpc"].update(grpc or {})
        receivers["otlp"]["protocols"]["http"].update(http or {})
        config = {
            "service": {
                "pipelines": {"traces": {"receivers": ["otlp"], "processors": list(processors),
                                         "exporters": ["otlp_http"]}},
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
            },
            "receivers": receivers,
            "processors": processors,
            "exporters": {"otlp_http": {"endpoint": export_to, **(exporter or {})}},
        }
        super().__init__(OTELCOL, config, workdir, f"collector-{self.grpc_port}")


def validate(config: Path) -> subprocess.CompletedProcess:
    """The built Collector's own check of a configuration file."""
    return subprocess.run([str(OTELCOL), "validate", "--config", str(config)], capture_output=True, text=True,
                          env=clean_env())
