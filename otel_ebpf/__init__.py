"""otel-ebpf: function calls of unmodified programs, seen through eBPF uprobes, exported as OTLP spans."""

__version__ = "0.1.0"
