#!/bin/sh
# What the demo's `example` container runs: programs that know nothing about otel-ebpf.
#  - httpserver (C) serves on :8080; its process has OTEL_SERVICE_NAME of its own, which otel-ebpf honours;
#  - http_client.py, instrumented with the OpenTelemetry SDK, calls it and exports its CLIENT spans to
#    Jaeger itself, so one trace shows client span -> SERVER span -> function spans;
#  - nested runs nested, recursive and multithreaded calls.
set -u
BUILD=/app/examples/build
OTEL_SERVICE_NAME=web-server "$BUILD/httpserver" 8080 > /dev/null &
while true; do
    NESTED_GROUND_TRUTH=/dev/null "$BUILD/nested" 2 3
    OTEL_SERVICE_NAME=http-client /opt/otel-ebpf/bin/python /app/examples/http_client.py 8080 > /dev/null
    sleep 2
done
