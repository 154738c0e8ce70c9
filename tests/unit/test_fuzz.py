"""Fuzzing what users hand to otel-ebpf: environment variables, probe specs, ELF files and the command line.

One property throughout: every input ends in a result or in a UserError, which the CLI prints as one line
before exiting 2; never another exception (a traceback for the user) and never a hang. Corrupted binaries
are derived from the real example binaries, so the damage lands in real headers, symbol tables and Go tables.

The inputs are the same on every run (derandomize), so CI never flakes; FUZZ_DEEP=1 draws 20 times as many
fresh random inputs to hunt for new bugs. How many inputs were tried is printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_ebpf import config, symbols
from otel_ebpf.symbols import golang
from otel_ebpf import probes as planning
from otel_ebpf.errors import UserError
from tests.ground_truth import GOAPP, GOAPP_STRIPPED, LIBGREET, NESTED, build_examples

build_examples()

DEEP = os.environ.get("FUZZ_DEEP") == "1"
FUZZED: Counter[str] = Counter()


def fuzz(examples: int, deadline_s: float) -> settings:
    """Bounded and reproducible unless FUZZ_DEEP=1; deadlines are generous because CPUs may be shared."""
    return settings(max_examples=examples * (20 if DEEP else 1), deadline=deadline_s * 1000, derandomize=not DEEP,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """Printed past pytest's output capture, so that every run says how much was fuzzed."""
    yield
    counts = ", ".join(f"{n} {what}" for what, n in FUZZED.items())
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\ntest_fuzz: {sum(FUZZED.values())} inputs fuzzed ({counts})")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


class Hang(BaseException):
    """Not an Exception: the code under test catches OSError and friends and must not swallow this."""


@contextlib.contextmanager
def hang_guard(seconds: int = 30):
    """Hypothesis judges an example's deadline once it has finished; an alarm stops one that never does."""
    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_hang_guard_stops_a_hang():
    with pytest.raises(Hang), hang_guard(1):
        while True:
            pass


def assert_one_line(err: UserError) -> None:
    assert err.message and "\n" not in str(err), repr(str(err))


# --- settings from the environment ---

VARIABLES = [name for name, _, _ in config.SETTINGS_DOC]
VALUES = st.one_of(
    st.text(max_size=20),
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(str),
    st.from_regex(r"\s*-?\d{1,22}(\.\d*)?\s*(k|K|m|M|G|ns|us|µs|ms|s|e\d\d?)?\s*", fullmatch=True),
    st.sampled_from(["", " ", "true", "FALSE", "grpc", "HTTP/protobuf", "http/json", "otlp,console", "none",
                     "parentbased_traceidratio", "gzip", "http://collector:4318", "https://[::1]:4317/", "http://[",
                     "http://h:99999", "localhost:4317", "a=b,c=%zz", "=v", "/no/such/file", "٣", "８M", "1_000",
                     "0x10", "inf", "nan"]),
)


@fuzz(examples=300, deadline_s=5)
@given(st.dictionaries(st.sampled_from(VARIABLES), VALUES, max_size=8))
def test_any_environment_gives_settings_or_names_the_bad_variable(env):
    FUZZED["environments"] += 1
    try:
        loaded = config.load_settings(env)
    except UserError as err:
        assert_one_line(err)
        named = re.findall(r"\b(?:OTEL|DEBUGINFOD|XDG)_[A-Z_]+", err.message)
        assert set(named) & {name for name, value in env.items() if value.strip()}, err.message
        if " is invalid: " in err.message:  # then it starts with the variable and the value as the user gave it
            assert err.message.startswith(f"{named[0]}={env[named[0]].strip()!r} is invalid: "), err.message
        return
    # What the BPF program is compiled with: invalid values would only fail later, in the kernel.
    assert 1 <= loaded.max_depth <= 128 and 64 <= loaded.max_threads <= 1 << 20
    assert loaded.ring_buffer_size >= 4096 and loaded.ring_buffer_size & (loaded.ring_buffer_size - 1) == 0
    assert loaded.bsp_max_export_batch_size <= loaded.bsp_max_queue_size


