"""Binaries as distributions ship them, built on the spot: stripped, with their symbols in a separate debug file
(found by build id or .gnu_debuglink) or in MiniDebugInfo. Tools that are missing fail the test, naming the
package `make setup` installs them from."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from otel_ebpf.symbols import elf as elfs

# A program with exported and local (static) functions, so that stripping visibly loses the local ones.
APP_C = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) static int local_helper(int x) { return x * 3 + 1; }
__attribute__((noinline)) static int local_other(int x) { return local_helper(x) - 2; }
__attribute__((noinline)) int exported_work(int x) { return local_other(x) + 5; }
int main(int argc, char **argv) { printf("%d\\n", exported_work(argc + (argv[1] ? atoi(argv[1]) : 0))); return 0; }
"""
LOCAL_FUNCTIONS = ("local_helper", "local_other")
TOOLS = {"gcc": "gcc", "objcopy": "binutils", "strip": "binutils", "nm": "binutils", "xz": "xz-utils",
         "debuginfod": "debuginfod", "eu-readelf": "elfutils", "unshare": "util-linux", "nsenter": "util-linux",
         "ip": "iproute2", "mount": "mount"}


def require(*tools: str) -> None:
    """Fail, not skip: the tests are part of `make test`, whose set-up installs these."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `make setup` should have installed Debian's {TOOLS[tool]} package")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (mount namespaces, bind mounts): `make test` runs as root")


def run(*command: str | os.PathLike, cwd: Path | None = None) -> str:
    return subprocess.run([str(part) for part in command], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def build_id(path: Path) -> str | None:
    with open(path, "rb") as stream:
        return elfs.build_id(ELFFile(stream))


@dataclass(frozen=True)
class Build:
    original: Path  # with its symbol table
    stripped: Path  # strip --strip-all: .dynsym only
    debug: Path  # objcopy --only-keep-debug
    build_id: str | None


def build_app(directory: Path, name: str = "app", source: str = APP_C, flags: tuple[str, ...] = ()) -> Build:
    """A PIE with a build id, its debug file and a stripped copy, as a -dbgsym package splits them."""
    require("gcc", "objcopy", "strip")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.c").write_text(source)
    original, stripped, debug = directory / name, directory / f"{name}.stripped", directory / f"{name}.debug"
    run("gcc", "-O1", "-g", "-Wl,--build-id", *flags, "-o", original, f"{name}.c", cwd=directory)
    run("objcopy", "--only-keep-debug", original, debug)
    run("strip", "--strip-all", "-o", stripped, original)
    return Build(original, stripped, debug, build_id(original))


def place_by_build_id(debug: Path, root: Path, build: str) -> Path:
    """Where -dbg packages put a debug file: ROOT/.build-id/xx/rest.debug."""
    target = root / ".build-id" / build[:2] / f"{build[2:]}.debug"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(debug, target)
    return target


def with_debuglink(build: Build, directory: Path, debug_name: str = "app.debug") -> Path:
    """A stripped copy in directory whose .gnu_debuglink names debug_name (CRC of the debug file recorded)."""
    directory.mkdir(parents=True, exist_ok=True)
    linked_debug = build.debug.parent / debug_name
    if linked_debug != build.debug:
        shutil.copy(build.debug, linked_debug)
    binary = directory / build.original.name
    run("objcopy", f"--add-gnu-debuglink={linked_debug}", build.stripped, binary)
    return binary


def with_mini_debuginfo(build: Build, directory: Path) -> Path:
    """MiniDebugInfo as Fedora makes it (gdb's manual, "MiniDebugInfo"): the function symbols that .dynsym lacks,
    in an xz-compressed ELF stored as .gnu_debugdata in the stripped binary."""
    require("nm", "objcopy", "strip", "xz")
    directory.mkdir(parents=True, exist_ok=True)
    dynamic = set(_nm_names(build.original, "-D"))
    functions = {name for name, kind in _nm_rows(build.original) if kind in "Tt"}
    keep = directory / "keep_symbols"
    keep.write_text("".join(f"{name}\n" for name in sorted(functions - dynamic)))
    mini = directory / "mini_debuginfo"
    run("objcopy", "-S", "--remove-section", ".gdb_index", "--remove-section", ".comment",
        f"--keep-symbols={keep}", build.debug, mini)
    run("xz", "--keep", "--force", mini)
    binary = directory / build.original.name
    run("strip", "--strip-all", "--remove-section", ".comment", "-o", binary, build.original)
    run("objcopy", "--add-section", f".gnu_debugdata={mini}.xz", binary)
    return binary


def _nm_rows(path: Path, *flags: str) -> list[tuple[str, str]]:
    rows = [line.split() for line in run("nm", "--format=posix", "--defined-only", *flags, path).splitlines()]
    return [(row[0], row[1]) for row in rows if len(row) >= 2]


def _nm_names(path: Path, *flags: str) -> list[str]:
    return [name for name, _ in _nm_rows(path, *flags)]
