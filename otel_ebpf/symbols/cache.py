"""Parsed symbol tables kept across runs, one JSON file each.

Reading and demangling the symbols of a large library (libc's debug file: some 10,000 symbols) takes
the better part of a second, a cached table a few milliseconds. A cache that cannot be written (a
read-only root filesystem) is silently not used: it only saves time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile

from otel_ebpf.symbols.debuginfo import writable_dir

FORMAT = 1  # bump when what is stored changes
_MAX_FILES = 64  # tables kept; the least recently used go first


def key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts]).encode()).hexdigest()


def load(directory: str, name: str) -> dict | None:
    path = os.path.join(directory, name + ".json")
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
        with contextlib.suppress(OSError):
            os.utime(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def store(directory: str, name: str, value: dict) -> None:
    if writable_dir(directory) is None:
        return
    try:
        out = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False)
    except OSError:
        return
    try:
        with out:
            json.dump(value, out, separators=(",", ":"))
        os.replace(out.name, os.path.join(directory, name + ".json"))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(out.name)
        return
    _evict(directory)


def _evict(directory: str) -> None:
    with contextlib.suppress(OSError):
        tables = [entry for entry in os.scandir(directory) if entry.name.endswith(".json")]
        tables.sort(key=lambda entry: entry.stat().st_mtime_ns)
        for entry in tables[:-_MAX_FILES]:
            os.unlink(entry.path)
