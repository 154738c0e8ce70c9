"""OTLP transports (HTTP and gRPC, both signals) against a real OTLP receiver on 127.0.0.1."""

import shutil
import time

import grpc
import pytest

from otel_ebpf.config import load_settings
from otel_ebpf.errors import UserError
from otel_ebpf.otlp.transport import (
    USER_AGENT,
    ExportError,
    GrpcTransport,
    HttpTransport,
    RetryableError,
    _parse_retry_after,
    otlp_transport,
)
from tests.otlp_receiver import OtlpReceiver, make_certificates
from tests.unit.otlp_helpers import ENCODE, encode, encode_metrics, names_received


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_payload_and_headers_arrive(kind, compression, receiver, transports):
    transport = transports(kind, receiver, headers={"Authorization": "Bearer s3cret"}, compression=compression)
    payload = encode(f"span-{i}" for i in range(50))

    assert transport.send(payload, time.monotonic() + 5) == 0

    spans = receiver.wait_for_spans(50)
    assert [span.name for _, span in spans] == [f"span-{i}" for i in range(50)]
    assert spans[0][0] == {"service.name": "test-svc"}
    headers = receiver.headers[0]
    assert headers["authorization"] == "Bearer s3cret"
    assert headers["user-agent"].startswith(USER_AGENT)
    if kind == "http":  # a gRPC server never sees the wire encoding, so only HTTP can show it
        assert headers["content-type"] == "application/x-protobuf"
        if compression == "gzip":
            assert headers["content-encoding"] == "gzip"
            assert receiver.bytes_received < len(payload) / 2
        else:
            assert receiver.bytes_received == len(payload)


def test_retryable_failures_are_retried_and_delivered_once(kind, signal, receiver, transports):
    transport = transports(kind, receiver, signal)
    receiver.fail_next(3, http_status=503, grpc_code=grpc.StatusCode.UNAVAILABLE)

    transport.send(ENCODE[signal](["a"]), time.monotonic() + 5)

    assert receiver.attempts == 4
    assert names_received(receiver, signal) == ["a"]


@pytest.mark.parametrize("http_status", [429, 502, 504])
def test_other_retryable_http_statuses(http_status, receiver, transports):
    transport = transports("http", receiver)
    receiver.fail_next(1, http_status=http_status)

    transport.send(encode(["a"]), time.monotonic() + 5)

    assert receiver.attempts == 2
    assert names_received(receiver) == ["a"]


