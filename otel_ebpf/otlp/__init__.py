"""OTLP export of already-encoded requests, by layer: one attempt (transport), when to try again (backoff,
retry) and where requests wait through an outage (queue). Batching sits above, in otel_ebpf.pipeline."""