# --- OTEL_EBPF_PROBES and --probes ---

SPEC_PIECES = st.sampled_from([
    ":", ";", ",", "::", "(", ")", "<", ">", "[", "]", "{", "}", " ", "\t", "\n", "\0", "*", "?", "a", "f", "é",
    "/bin/x", "operator", "operator<<", "operator<", "operator>", "operator()", "operator,", "operator<=>",
    "operator->*", "operator[]", "operator>>=",
])
IDENTIFIER = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
TYPE = st.recursive(IDENTIFIER, lambda inner: st.one_of(
    st.tuples(IDENTIFIER, st.lists(inner, min_size=1, max_size=3)).map(lambda t: f"{t[0]}<{', '.join(t[1])}>"),
    st.tuples(inner, inner).map("::".join),
    st.tuples(inner, inner).map(lambda t: f"<{t[0]} as {t[1]}>"),
    inner.map(lambda t: t + "*"),
    inner.map(lambda t: t + " const&"),
), max_leaves=4)
# Demanglers put a space between an operator and its template arguments ("operator<< <int>").
OPERATOR = st.tuples(
    st.sampled_from(["operator<<", "operator>>", "operator<", "operator>", "operator<=>", "operator()", "operator[]",
                     "operator,", "operator->", "operator->*", "operator<=", "operator>>=", "operator new[]",
                     "operator bool"]),
    st.lists(TYPE, max_size=2),
).map(lambda t: t[0] + (f" <{', '.join(t[1])}>" if t[1] else ""))
FUNCTION = st.tuples(
    st.lists(TYPE, max_size=2),
    st.one_of(IDENTIFIER, OPERATOR),
    st.one_of(st.none(), st.lists(TYPE, max_size=3)),
    st.sampled_from(["", " const"]),
).map(lambda t: "::".join([*t[0], t[1]]) + ("" if t[2] is None else f"({', '.join(t[2])}){t[3]}"))
GLOB = st.tuples(IDENTIFIER, st.sampled_from(["*", "?", "[a-z]*", "*_*"])).map("".join)
BINARY = st.from_regex(r"[^\s:;][^:;]{0,20}[^\s:;]|[^\s:;]", fullmatch=True)
SPECS = st.lists(st.builds(config.ProbeSpec, BINARY, st.lists(st.one_of(FUNCTION, GLOB), min_size=1, max_size=4)
                           .map(tuple)), max_size=4)


def render(specs: list[config.ProbeSpec], entry_separator: str = ";", symbol_separator: str = ",",
           after_colon: str = "") -> str:
    """The documented syntax: BINARY:SYMBOL[,SYMBOL...] entries separated by ';'."""
    return entry_separator.join(f"{s.binary}:{after_colon}{symbol_separator.join(s.symbols)}" for s in specs)


@fuzz(examples=600, deadline_s=5)
@given(st.lists(SPEC_PIECES, max_size=30).map("".join), st.sampled_from([config.OTEL_EBPF_PROBES, "--probes"]))
def test_any_probe_spec_parses_or_names_its_source(text, source):
    FUZZED["probe specs"] += 1
    try:
        specs = config.parse_probes(text, source)
    except UserError as err:
        assert_one_line(err)
        assert err.message.startswith(f"{source}: ")
        return
    for spec in specs:
        assert spec.binary and spec.binary == spec.binary.strip() and not set(":;") & set(spec.binary)
        assert spec.symbols and all(s and s == s.strip() and ";" not in s for s in spec.symbols)
    assert config.parse_probes(render(specs)) == specs


def test_a_symbol_starting_with_a_colon_is_refused():
    """No symbol starts with ':', and "x: :f" would not survive rendering (it reads back as "x::f")."""
    with pytest.raises(UserError, match="starts with ':'"):
        config.parse_probes("/bin/x: :f")


