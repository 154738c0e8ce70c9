"""Fixtures of the export and metrics tests: a real OTLP receiver, and transports aimed at it."""

import pytest

from tests.otlp_receiver import OtlpReceiver
from tests.unit.otlp_helpers import make_transport


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(params=["grpc", "http"])
def kind(request):
    return request.param


@pytest.fixture(params=["traces", "metrics"])
def signal(request):
    return request.param


@pytest.fixture
def transports():
    """Transports made by a test, closed afterwards even when it fails."""
    made = []

    def make(kind, receiver, signal="traces", **kwargs):
        made.append(make_transport(kind, receiver, signal, **kwargs))
        return made[-1]

    yield make
    for transport in made:
        transport.close()
