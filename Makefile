# The two commands a new user needs: `make demo` and `make test`. Both set the machine up first.
PY := .venv/bin/python
DEMO_SYMBOLS := handle_request parse_request compute fib

.PHONY: setup examples backends demo test unit e2e bench clean

setup:
	bash scripts/setup.sh

examples:
	$(MAKE) -C examples

# Jaeger v2 and an OpenTelemetry Collector for the end-to-end tests, built from the Go modules pinned in
# tests/backends (first build ~7 min on 2 cores, cached under tests/backends/build after).
backends:
	$(MAKE) -C tests/backends

# Traces the example and prints its spans on the console, no backend needed.
demo: setup examples
	NESTED_GROUND_TRUTH=/dev/null OTEL_TRACES_EXPORTER=console \
	  $(PY) -m otel_ebpf trace examples/build/nested $(DEMO_SYMBOLS) -- examples/build/nested 2 2
	@echo "make demo: to see these spans in Jaeger, run: docker compose up --build, then open" \
	  "http://localhost:16686 (services nested, web-server and http-client; README \"Jaeger with docker compose\")"

test: setup examples backends
	$(PY) -m pytest tests

unit: setup examples
	$(PY) -m pytest tests/unit

e2e: setup examples backends
	$(PY) -m pytest tests/e2e

# Tracing cost, span delivery and attach time, otel-ebpf vs bpftrace and the stock SDK (~3 min; README "Performance").
bench: setup examples
	$(PY) bench/run.py
	$(PY) bench/capture_cost.py

clean:
	$(MAKE) -C examples clean
	$(MAKE) -C tests/backends clean
	rm -rf .pytest_cache