def test_server_retry_delay_is_honoured(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.fail_next(1, retry_after_s=0.4)

    start = time.monotonic()
    transport.send(encode(["a"]), start + 5)

    assert time.monotonic() - start >= 0.4
    assert names_received(receiver) == ["a"]


def test_resource_exhausted_is_retried_only_with_retry_info(receiver, transports):
    transport = transports("grpc", receiver)
    receiver.fail_next(1, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=0.05)
    transport.send(encode(["a"]), time.monotonic() + 5)
    assert names_received(receiver) == ["a"]

    receiver.fail_next(1, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(ExportError, match="RESOURCE_EXHAUSTED"):
        transport.send(encode(["b"]), time.monotonic() + 5)
    assert receiver.attempts == 3


def test_non_retryable_failure_raises_at_once(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.fail_next(1, http_status=400, grpc_code=grpc.StatusCode.INVALID_ARGUMENT)

    start = time.monotonic()
    with pytest.raises(ExportError, match="400|INVALID_ARGUMENT") as info:
        transport.send(encode(["a"]), start + 10)

    assert time.monotonic() - start < 1
    assert receiver.attempts == 1
    assert "injected failure" in str(info.value)
    assert "\n" not in str(info.value)


def test_deadline_is_respected_when_collector_is_down(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.stop()

    start = time.monotonic()
    with pytest.raises(ExportError) as info:
        transport.send(encode(["a"]), start + 0.5)

    assert time.monotonic() - start < 0.5 + 0.3
    assert str(info.value).startswith(transport.endpoint)
    assert "\n" not in str(info.value)


def test_delivery_resumes_after_collector_restart(kind, receiver, transports):
    transport = transports(kind, receiver)
    transport.send(encode(["before"]), time.monotonic() + 5)
    receiver.stop()
    with pytest.raises(ExportError):
        transport.send(encode(["lost"]), time.monotonic() + 0.3)

    receiver.start()
    transport.send(encode(["after"]), time.monotonic() + 10)

    assert names_received(receiver) == ["before", "after"]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_metrics_arrive_at_the_metrics_service(kind, compression, receiver, transports):
    transport = transports(kind, receiver, "metrics", compression=compression)

    assert transport.send(encode_metrics(["a.count", "b.count"]), time.monotonic() + 5) == 0

    assert names_received(receiver, "metrics") == ["a.count", "b.count"]
    assert receiver.requests == [], "a metrics request must not reach the trace service"


def test_partial_success_is_counted_not_retried(kind, signal, receiver, transports, caplog):
    transport = transports(kind, receiver, signal)
    receiver.partial_success = (2, "name too long")

    assert transport.send(ENCODE[signal](["a", "b", "c"]), time.monotonic() + 5) == 2
    assert transport.send(ENCODE[signal](["d"]), time.monotonic() + 5) == 2

    assert transport.rejected == 4
    assert receiver.attempts == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "otel_ebpf.otlp.transport"]
    assert len(warnings) == 1 and "name too long" in warnings[0]
    assert ("spans" if signal == "traces" else "data points") in warnings[0]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_transport_from_settings_reaches_the_signals_service(protocol, signal, receiver):
    """The generic endpoint variable, resolved per signal, ends up at that signal's service."""
    base = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint.removesuffix("/v1/traces")
    settings = load_settings({"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": base})
    transport = otlp_transport(settings.otlp if signal == "traces" else settings.otlp_metrics)
    try:
        transport.send(ENCODE[signal](["x"]), time.monotonic() + 5)
    finally:
        transport.close()

    assert isinstance(transport, GrpcTransport if protocol == "grpc" else HttpTransport)
    assert names_received(receiver, signal) == ["x"]


def test_retry_after_header_forms():
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 < _parse_retry_after(in_a_minute) <= 60


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="compression"):
        HttpTransport("http://127.0.0.1:1/v1/traces", {}, 1.0, compression="zstd")
    with pytest.raises(UserError, match="endpoint"):
        GrpcTransport("ftp://127.0.0.1:1", {}, 1.0)
    with pytest.raises(UserError, match="TLS file"):
        GrpcTransport("https://127.0.0.1:1", {}, 1.0, certificate=str(tmp_path / "missing.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    return make_certificates(tmp_path_factory.mktemp("pki"))


def test_tls_with_custom_ca(kind, pki, transports):
    with OtlpReceiver(tls=pki.server) as receiver:
        transport = transports(kind, receiver, certificate=pki.ca)
        transport.send(encode(["secure"]), time.monotonic() + 5)
        assert names_received(receiver) == ["secure"]


def test_mutual_tls_with_client_certificate_and_auth_header(kind, pki, transports):
    with OtlpReceiver(tls=pki.server, client_ca=pki.ca) as receiver:
        transport = transports(kind, receiver, certificate=pki.ca, client_key=pki.client_key,
                               client_certificate=pki.client_cert, headers={"authorization": "Bearer x"})
        transport.send(encode(["mutual"]), time.monotonic() + 5)
        assert names_received(receiver) == ["mutual"]
        assert receiver.headers[0]["authorization"] == "Bearer x"


def test_mutual_tls_without_client_certificate_fails(kind, pki, transports):
    with OtlpReceiver(tls=pki.server, client_ca=pki.ca) as receiver:
        transport = transports(kind, receiver, certificate=pki.ca)
        with pytest.raises(ExportError):
            transport.send(encode(["a"]), time.monotonic() + 0.5)
        assert receiver.attempts == 0


def test_untrusted_server_certificate_fails(kind, pki, transports):
    with OtlpReceiver(tls=pki.server) as receiver:
        transport = transports(kind, receiver)
        start = time.monotonic()
        with pytest.raises(ExportError) as info:
            transport.send(encode(["a"]), start + 0.5)
        assert time.monotonic() - start < 0.8
        assert receiver.attempts == 0
        if kind == "http":
            assert "certificate verify failed" in str(info.value)


def test_send_once_makes_one_attempt_and_passes_the_server_hint_on(kind, receiver, transports):
    transport = transports(kind, receiver)
    receiver.fail_next(1, retry_after_s=7)

    with pytest.raises(RetryableError) as info:
        transport.send_once(encode(["a"]), time.monotonic() + 5)

    assert receiver.attempts == 1
    assert info.value.after_s == pytest.approx(7)
    assert str(info.value).startswith(transport.endpoint)
    assert transport.send_once(encode(["b"]), time.monotonic() + 5) == 0
    assert names_received(receiver) == ["b"]
