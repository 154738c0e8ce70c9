"""Real servers from Debian for the end-to-end tests, started from a private directory on 127.0.0.1."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from pathlib import Path

NGINX = Path("/usr/sbin/nginx")
# Exported by Debian's nginx (built for dynamic modules, so its functions are in .dynsym): called once per request.
NGINX_FUNCTION = "ngx_http_process_request"


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
    have open (beyond, nginx closes idle keep-alive ones)."""

    def __init__(self, directory: Path, workers: int = 2, big_file: int = 0, tls: bool = False,
                 connections: int = 64):
        self.directory, self.port = directory, free_port()
        (directory / "html").mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{self.port} reuseport"
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
