"""Through the real CLI to a backend that demands TLS, a client certificate (mTLS) and an auth header."""

import shutil

import pytest

from tests.e2e.spancheck import BUSY_OVERHEAD_SLACK_NS, check_tree, match, named
from tests.ground_truth import NESTED, expected_counts, parse
from tests.otlp_receiver import OtlpReceiver, make_certificates

PROBED = ("handle_request", "compute", "fib")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_and_metrics_reach_a_backend_requiring_mutual_tls_and_a_token(protocol, tracer, pki, tmp_path):
    truth_file = tmp_path / "truth.txt"
    with OtlpReceiver(tls=pki.server, client_ca=pki.ca) as receiver:
        endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint.removesuffix("/v1/traces")
        t = tracer(["trace", str(NESTED), *PROBED, "--", str(NESTED), "2", "3"], NESTED_GROUND_TRUTH=str(truth_file),
                   OTEL_EXPORTER_OTLP_PROTOCOL=protocol, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                   OTEL_EXPORTER_OTLP_CERTIFICATE=pki.ca, OTEL_EXPORTER_OTLP_CLIENT_KEY=pki.client_key,
                   OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE=pki.client_cert,
                   OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20x")
        assert t.finish() == 0, t.stderr
        expected = sum(expected_counts(2, 3)[f] for f in PROBED)
        received = receiver.wait_for_spans(expected)

    truth = parse(truth_file.read_text())
    check_tree(match(received, truth, named(*PROBED), overhead_slack_ns=BUSY_OVERHEAD_SLACK_NS), truth)
    assert receiver.metric_requests, "the metrics, exported at exit, took the same way"
    assert {headers["authorization"] for headers in receiver.headers} == {"Bearer x"}
    assert f"{expected} spans exported, 0 lost" in t.stderr
    assert "Traceback" not in t.stderr
