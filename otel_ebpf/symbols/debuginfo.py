"""Separate debug files: distributions strip their binaries and ship the symbol tables apart.

Looked for the way gdb, elfutils and bcc do, one small step each, first hit wins:

1. build id: DEBUG_ROOT/.build-id/xx/rest.debug, named after the binary's NT_GNU_BUILD_ID note
   (Debian's -dbg and -dbgsym packages, Fedora's -debuginfo);
2. .gnu_debuglink: the file it names in the binary's directory, its .debug/ subdirectory or
   DEBUG_ROOT/DIR, with the CRC32 the link records checked (a stale debug file has other addresses);
3. MiniDebugInfo: .gnu_debugdata, an xz-compressed ELF inside the binary itself holding a .symtab of the
   functions .dynsym lacks (Fedora and its derivatives ship it in every binary);
4. debuginfod, when DEBUGINFOD_URLS names servers: GET URL/buildid/HEX/debuginfo, each server in turn,
   kept in a cache directory so that the next run finds it without the network.

A file found through its build id or from debuginfod must carry the same build id.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import lzma
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elftools.elf.elffile import ELFFile

from otel_ebpf.errors import UserError
from otel_ebpf.symbols import elf as elfs

if TYPE_CHECKING:
    from otel_ebpf.config import Settings

BUILD_ID = "build-id"
DEBUGLINK = "debuglink"
MINIDEBUGINFO = "MiniDebugInfo"
DEBUGINFOD = "debuginfod"
_MINIDEBUGINFO_MAX = 256 << 20  # decompressed bytes: a damaged or hostile .gnu_debugdata must not fill memory
_DEBUGINFOD_TIMEOUT_S = 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Options:
    """Where debug files and caches are: from Settings in the CLI, the defaults elsewhere, temp dirs in tests."""

    debug_root: str = "/usr/lib/debug"
    debuginfod_urls: tuple[str, ...] = ()
    debuginfod_cache_path: str | None = None  # None: CACHE_HOME/otel-ebpf/debuginfod, else a private temp dir
    cache_home: str | None = None  # XDG_CACHE_HOME; None: ~/.cache
    symbol_cache: bool = False  # keep parsed tables in CACHE_HOME/otel-ebpf/symbols across runs: the CLI does

    @classmethod
    def from_settings(cls, settings: Settings) -> Options:
        return cls(debuginfod_urls=settings.debuginfod_urls, debuginfod_cache_path=settings.debuginfod_cache_path,
                   cache_home=settings.cache_home, symbol_cache=True)

    @property
    def cache_base(self) -> str:
        return os.path.join(self.cache_home or os.path.expanduser("~/.cache"), "otel-ebpf")


@dataclass(frozen=True)
class DebugFile:
    kind: str  # BUILD_ID, DEBUGLINK, MINIDEBUGINFO or DEBUGINFOD
    path: str  # the file to read; for MiniDebugInfo the binary itself
    origin: str = ""  # debuginfod: the server it came from, or "cache"


def find(path: str, elf: ELFFile, options: Options) -> tuple[DebugFile | None, tuple[str, ...]]:
    """The debug file of the binary at path (elf), and what went wrong on the way (for the hint when none)."""
    build = elfs.build_id(elf)
    notes: list[str] = []
    found = (via_build_id(build, options.debug_root) or via_debuglink(path, elf, options.debug_root)
             or via_mini_debuginfo(path, elf) or via_debuginfod(build, options, notes))
    return found, tuple(notes)


def via_build_id(build: str | None, debug_root: str) -> DebugFile | None:
    if not build or len(build) < 3:
        return None
    candidate = os.path.join(debug_root, ".build-id", build[:2], build[2:] + ".debug")
    return DebugFile(BUILD_ID, candidate) if _has_build_id(candidate, build) else None


def via_debuglink(path: str, elf: ELFFile, debug_root: str) -> DebugFile | None:
    link = debuglink(elf)
    if link is None:
        return None
    name, crc = link
    directory = os.path.dirname(path)
    candidates = (os.path.join(directory, name), os.path.join(directory, ".debug", name),
                  os.path.join(debug_root, directory.lstrip("/"), name))
    binary = os.stat(path)
    for candidate in candidates:
        try:
            found = os.stat(candidate)
        except OSError:
            continue
        same = (found.st_dev, found.st_ino) == (binary.st_dev, binary.st_ino)
        if not same and stat.S_ISREG(found.st_mode) and crc32(candidate) == crc:
            return DebugFile(DEBUGLINK, candidate)
    return None


def debuglink(elf: ELFFile) -> tuple[str, int] | None:
    """.gnu_debuglink: a file name, NUL, padding to 4 bytes, then the CRC32 of the debug file."""
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None or section["sh_type"] == "SHT_NOBITS" or not _in_file(elf, section):
        return None
    data = section.data()
    end = data.find(b"\0")
    crc_at = (end + 4) & ~3
    if end <= 0 or len(data) < crc_at + 4:
        return None
    crc = int.from_bytes(data[crc_at:crc_at + 4], "little" if elf.little_endian else "big")
    return os.fsdecode(data[:end]), crc


def crc32(path: str) -> int | None:
    try:
        with open(path, "rb") as stream:
            value = 0
            while chunk := stream.read(_CHUNK):
                value = zlib.crc32(chunk, value)
            return value
    except OSError:
        return None


def via_mini_debuginfo(path: str, elf: ELFFile) -> DebugFile | None:
    section = elf.get_section_by_name(".gnu_debugdata")
    if section is None or section["sh_type"] == "SHT_NOBITS" or not _in_file(elf, section):
        return None
    return DebugFile(MINIDEBUGINFO, path)


def via_debuginfod(build: str | None, options: Options, notes: list[str]) -> DebugFile | None:
    if not build or not options.debuginfod_urls:
        return None
    cache = debuginfod_cache(options)
    if cache is None:
        notes.append("no writable directory to keep debuginfod downloads in (set DEBUGINFOD_CACHE_PATH)")
        return None
    target = os.path.join(cache, build, "debuginfo")
    if _has_build_id(target, build):
        return DebugFile(DEBUGINFOD, target, "cache")
    for url in options.debuginfod_urls:
        problem = _download(f"{url.rstrip('/')}/buildid/{build}/debuginfo", target)
        if problem is None and _has_build_id(target, build):
            return DebugFile(DEBUGINFOD, target, url)
        with contextlib.suppress(OSError):
            os.unlink(target)
        notes.append(f"debuginfod {url}: {problem or 'sent a file of another build'}")
    return None


def _download(url: str, target: str) -> str | None:
    """Fetch url into target (through a temporary file, so a broken transfer leaves nothing); the problem, or None."""
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        with urllib.request.urlopen(url, timeout=_DEBUGINFOD_TIMEOUT_S) as response:
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(target), delete=False) as partial:
                try:
                    shutil.copyfileobj(response, partial, _CHUNK)
                except BaseException:
                    os.unlink(partial.name)
                    raise
        os.replace(partial.name, target)
    except urllib.error.HTTPError as err:
        return "no debug info for this build id" if err.code == 404 else f"HTTP {err.code}"
    except urllib.error.URLError as err:
        return str(err.reason)
    except (OSError, ValueError, http.client.HTTPException) as err:
        return str(err) or type(err).__name__
    return None


def debuginfod_cache(options: Options) -> str | None:
    """DEBUGINFOD_CACHE_PATH, else CACHE_HOME/otel-ebpf/debuginfod, else (a read-only root filesystem) a
    directory of our own under the temp directory; None when none of them can be written."""
    if options.debuginfod_cache_path:
        return writable_dir(options.debuginfod_cache_path)
    return writable_dir(os.path.join(options.cache_base, "debuginfod")) or _private_temp_dir("debuginfod")


def writable_dir(path: str) -> str | None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def _private_temp_dir(name: str) -> str | None:
    """TMP/otel-ebpf-UID/name, created mode 0700; refused when another user made it first (planted files
    would be taken for debug info)."""
    base = os.path.join(tempfile.gettempdir(), f"otel-ebpf-{os.geteuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return None
    return writable_dir(os.path.join(base, name))


@contextlib.contextmanager
def opened(debug: DebugFile) -> Iterator[ELFFile]:
    """The debug file as ELF; MiniDebugInfo decompressed from the binary's .gnu_debugdata."""
    with open(debug.path, "rb") as stream:
        elf = ELFFile(stream)
        if debug.kind != MINIDEBUGINFO:
            yield elf
            return
        decompressor = lzma.LZMADecompressor()
        data = decompressor.decompress(elf.get_section_by_name(".gnu_debugdata").data(), _MINIDEBUGINFO_MAX)
        if not decompressor.eof:
            raise UserError(f"the MiniDebugInfo of {debug.path} is truncated or larger than "
                            f"{_MINIDEBUGINFO_MAX >> 20} MiB", "the binary may be damaged")
        yield ELFFile(io.BytesIO(data))


def _has_build_id(path: str, build: str) -> bool:
    try:
        with open(path, "rb") as stream:
            return elfs.build_id(ELFFile(stream)) == build
    except elfs.PARSE_ERRORS:
        return False


def _in_file(elf: ELFFile, section) -> bool:
    """Section.data() reads sh_size bytes unchecked: a damaged size must not ask for more than the file holds."""
    return section["sh_offset"] + section["sh_size"] <= elf.stream.seek(0, os.SEEK_END)