@fuzz(examples=150, deadline_s=5)
@given(SPECS, st.sampled_from([";", "; ", " ;\n"]), st.sampled_from([",", ", ", " ,\t"]), st.sampled_from(["", " "]))
def test_well_formed_specs_round_trip(specs, entry_separator, symbol_separator, after_colon):
    """C++ names keep their commas (templates, parameters, operator,) and colons (::) through the parser."""
    FUZZED["well-formed probe specs"] += 1
    assert config.parse_probes(render(specs, entry_separator, symbol_separator, after_colon)) == specs


# --- ELF files: corrupted copies of the example binaries ---

class Field(NamedTuple):
    name: str
    offset: int
    width: int  # bytes, little-endian


# ELF-64 layouts (System V gABI): (name, offset, width) in the file header, a program header, a section header
# and a symbol; and Go's tables: pcHeader (magic, ptrSize, eight words from nfunc on) and .go.buildinfo's header.
EHDR = (("e_type", 16, 2), ("e_entry", 24, 8), ("e_phoff", 32, 8), ("e_shoff", 40, 8), ("e_phentsize", 54, 2),
        ("e_phnum", 56, 2), ("e_shentsize", 58, 2), ("e_shnum", 60, 2), ("e_shstrndx", 62, 2))
PHDR = (("p_type", 0, 4), ("p_offset", 8, 8), ("p_vaddr", 16, 8), ("p_filesz", 32, 8), ("p_memsz", 40, 8))
SHDR = (("sh_name", 0, 4), ("sh_type", 4, 4), ("sh_flags", 8, 8), ("sh_offset", 24, 8), ("sh_size", 32, 8),
        ("sh_link", 40, 4), ("sh_entsize", 56, 8))
SYM = (("st_name", 0, 4), ("st_info", 4, 1), ("st_shndx", 6, 2), ("st_value", 8, 8), ("st_size", 16, 8))
PCHEADER = (("magic", 0, 4), ("ptrSize", 7, 1), *((f"word{i}", 8 + 8 * i, 8) for i in range(8)))
BUILDINFO = (("ptrSize", 14, 1), ("flags", 15, 1), ("version length", 32, 1))
GO_TABLES = {".gopclntab": PCHEADER, ".go.buildinfo": BUILDINFO}


def fields(layout, prefix: str, start: int) -> list[Field]:
    return [Field(f"{prefix} {name}", start + offset, width) for name, offset, width in layout]


@dataclass(frozen=True)
class Sample:
    """An example binary and where to damage it."""

    data: bytes
    fields: tuple[Field, ...]  # header, symbol and Go table fields
    boundaries: tuple[int, ...]  # where the file header, a header table, a segment or a section starts or ends
    headers_end: int  # cut before this, the file lacks some of its program or section headers

    @classmethod
    def of(cls, path: Path) -> Sample:
        data = path.read_bytes()
        with path.open("rb") as stream:
            elf = ELFFile(stream)
            phoff, phsize, shoff, shsize = elf["e_phoff"], elf["e_phentsize"], elf["e_shoff"], elf["e_shentsize"]
            found = fields(EHDR, "ELF", 0)
            boundaries = [4, 16, 64, phoff, shoff]
            for i, segment in enumerate(elf.iter_segments()):
                found += fields(PHDR, f"segment {i}", phoff + i * phsize)
                boundaries += [phoff + (i + 1) * phsize, segment["p_offset"], segment["p_offset"] + segment["p_filesz"]]
            for i, section in enumerate(elf.iter_sections()):
                found += fields(SHDR, section.name or "section 0", shoff + i * shsize)
                boundaries += [shoff + (i + 1) * shsize, section["sh_offset"]]
                if section["sh_type"] != "SHT_NOBITS":
                    boundaries.append(section["sh_offset"] + section["sh_size"])
                if isinstance(section, SymbolTableSection):
                    for j in range(section.num_symbols()):
                        found += fields(SYM, f"{section.name}[{j}]", section["sh_offset"] + j * section["sh_entsize"])
                found += fields(GO_TABLES.get(section.name, ()), section.name, section["sh_offset"])
            headers_end = max(phoff + elf.num_segments() * phsize, shoff + elf.num_sections() * shsize)
        return cls(data, tuple(found), tuple(sorted(set(boundaries))), headers_end)

    def value(self, field: Field) -> int:
        return int.from_bytes(self.data[field.offset:field.offset + field.width], "little")


