"""Where a followed process's HTTPS plaintext can be read: OpenSSL's SSL_read, SSL_write and their _ex variants
(bpf/tls.bpf.c), in the libssl it maps or will map (its executable's DT_NEEDED), or in its own executable when
that links OpenSSL (or BoringSSL) statically and exports them.

Attached per process, never host-wide: every process on a machine maps libssl, and a uprobe on it would trap
in all of them. Go's crypto/tls and servers that encrypt in the kernel (kTLS) stay invisible.
"""

from __future__ import annotations

import functools
import logging
import os

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.hash import ELFHashSection, GNUHashSection

from otel_ebpf.errors import UserError
from otel_ebpf.kernel.attach import Kind, Site
from otel_ebpf.kernel.layout import COOKIE_TLS, TLS_READ, TLS_READ_EX, TLS_SET_FD, TLS_WRITE, TLS_WRITE_EX
from otel_ebpf.symbols import files

FUNCTIONS = {"SSL_read": TLS_READ, "SSL_write": TLS_WRITE, "SSL_read_ex": TLS_READ_EX, "SSL_write_ex": TLS_WRITE_EX,
             "SSL_set_fd": TLS_SET_FD}
# Where the dynamic loader looks for a DT_NEEDED library without RUNPATH (Debian's multiarch dirs first).
LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
                "/usr/local/lib")

_log = logging.getLogger("otel_ebpf.tls")


def sites(path: str) -> list[Site]:
    """The uprobes that read OpenSSL's plaintext in the file at `path` (valid here); [] when it has none."""
    info = os.stat(path)
    return _sites(path, info.st_dev, info.st_ino, info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sites(path: str, *identity) -> list[Site]:
    found = []
    for name, offset in _exported(path).items():
        cookie = COOKIE_TLS | FUNCTIONS[name]
        found.append(Site(offset, Kind.ENTRY, cookie))
        if FUNCTIONS[name] != TLS_SET_FD:
            found.append(Site(offset, Kind.RETURN, cookie))
    return found


def _exported(path: str) -> dict[str, int]:
    """File offsets of the FUNCTIONS the file exports, looked up in its dynamic symbol hash table: a few
    lookups, not a parse of every symbol (a followed process's executable is checked too, and may be big).
    SSL_read_ex and SSL_write_ex exist since OpenSSL 1.1.1."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            table = elf.get_section_by_name(".gnu.hash") or elf.get_section_by_name(".hash")
            if not isinstance(table, (GNUHashSection, ELFHashSection)):
                return {}
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            offsets = {}
            for name in FUNCTIONS:
                symbol = table.get_symbol(name)
                if symbol is None or symbol["st_info"]["type"] != "STT_FUNC" or symbol["st_shndx"] == "SHN_UNDEF":
                    continue
                address = symbol["st_value"]
                segment = next((s for s in loads if s["p_vaddr"] <= address < s["p_vaddr"] + s["p_filesz"]), None)
                if segment is not None:
                    offsets[name] = address - segment["p_vaddr"] + segment["p_offset"]
            return offsets
    except (OSError, ELFError, ValueError) as err:
        _log.debug("no OpenSSL functions read from %s: %s", path, err)
        return {}


def libraries(pid: int) -> set[str]:
    """Paths (valid here) of the files where process `pid` runs or will run OpenSSL."""
    candidates = set()
    for mapping in files.mappings(pid):
        if os.path.basename(mapping.path).startswith("libssl."):
            candidates.add(mapping.path)
    try:
        executable = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        executable = None
    if executable:
        candidates.update(program_candidates(executable, files.locate(executable, pid)))
    paths = set()
    for candidate in candidates:
        try:
            path = files.locate(candidate, pid)
            if os.path.isfile(path):
                paths.add(path)
        except (UserError, OSError):
            continue
    return paths


def program_candidates(executable: str, here: str) -> list[str]:
    """Where a program (`executable` as its process names it, `here` as we reach it) will run OpenSSL: the
    libssl its DT_NEEDED names, in the loader's directories; else itself, which may link OpenSSL in."""
    needed = [name for name in _needed(here) if name.startswith("libssl.")]
    return [os.path.join(d, name) for name in needed for d in LIBRARY_DIRS] or [executable]


def _needed(path: str) -> list[str]:
    """The DT_NEEDED libraries of an ELF file; [] for anything else."""
    try:
        info = os.stat(path)
    except OSError:
        return []
    return _needed_of(path, info.st_dev, info.st_ino, info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _needed_of(path: str, *identity) -> list[str]:
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            return [tag.needed for section in elf.iter_sections() if isinstance(section, DynamicSection)
                    for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
    except (OSError, ELFError, ValueError):
        return []
