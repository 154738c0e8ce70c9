"""Real servers from Debian for the end-to-end tests, started from a private directory on 127.0.0.1, and what
the tests of their requests share: a request as the client saw it, the tracer's settings and output."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NGINX = Path("/usr/sbin/nginx")
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LIBCURL = "/usr/lib/x86_64-linux-gnu/libcurl.so.4"  # curl's transfers: curl_easy_perform
# Exported by Debian's nginx (built for dynamic modules, so its functions are in .dynsym): called once per request.
NGINX_FUNCTION = "ngx_http_process_request"


@dataclass
class Exchange:
    """One request as the client saw it."""

    method: str
    path: str
    trace_id: str
    span_id: str
    client_port: int
    sent_ns: int = 0
    received_ns: int = 0  # the response's last byte
    status: int = 0
    drained_ns: int = 0  # a body larger than the socket buffers: when all but what they hold had arrived


def traces_to(receiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.http_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_LOG_LEVEL": "debug"}


def command_pid(t) -> int:
    return int(re.search(r" in pid (\d+) and its descendants", t.stderr)[1])


def wait_for_tls_in(t, wanted: Callable[[int], bool]) -> None:
    """Until OpenSSL's uprobes are on in a process `wanted` accepts. They go on per process, once the kernel
    announced it (a forked worker at its first wait for events, a few ms after its fork), or once a look at
    its mappings finds a libssl it loaded (TLS_RESCAN_S). Requests sent before then are not read (README,
    "Joining existing traces")."""
    deadline = time.monotonic() + 30
    while not any(wanted(int(pid)) for pid in re.findall(r"reading TLS plaintext of pid (\d+) ", t.stderr)):
        assert time.monotonic() < deadline and t.proc.poll() is None, t.stderr
        time.sleep(0.01)  # polling the condition: the tracer's stderr grows as it attaches


def exported_spans(t, receiver) -> list:
    """Every span the finished tracer says it exported, as the receiver got them."""
    exported = int(re.search(r"otel-ebpf: (\d+) spans exported, 0 lost", t.stderr)[1])
    return receiver.wait_for_spans(exported, timeout=20)


def traced_nginx(tracer, receiver, nginx: Nginx, **env: str):
    """`otel-ebpf trace nginx ngx_http_process_request -- nginx ...` exporting to `receiver`, once nginx serves:
    listening and, with TLS, OpenSSL's uprobes on in a worker. The caller stops nginx, whatever happens."""
    t = tracer(["trace", str(NGINX), NGINX_FUNCTION, "--", *nginx.argv()], **env, **traces_to(receiver))
    t.wait_ready()
    wait_for_port(nginx.port)
    if nginx.tls:
        master = command_pid(t)
        wait_for_tls_in(t, lambda pid: pid != master)
    return t


def connect(port: int, tls: bool, alpn: str | None = None) -> socket.socket:
    """A client's connection to 127.0.0.1:port; with `tls` over TLS (any certificate: the servers' are
    self-signed), offering `alpn` if given."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    if not tls:
        return conn
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols([alpn])
    conn = context.wrap_socket(conn)
    assert alpn is None or conn.selected_alpn_protocol() == alpn, f"{alpn} not negotiated"
    return conn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with openssl in `directory`."""
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(certificate)], check=True, capture_output=True, timeout=60)
    return certificate, key


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on 127.0.0.1:{port} within {timeout}s"
            time.sleep(0.05)


class Nginx:
    """nginx with two workers in `directory`: a static file (and big.bin of `big_file` bytes), a 503, static
    files sent with sendfile (with `tls`, HTTPS: written with SSL_write), and an access log that says which worker
    (pid) served which request (its traceparent), as the ground truth. `connections`: how many each worker may
    have open (beyond, nginx closes idle keep-alive ones). `http2`: HTTP/2 only, by prior knowledge (h2c), or
    with `tls` negotiated by ALPN."""

    def __init__(self, directory: Path, workers: int = 2, big_file: int = 0, tls: bool = False,
                 connections: int = 64, http2: bool = False):
        self.directory, self.port, self.tls = directory, free_port(), tls
        (directory / "html").mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{self.port} reuseport" + (" http2" if http2 else "")
        if tls:
            certificate, key = self_signed(directory)
            listen += f" ssl;\n        ssl_certificate {certificate};\n        ssl_certificate_key {key}"
        (directory / "html" / "index.html").write_text("hello\n")
        if big_file:
            with open(directory / "html" / "big.bin", "wb") as f:
                f.truncate(big_file)  # sparse: zeros that take no disk
        (directory / "tmp").mkdir(exist_ok=True)
        temp = " ".join(f"{kind}_temp_path {directory / 'tmp'};"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (directory / "nginx.conf").write_text(f"""
user root;  # the workers read files under the test's private temporary directory
worker_processes {workers};
pid {directory / 'nginx.pid'};
error_log {directory / 'error.log'};
events {{ worker_connections {connections}; }}
http {{
    log_format served '$pid $http_traceparent $uri';
    access_log {directory / 'access.log'} served;
    sendfile on;
    {temp}
    server {{
        listen {listen};
        root {directory / 'html'};
        location /busy {{ return 503; }}
    }}
}}
""")

    def argv(self, foreground: bool = True) -> list[str]:
        return [str(NGINX), *(["-g", "daemon off;"] if foreground else []), "-c", str(self.directory / "nginx.conf"),
                "-p", str(self.directory)]

    def get(self, path: str = "/", traceparent: str | None = None) -> int:
        """One request on a connection of its own; returns the status."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers={"traceparent": traceparent} if traceparent else {})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def served(self) -> list[tuple[int, str, str]]:
        """(worker pid, traceparent, path) of every request, in the order nginx logged them."""
        log = self.directory / "access.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [(int(pid), traceparent, path) for pid, traceparent, path in (line.split() for line in lines)]

    def master_pid(self) -> int:
        return int((self.directory / "nginx.pid").read_text())

    def stop(self) -> None:
        subprocess.run(self.argv(foreground=False) + ["-s", "quit"], capture_output=True, timeout=30)