SAMPLES = {path.name: Sample.of(path) for path in (NESTED, LIBGREET, GOAPP_STRIPPED)}
_names = itertools.count()


def written(directory: Path, data: bytes) -> Path:
    """A new name each time: symbols caches by path, mtime and size, which a quick rewrite may all keep."""
    path = directory / f"binary-{next(_names)}"
    path.write_bytes(data)
    return path


def edge_values(field: Field, original: int, file_size: int) -> list[int]:
    """The values that break parsers: zero, all ones, off by one, just past the end of the file, huge."""
    top = (1 << 8 * field.width) - 1
    candidates = {0, 1, original - 1, original + 1, file_size - 1, file_size, file_size + 1, top, top >> 1, 0xFF00,
                  1 << 31, 1 << 40}
    return sorted({value & top for value in candidates})


def writes(sample: Sample):
    """1-4 damages: a header field set to an edge or random value, or a byte anywhere flipped."""
    size = len(sample.data)
    field_write = st.sampled_from(sample.fields).flatmap(lambda f: st.one_of(
        st.sampled_from(edge_values(f, sample.value(f), size)), st.integers(0, (1 << 8 * f.width) - 1),
    ).map(lambda value: (f.offset, f.width, value)))
    byte_flip = st.tuples(st.integers(0, size - 1), st.integers(1, 255)).map(
        lambda t: (t[0], 1, sample.data[t[0]] ^ t[1]))
    return st.lists(st.one_of(field_write, byte_flip), min_size=1, max_size=4)


def damaged(data: bytes, changes) -> bytes:
    out = bytearray(data)
    for offset, width, value in changes:
        out[offset:offset + width] = value.to_bytes(width, "little")
    return bytes(out)


def read_like_the_cli(path: Path) -> None:
    """What `otel-ebpf trace BINARY 'main*'` does with a binary before loading probes: a result or a one-line
    UserError. go_version, asked about every binary, says None for whatever it cannot read."""
    with hang_guard():
        version = golang.go_version(str(path))
        assert version is None or isinstance(version, str)
        try:
            real = symbols.binary_path(str(path))
            symbols.list_functions(real)
            planning.plan(real, symbols.resolve(real, ["main*"]))
        except UserError as err:
            assert_one_line(err)


@pytest.mark.parametrize("name, examples", [("nested", 120), ("libgreet.so", 80), ("goapp-stripped", 20)])
def test_damaged_binaries_give_results_or_user_errors(name, examples, workdir):
    sample = SAMPLES[name]

    @fuzz(examples, deadline_s=10)
    @given(writes(sample))
    def check(changes):
        FUZZED["damaged binaries"] += 1
        path = written(workdir, damaged(sample.data, changes))
        read_like_the_cli(path)
        path.unlink()

    check()


@pytest.mark.parametrize("name", SAMPLES)
def test_truncated_at_every_header_boundary(name, workdir):
    sample = SAMPLES[name]
    # ±1 around each boundary for the small binaries; the Go one is 4.5 MB, so its boundaries only.
    steps = (0,) if name.startswith("goapp") else (-1, 0, 1)
    for cut in sorted({b + step for b in sample.boundaries for step in steps if 0 <= b + step < len(sample.data)}):
        FUZZED["truncations"] += 1
        path = written(workdir, sample.data[:cut])
        read_like_the_cli(path)
        if cut < sample.headers_end:
            with pytest.raises(UserError, match="not an ELF file or is corrupt"):
                symbols.binary_path(str(path))
        path.unlink()


