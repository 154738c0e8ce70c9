"""Arguments and results as span attributes: real uprobes on examples/captures (C) and goapp lookup (Go), every
attribute compared with what the program printed about its own calls."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.e2e.conftest import clean_env
from tests.e2e.spancheck import attributes
from tests.ground_truth import BUILD_DIR, GOAPP, GOAPP_GO119

CAPTURES = BUILD_DIR / "captures"
STATUS_ERROR = 2
FIND_ROWS = "find_rows(query:str, limit:int, exact:bool, flags:uint, token:hex<8>)->rows:int|err<0"
RUN_QUERY = "run_query(str<1024>, int)->int|err==-1"
OPEN_RECORD = "open_record(path:str)->fd:int|err==-1"


def truth_lines(text: str) -> dict[str, list[list[str]]]:
    """examples/captures' own record: its lines by function, each a list of fields."""
    calls: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        fn, *fields = line.split("\t")
        if fields:
            calls.setdefault(fn, []).append(fields)
    return calls


def text_of(field: str) -> bytes | None:
    """A string as the program printed it: hex, `""` for the empty string, `-` for NULL."""
    return None if field == "-" else b"" if field == '""' else bytes.fromhex(field)


def expect_string(expected: dict, key: str, raw: bytes | None, bound: int) -> None:
    if raw is None:
        expected.setdefault("otel_ebpf.capture.unreadable", []).append(key)
        return
    expected[key] = raw[:bound].decode("utf-8", "replace")
    if len(raw) > bound:
        expected.setdefault("otel_ebpf.capture.truncated", []).append(key)


def expect_result(expected: dict, key: str, value: int, error: bool) -> None:
    expected[key] = value
    if error:
        expected["error.type"] = str(value)


def by_name(received) -> dict[str, list]:
    spans: dict[str, list] = {}
    for _, span in sorted(received, key=lambda item: item[1].start_time_unix_nano):
        spans.setdefault(span.name, []).append(span)
    return spans


def captured(span) -> dict:
    return {k: v for k, v in attributes(span).items() if not k.startswith(("code.", "thread."))}


