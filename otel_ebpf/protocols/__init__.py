"""The protocols otel-ebpf reads from what a watched process sends and receives, one module each."""