# The classic parser traps: header counts, entry sizes and table offsets, and the offsets and sizes of the sections
# otel-ebpf reads, set to zero, huge or past the end of the file. The file header's fields only in the small
# binaries: in the 4.5 MB one, 65280 program headers fit in the file and merely take seconds to read.
SWEPT_HEADER = re.compile(r"ELF e_(ph|sh)(num|off|entsize|strndx)")
SWEPT_SECTIONS = re.compile(r"(\.symtab|\.strtab|\.dynsym|\.dynstr|\.shstrtab) sh_(offset|size|entsize)"
                            r"|(\.gopclntab|\.go\.buildinfo) sh_(offset|size)")
# This sweep found that a Go table larger than memory made pyelftools' Section.data() raise MemoryError or
# OverflowError through go_version and pclntab_functions; golang.py now checks a section fits in the file first.


def extremes() -> list:
    cases = []
    for name, sample in SAMPLES.items():
        size = len(sample.data)
        for field in sample.fields:
            if not (SWEPT_SECTIONS.fullmatch(field.name) or SWEPT_HEADER.fullmatch(field.name) and size < 1 << 20):
                continue
            top = (1 << 8 * field.width) - 1
            for value in sorted({0, 0xFF00 & top, (size + 1) & top, (1 << 40) & top, top}):
                cases.append(pytest.param(name, field, value, id=f"{name}:{field.name}={value:#x}"))
    return cases


@pytest.mark.parametrize("name, field, value", extremes())
def test_header_extremes(name, field, value, workdir):
    FUZZED["header extremes"] += 1
    path = written(workdir, damaged(SAMPLES[name].data, [(field.offset, field.width, value)]))
    read_like_the_cli(path)
    path.unlink()


def executable_segment(path: Path) -> int:
    with path.open("rb") as stream:
        return next(i for i, segment in enumerate(ELFFile(stream).iter_segments())
                    if segment["p_type"] == "PT_LOAD" and segment["p_flags"] & 1)


# Bugs FUZZ_DEEP=1 found in otel_ebpf/symbols/golang.py, reduced to one field each: go_version, asked about every
# binary, took any section named .symtab for a symbol table (AttributeError); traceable_shape sought to a function's
# file offset unchecked (ValueError past 2**63, OSError past the file system's largest file).
@pytest.mark.parametrize("name, field, value", [
    ("libgreet.so", ".symtab sh_type", 1),
    ("goapp-stripped", f"segment {executable_segment(GOAPP_STRIPPED)} p_offset", 1 << 63),
])
def test_known_damage(name, field, value, workdir):
    sample = SAMPLES[name]
    target = next(f for f in sample.fields if f.name == field)
    read_like_the_cli(written(workdir, damaged(sample.data, [(target.offset, target.width, value)])))


@pytest.mark.parametrize("table", GO_TABLES)
def test_go_table_flagged_compressed(table, workdir):
    """Go never compresses its tables. Flagged SHF_COMPRESSED, with a zlib compression header in their first
    bytes, they made pyelftools decompress garbage: zlib.error through go_version and pclntab_functions."""
    sample = SAMPLES["goapp-stripped"]
    flags = next(f for f in sample.fields if f.name == f"{table} sh_flags")
    start = sample.value(next(f for f in sample.fields if f.name == f"{table} sh_offset"))
    changes = [(flags.offset, flags.width, sample.value(flags) | 0x800), (start, 4, 1)]  # ch_type ELFCOMPRESS_ZLIB
    read_like_the_cli(written(workdir, damaged(sample.data, changes)))


def damaged_go_dwarf(damage: str) -> bytes:
    """goapp, whose DWARF (compressed, as Go writes it) tells where runtime.g keeps the goroutine id."""
    data = GOAPP.read_bytes()
    with GOAPP.open("rb") as stream:
        elf = ELFFile(stream)
        index = next(i for i, section in enumerate(elf.iter_sections()) if section.name == ".debug_info")
        section = elf.get_section(index)
        header = elf["e_shoff"] + index * elf["e_shentsize"]
    if damage == "compressed bytes":  # the first deflate byte, past Elf64_Chdr (24 bytes) and zlib's header (2)
        start = section["sh_offset"] + 24 + 2
        return damaged(data, [(start, 1, data[start] ^ 0xFF)])
    if damage == "compression flag":  # sh_flags without SHF_COMPRESSED: compressed bytes read as DWARF
        return damaged(data, [(header + 8, 8, 0)])
    if damage.startswith("sh_size"):  # more than the file holds, or than Python can index
        return damaged(data, [(header + 32, 8, 1 << 40 if damage == "sh_size 2**40" else (1 << 64) - 1)])
    return damaged(data, [(section["sh_offset"] + 8, 8, (1 << 64) - 1)])  # Elf64_Chdr.ch_size: too large for zlib


