"""Bad input: one clear line on stderr naming what is wrong, exit status 2, never a traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from otel_ebpf.errors import UserError
from otel_ebpf.probes import check_kernel_headers
from tests.ground_truth import NESTED, build_examples

build_examples()


def otel_ebpf(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ.update(env or {})
    return subprocess.run([*prefix, sys.executable, "-m", "otel_ebpf", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result, *expected: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("otel-ebpf: error: "), result.stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize("args, env, expected", [
    (["trace", "/no/such/binary", "f"], {}, ["/no/such/binary", "not found"]),
    (["trace", "/etc/passwd", "f"], {}, ["/etc/passwd", "not an ELF file"]),
    (["trace", str(NESTED), "fbi"], {}, ["'fbi'", "did you mean: fib"]),
    (["trace", str(NESTED), "fib", "--", "/no/such/command"], {}, ["/no/such/command", "cannot start"]),
    (["trace", str(NESTED), "fib", "--pid", "1", "--", "true"], {}, ["--pid and -- COMMAND"]),
    (["trace", str(NESTED), "fib", "--", "true"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     ["OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"]),
    (["trace", str(NESTED), "fib", "--", "true"], {"OTEL_TRACES_EXPORTER": "zipkin"},
     ["OTEL_TRACES_EXPORTER", "zipkin", "otlp, console, none"]),
    (["trace", str(NESTED), "fib", "--", "true"], {"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, ["OTEL_BSP_MAX_QUEUE_SIZE"]),
    (["run"], {"OTEL_EBPF_PID": "abc", "OTEL_EBPF_PROBES": f"{NESTED}:fib"}, ["OTEL_EBPF_PID", "abc"]),
    (["run"], {"OTEL_EBPF_PROBES": f"{NESTED}"}, ["OTEL_EBPF_PROBES"]),
    (["run"], {}, ["nothing to trace", "OTEL_EBPF_PROBES"]),
    (["run", "--probes", f"{NESTED}:nope"], {"OTEL_EBPF_PROBES": f"{NESTED}:fib"}, ["'nope'"]),
    (["symbols", str(NESTED), "zz*"], {}, ["'zz*'", "otel-ebpf symbols"]),
    (["trace", str(NESTED)], {}, ["SYMBOL"]),
    (["frobnicate"], {}, ["frobnicate"]),
    (["run", "--", "true"], {}, ["only for `otel-ebpf trace`"]),
])
def test_bad_input(args, env, expected):
    assert_one_line_error(otel_ebpf(*args, env=env), *expected)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop privileges")
def test_without_privileges():
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
    assert_one_line_error(otel_ebpf("trace", str(NESTED), "fib", "--", "true", prefix=nobody), "CAP_BPF", "root")


def test_missing_kernel_headers_says_what_to_install(tmp_path):
    with pytest.raises(UserError) as err:
        check_kernel_headers(tmp_path)
    assert "kernel headers not found" in str(err.value) and "linux-headers" in str(err.value)


def test_symbols_lists_functions_with_address_and_size():
    result = otel_ebpf("symbols", str(NESTED), "handle_*")
    assert result.returncode == 0, result.stderr
    address, size, name = result.stdout.split()
    assert name == "handle_request" and int(address, 16) > 0 and int(size) > 0
