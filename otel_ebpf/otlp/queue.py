"""Encoded export requests waiting out a backend outage: in memory, or spooled to files a restarted sidecar sends.

One file per request, named by sequence number and span count, so the next run can order and count them
without reading them; an fcntl lock on the directory keeps two sidecars from sharing (and deleting) its files.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import stat
from dataclasses import dataclass

from otel_ebpf.config import OTEL_EBPF_RETRY_QUEUE_SIZE, OTEL_EBPF_SPOOL_DIR, OTEL_EBPF_SPOOL_SIZE
from otel_ebpf.errors import UserError


@dataclass
class _Payload:
    """One encoded export request in a RetryQueue: ``data`` in memory, or only in the spool file ``path``."""

    spans: int
    size: int
    data: bytes | None = None
    path: str | None = None


_SPOOL_FILE = re.compile(r"(\d+)-(\d+)\.binpb")  # sequence number, spans in it


class RetryQueue:
    """Encoded export requests waiting for a backend that failed, oldest first, at most ``max_bytes`` of them:
    past that the oldest are dropped, since the newest say more about the present.

    With ``directory`` the queue is a spool like the Collector's persistent queue: one file per request, written
    under a temporary name and then renamed (so a file is always whole), deleted once delivered; the next run
    finds them and sends them first. Not thread-safe: RetryingExporter holds its lock around every call.
    """

    def __init__(self, max_bytes: int, directory: str | None = None):
        self.max_bytes = max_bytes
        self.directory = directory
        self.bytes = self.spans = 0
        self._entries: collections.deque[_Payload] = collections.deque()
        self._next_sequence = 0
        self._lock_file = None
        if directory is not None:
            self._open_spool(directory)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bound_setting(self) -> str:
        """The variable that sets ``max_bytes``, for messages."""
        return OTEL_EBPF_SPOOL_SIZE if self.directory else OTEL_EBPF_RETRY_QUEUE_SIZE

    def push(self, data: bytes, spans: int, front: bool = False) -> int:
        """Queue a request last (or first: the rest of one sent in part); returns the spans dropped to stay
        within the bound (maybe this request's).

        Raises OSError when the spool file cannot be written; the request is not queued then.
        """
        payload = _Payload(spans, len(data), data)
        if self.directory is not None:
            payload = self._write(payload)
        self._append(payload, left=front)
        return self._trim()

    def take(self) -> _Payload | None:
        """The oldest request, out of the queue (and of the bound) while it is being sent: give it back with
        put_back() or finish it with done(). Its data is None if its spool file cannot be read."""
        if not self._entries:
            return None
        payload = self._entries.popleft()
        self.bytes -= payload.size
        self.spans -= payload.spans
        if payload.path is not None:
            try:
                with open(payload.path, "rb") as f:
                    payload.data = f.read()
            except OSError:  # removed or damaged by someone else: data stays None, the caller drops it
                pass
        return payload

    def put_back(self, payload: _Payload) -> int:
        """Return an undelivered request to the front; returns the spans dropped to stay within the bound."""
        if payload.path is not None:
            payload.data = None
        self._append(payload, left=True)
        return self._trim()

    def done(self, payload: _Payload) -> None:
        """Forget a request that was delivered or refused."""
        if payload.path is not None:
            _remove(payload.path)

    def close(self) -> None:
        """Let another process use the spool directory; queued files stay for it."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _append(self, payload: _Payload, left: bool) -> None:
        (self._entries.appendleft if left else self._entries.append)(payload)
        self.bytes += payload.size
        self.spans += payload.spans

    def _trim(self) -> int:
        dropped = 0
        while self.bytes > self.max_bytes:
            oldest = self._entries.popleft()
            self.bytes -= oldest.size
            self.spans -= oldest.spans
            self.done(oldest)
            dropped += oldest.spans
        return dropped

    def _open_spool(self, directory: str) -> None:
        """Lock the directory (two writers would delete each other's files) and queue the files found there."""
        setting = f"{OTEL_EBPF_SPOOL_DIR}={directory!r}"
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)  # spans can hold captured arguments: private
            _check_private(directory, setting)
            self._lock_file = os.fdopen(os.open(os.path.join(directory, ".lock"), os.O_WRONLY | os.O_CREAT |
                                                os.O_APPEND, 0o600), "a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            names = os.listdir(directory)
        except BlockingIOError:
            raise UserError(f"{setting} is in use by another otel-ebpf",
                            "give each otel-ebpf its own spool directory") from None
        except OSError as exc:
            raise UserError(f"{setting} cannot be used: {exc.strerror}",
                            f"make {OTEL_EBPF_SPOOL_DIR} a directory otel-ebpf can create and write") from None
        found = []
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".tmp"):  # a write interrupted by a crash: never complete, never renamed
                _remove(path)
            elif match := _SPOOL_FILE.fullmatch(name):
                found.append((int(match[1]), int(match[2]), path))
        for sequence, spans, path in sorted(found):
            self._append(_Payload(spans, os.path.getsize(path), path=path), left=False)
            self._next_sequence = sequence + 1

    def _write(self, payload: _Payload) -> _Payload:
        path = os.path.join(self.directory, f"{self._next_sequence:020d}-{payload.spans}.binpb")
        self._next_sequence += 1
        try:
            with os.fdopen(os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(payload.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(f"{path}.tmp", path)
        except OSError:
            _remove(f"{path}.tmp")
            raise
        return _Payload(payload.spans, payload.size, path=path)


def _check_private(directory: str, setting: str) -> None:
    """Refuse a spool directory other users can write to (or that is not ours): they could read, replace or plant
    the span data sent from it."""
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{setting} is not a directory", f"make {OTEL_EBPF_SPOOL_DIR} a directory of its own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid != os.geteuid():
        owner = "" if info.st_uid == os.geteuid() else f", owned by uid {info.st_uid}"
        raise UserError(f"{setting} can be written by other users (mode {stat.S_IMODE(info.st_mode):04o}{owner}), "
                        "and spans may hold captured arguments",
                        f"use a directory of otel-ebpf's own user that only it can write (chmod 700 {directory})")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
