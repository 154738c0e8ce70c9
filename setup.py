"""Builds the span encoder's compiled inner loop (otel_ebpf/otlp/_encode.c). Optional: without a C compiler or
Python's headers the package still works, encoding with numpy instead (slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("otel_ebpf.otlp._encode", ["otel_ebpf/otlp/_encode.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