def run_traced(tracer, receiver, binary, specs: list[str], argv: list[str], expected_spans: int):
    t = tracer(["trace", str(binary), *specs, "--", *argv],
               OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.http_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert t.finish() == 0, t.stderr
    received = receiver.wait_for_spans(expected_spans)
    assert len(received) == expected_spans, t.stderr
    assert "Traceback" not in t.stderr
    return t, by_name(received)


def test_c_arguments_and_results_by_position(tracer, receiver):
    """Strings (cut at 128 bytes, empty, NULL, UTF-8), a 32-bit int read from a 64-bit register (negative), a
    bool, a uint above int64 (a string), 8 bytes as hex, results with their ERROR conditions; nesting kept."""
    t, spans = run_traced(tracer, receiver, CAPTURES, [FIND_ROWS, RUN_QUERY, OPEN_RECORD], [str(CAPTURES)], 17)
    truth = truth_lines(t.stdout)
    assert len(spans["find_rows"]) == len(truth["find_rows"]) == 7
    assert "otel-ebpf: reading find_rows(query str<128> (rdi), limit int32 (rsi)" in t.stderr  # listed at start
    errors = 0
    for span, parent, (query, limit, exact, flags, token, rows), (_, _, result) in zip(
            spans["find_rows"], spans["run_query"], truth["find_rows"], truth["run_query"]):
        expected = {"limit": int(limit), "exact": exact == "1",
                    "flags": int(flags) if int(flags) < 2 ** 63 else flags, "token": token}
        expect_string(expected, "query", text_of(query), 128)
        expect_result(expected, "rows", int(rows), int(rows) < 0)
        assert captured(span) == expected
        assert span.status.code == (STATUS_ERROR if int(rows) < 0 else 0)
        assert span.parent_span_id == parent.span_id and span.trace_id == parent.trace_id
        outer = {"arg1": int(limit)}
        expect_string(outer, "arg0", text_of(query), 1024)
        expect_result(outer, "return", int(result), int(result) == -1)
        assert captured(parent) == outer
        errors += int(rows) < 0
    assert errors == 2  # a negative limit, a NULL query
    for span, (path, fd) in zip(spans["open_record"], truth["open_record"]):
        expected = {"path": text_of(path).decode()}
        expect_result(expected, "fd", int(fd), int(fd) == -1)
        assert captured(span) == expected
    assert [captured(s)["fd"] for s in spans["open_record"]] == [6, -1, 4]


def test_c_parameters_by_dwarf_name(tracer, receiver):
    """The same calls captured by parameter name: DWARF gives the types (char * a string, int 32 bits, _Bool,
    unsigned long) and the keys; a KEY: renames one."""
    specs = ["find_rows(db.query.text:query, limit, exact, flags)->rows:int|err<0", "run_query(query, limit)"]
    t, spans = run_traced(tracer, receiver, CAPTURES, specs, [str(CAPTURES)], 14)
    truth = truth_lines(t.stdout)
    for span, (query, limit, exact, flags, _, rows) in zip(spans["find_rows"], truth["find_rows"]):
        expected = {"limit": int(limit), "exact": exact == "1",
                    "flags": int(flags) if int(flags) < 2 ** 63 else flags}
        expect_string(expected, "db.query.text", text_of(query), 128)
        expect_result(expected, "rows", int(rows), int(rows) < 0)
        assert captured(span) == expected
    for span, (query, limit, _) in zip(spans["run_query"], truth["run_query"]):
        expected = {"limit": int(limit)}
        expect_string(expected, "query", text_of(query), 128)
        assert captured(span) == expected
        assert span.status.code == 0


@pytest.mark.parametrize("spec, message", [
    ("find_rows(query:float)", "unknown type 'float', and find_rows has no parameter of that name"),
    ("find_rows(int, int, int, int, int, int, int)", "passes 6 integer arguments in registers"),
    ("find_rows(nosuch)", "find_rows has no parameter 'nosuch' (DWARF knows: query, limit, exact, flags, token)"),
    ("find_rows|err<0", "|err needs a return capture before it"),
    ("open_record(path)->int|err", "|err without a condition is for Go functions"),
    ("find_rows(str<2000>)", "str<N> takes 1 to 1024 bytes"),
    ("find_rows(query:hex)", "unknown type 'hex'"),
    ("open_record->str|err<0", "|err compares a number, and the result is a str"),
])
def test_bad_capture_specs_are_one_line_and_exit_2(spec, message):
    result = subprocess.run([sys.executable, "-m", "otel_ebpf", "trace", str(CAPTURES), spec, "--", "true"],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("otel-ebpf: error: "), result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("binary", [GOAPP, GOAPP_GO119], ids=["current", "go1.19"])
def test_go_int_and_string_parameters_and_error_result(tracer, receiver, binary):
    """Go's register ABI: an int in rax, a string in rbx and rcx; the first result in rax, the error result's
    first word in the registers after it, its dynamic type as error.type (errors.New's and a type of goapp's)."""
    t, spans = run_traced(tracer, receiver, binary, ["main.lookup(id:int, name:str)->n:int|err"],
                          [str(binary), "lookup", "7"], 7)
    truth = [re.fullmatch(r"lookup id=(?P<id>-?\d+) name=(?P<name>[0-9a-f]*) n=(?P<n>-?\d+) err=(?P<err>.*)", line)
             for line in t.stdout.splitlines() if line.startswith("lookup ")]
    assert len(truth) == len(spans["main.lookup"]) == 7
    error_types = {"empty name": "*errors.errorString", "not found: missing": "*main.notFound"}
    for span, call in zip(spans["main.lookup"], truth):
        err = call["err"]
        expected = {"id": int(call["id"]), "n": int(call["n"]), "go.goroutine.id": 1}
        expect_string(expected, "name", bytes.fromhex(call["name"]), 128)
        if err != "-":
            expected["error.type"] = error_types[err]
        assert captured(span) == expected
        assert span.status.code == (STATUS_ERROR if err != "-" else 0)
    assert sum(s.status.code == STATUS_ERROR for s in spans["main.lookup"]) == 2
