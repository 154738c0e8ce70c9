"""An OTLP receiver for a million spans: parses every trace request (as a collector would) and keeps only counts.

tests/otlp_receiver.py keeps every request, which a test wants and a million-span benchmark cannot afford.
Span ids are kept as 8 bytes each in one buffer, so that duplicates (a retried request) do not count twice.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

from tests.otlp_receiver import OtlpReceiver


class CountingReceiver(OtlpReceiver):
    """Counts spans, distinct span ids and malformed ids, and notes when the last trace request arrived."""

    def __init__(self):
        super().__init__()
        self.spans_received = 0
        self.malformed_ids = 0
        self.last_arrival_ns = 0  # time.monotonic_ns()
        self._ids = bytearray()
        self._lock = threading.Lock()

    def _receive(self, request, headers, size):
        if not isinstance(request, ExportTraceServiceRequest):
            return super()._receive(request, headers, size)
        with self._lock:
            self.attempts += 1
            self.bytes_received += size
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    ids = b"".join(span.span_id for span in scope.spans)
                    self.spans_received += len(scope.spans)
                    if len(ids) == 8 * len(scope.spans):
                        self._ids += ids
                    else:  # an id that is not 8 bytes would shift all the others
                        self.malformed_ids += len(scope.spans)
            self.last_arrival_ns = time.monotonic_ns()
        return ExportTraceServiceResponse()

    def distinct_spans(self) -> int:
        with self._lock:
            return int(np.unique(np.frombuffer(self._ids, dtype=np.uint64)).size)
