"""gRPC over HTTP/2 (gRPC's PROTOCOL-HTTP2) -> the name, attributes and status of a SERVER or CLIENT span, as the RPC
semantic conventions name them: rpc.system.name "grpc", rpc.method fully qualified ("package.Service/Method",
also the span's name), rpc.response.status_code as the code's name; status Error, with error.type: on a SERVER
span only for the codes that say the server failed, on a CLIENT span for every code but OK."""

from __future__ import annotations

from typing import Callable

from otel_ebpf.protocols.http1 import Address, split_host_port
from otel_ebpf.protocols.http2 import Stream

CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
         "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
         "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
# The codes the conventions count as errors of a SERVER span; the others are the caller's.
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def is_grpc(stream: Stream) -> bool:
    return stream.headers.get("content-type", "").startswith("application/grpc")


def method(path: str) -> str | None:
    """"/package.Service/Method" -> "package.Service/Method"; None for a path of another shape."""
    service, slash, name = path.removeprefix("/").partition("/")
    return f"{service}/{name}" if path.startswith("/") and service and slash and name and "/" not in name else None


def status_name(code: str | None) -> str | None:
    """A grpc-status value as the code's name (an unknown number stays a number)."""
    if code is None or not code.isdigit():
        return None
    return CODES[int(code)] if int(code) < len(CODES) else code


def server_span(stream: Stream, peer: Address | None, local: Address | None) -> tuple[str, dict[str, str | int]]:
    """The SERVER span's name and attributes; an error only for SERVER_ERRORS."""
    name, attrs = _span(stream, peer, local, lambda status: status in SERVER_ERRORS)
    if peer is not None:
        attrs["client.address"] = peer[0]
    return name, attrs


def client_span(stream: Stream, server: Address | None) -> tuple[str, dict[str, str | int]]:
    """The CLIENT span's name and attributes (`server`: the address connected to); every code but OK is an
    error of the call."""
    return _span(stream, server, server, lambda status: status != "OK")


def _span(stream: Stream, peer: Address | None, server: Address | None,
          is_error: Callable[[str], bool]) -> tuple[str, dict[str, str | int]]:
    full = method(stream.headers.get(":path", ""))
    attrs: dict[str, str | int] = {"rpc.system.name": "grpc"}
    if full:
        attrs["rpc.method"] = full
    status = status_name(stream.response.get("grpc-status"))
    if status is not None:
        attrs["rpc.response.status_code"] = status
        if is_error(status):
            attrs["error.type"] = status
    authority = stream.headers.get(":authority")
    server = split_host_port(authority) if authority else server
    if server and server[0]:
        attrs["server.address"] = server[0]
        if server[1] is not None:
            attrs["server.port"] = server[1]
    if peer is not None:
        attrs["network.peer.address"], attrs["network.peer.port"] = peer
    return full or "grpc", attrs