# Bugs found here in otel_ebpf/symbols/golang.py: goid_offset let through zlib.error for a damaged compressed section,
# AssertionError for bad DWARF, MemoryError or OverflowError for a huge size. It is best effort: 0 for unknown.
@pytest.mark.parametrize("damage", ["compressed bytes", "compression flag", "sh_size 2**40", "sh_size 2**64-1",
                                    "ch_size 2**64-1"])
def test_damaged_go_dwarf(damage, workdir):
    FUZZED["damaged Go DWARF"] += 1
    path = written(workdir, damaged_go_dwarf(damage))
    with hang_guard():
        probes = planning.plan(str(path), symbols.resolve(str(path), ["main.work"]))
    assert [probe.goid_offset for probe in probes] == [0]
    path.unlink()


@fuzz(examples=200, deadline_s=5)
@given(head=st.sampled_from([b"\x7fELF\x01\x01\x01", b"\x7fELF\x02\x01\x01", b"\x7fELF\x02\x02\x01",
                             SAMPLES["nested"].data[:64]]),
       rest=st.binary(max_size=2048))
def test_garbage_after_elf_magic(head, rest, workdir):
    FUZZED["garbage files"] += 1
    path = written(workdir, head + rest)
    read_like_the_cli(path)
    path.unlink()


# --- the command line ---

@pytest.fixture(scope="module")
def cli_binaries(workdir) -> dict[str, str]:
    directory = workdir
    bad = written(directory, damaged(SAMPLES["nested"].data, [(40, 8, 1 << 40)]))  # section headers past EOF
    return {"nested": str(NESTED), "libgreet.so": str(LIBGREET), "damaged": str(bad), "text": "/etc/passwd",
            "missing": str(directory / "missing"), "newline": str(directory / "new\nline"), "directory": str(directory),
            "empty": ""}


LINE = re.compile(r"0x[0-9a-f]{12} +\d+  \S.*")
SOURCE_LINE = re.compile(r"otel-ebpf: symbols of .+ from .+\n")


@fuzz(examples=8, deadline_s=60)
@given(binary=st.sampled_from(["nested", "libgreet.so", "damaged", "text", "missing", "newline", "directory", "empty"]),
       pattern=st.one_of(st.none(), st.text(st.sampled_from(list("*?[]!-_:<>(), acfghilmnrstu\né")), max_size=12)),
       extra=st.lists(st.sampled_from(["--pid", "1", "-x", "--", "extra", "--probes=a:b"]), max_size=2),
       env=st.dictionaries(st.sampled_from(VARIABLES + ["LC_ALL"]), VALUES, max_size=3))
def test_symbols_command_exits_0_or_2_with_one_line(binary, pattern, extra, env, cli_binaries):
    FUZZED["command lines"] += 1
    argv = [cli_binaries[binary], *([] if pattern is None else [pattern]), *extra]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environ["HOME"] = str(cli_binaries["directory"])  # the symbol cache goes to ~/.cache unless XDG_CACHE_HOME says
    environ.update({k: v.replace("\0", "") for k, v in env.items()})
    result = subprocess.run([sys.executable, "-m", "otel_ebpf", "symbols", *argv], env=environ, capture_output=True,
                            text=True, errors="replace", timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert SOURCE_LINE.fullmatch(result.stderr), result
        assert all(LINE.fullmatch(line) for line in result.stdout.splitlines()), result
    else:
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("otel-ebpf: error: "), result.stderr
