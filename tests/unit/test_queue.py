"""RetryQueue: the bound in bytes, and the spool that keeps requests across runs."""

import os
import stat

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf.config import load_settings
from otel_ebpf.errors import UserError
from otel_ebpf.otlp.queue import RetryQueue
from tests.unit.otlp_helpers import encode, spool_files


def test_retry_queue_drops_the_oldest_past_its_bound():
    queue = RetryQueue(max_bytes=25)
    assert queue.push(b"a" * 10, 1) == 0
    assert queue.push(b"b" * 10, 2) == 0
    assert queue.push(b"c" * 10, 3) == 1  # 30 bytes > 25: a goes

    assert (len(queue), queue.bytes, queue.spans) == (2, 20, 5)
    assert [queue.take().data for _ in range(2)] == [b"b" * 10, b"c" * 10]
    assert queue.take() is None
    assert queue.push(b"x" * 26, 4) == 4, "a request larger than the bound is dropped itself"


def test_a_request_being_sent_is_outside_the_bound_and_goes_back_first():
    queue = RetryQueue(max_bytes=20)
    queue.push(b"a" * 10, 1)
    sending = queue.take()
    assert queue.push(b"b" * 10, 1) == 0 and queue.push(b"c" * 10, 1) == 0

    assert queue.put_back(sending) == 1, "back in the queue it is the oldest, so it is dropped first"
    assert [queue.take().data for _ in range(2)] == [b"b" * 10, b"c" * 10]


def test_spool_keeps_requests_across_runs_in_order(tmp_path):
    spool = tmp_path / "spool"
    first = RetryQueue(1 << 20, str(spool))
    for i in range(3):
        first.push(encode([f"s{i}"]), 1)
    first.close()
    assert len(spool_files(spool)) == 3 and not any(name.endswith(".tmp") for name in os.listdir(spool))

    second = RetryQueue(1 << 20, str(spool))
    assert (len(second), second.spans) == (3, 3)
    second.push(encode(["s3"]), 1)
    taken = [second.take() for _ in range(4)]
    assert [ExportTraceServiceRequest.FromString(p.data).resource_spans[0].scope_spans[0].spans[0].name
            for p in taken] == ["s0", "s1", "s2", "s3"]
    for payload in taken:
        second.done(payload)
    assert spool_files(spool) == []
    second.close()


def test_spool_size_cap_is_respected_dropping_the_oldest_files(tmp_path):
    cap = 10_000
    queue = RetryQueue(cap, str(tmp_path))
    dropped = sum(queue.push(encode([f"s{i}"] * 10), 10) for i in range(100))

    on_disk = sum(os.path.getsize(tmp_path / name) for name in spool_files(tmp_path))
    assert on_disk == queue.bytes <= cap
    assert dropped == 100 * 10 - queue.spans > 0
    newest = ExportTraceServiceRequest.FromString((tmp_path / spool_files(tmp_path)[-1]).read_bytes())
    assert newest.resource_spans[0].scope_spans[0].spans[0].name == "s99"
    queue.close()


def test_spool_discards_interrupted_writes_and_leaves_other_files_alone(tmp_path):
    (tmp_path / "00000000000000000007-5.binpb.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "00000000000000000003-2.binpb").write_bytes(encode(["a", "b"]))

    queue = RetryQueue(1 << 20, str(tmp_path))

    assert queue.spans == 2
    assert sorted(os.listdir(tmp_path)) == [".lock", "00000000000000000003-2.binpb", "notes.txt"]
    queue.push(encode(["c"]), 1)
    assert spool_files(tmp_path)[1].startswith("00000000000000000004-"), "numbering goes on after the last file"
    queue.close()


def test_spool_directory_serves_one_otel_ebpf_at_a_time(tmp_path):
    first = RetryQueue(1 << 20, str(tmp_path))
    with pytest.raises(UserError, match=f"OTEL_EBPF_SPOOL_DIR='{tmp_path}' is in use") as info:
        RetryQueue(1 << 20, str(tmp_path))
    assert info.value.hint
    first.close()
    RetryQueue(1 << 20, str(tmp_path)).close()


def test_unusable_spool_directory_is_a_user_error(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(UserError, match="OTEL_EBPF_SPOOL_DIR=.* cannot be used: File exists"):
        RetryQueue(1 << 20, str(not_a_directory))


def test_spool_directory_and_files_are_private(tmp_path):
    """Spans can hold captured arguments: a new spool directory is 0700 and its files 0600, whatever the umask."""
    spool = tmp_path / "new" / "spool"
    previous = os.umask(0o002)
    try:
        queue = RetryQueue(1 << 20, str(spool))
        queue.push(encode(["a"]), 1)
        queue.close()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    files = [spool / name for name in os.listdir(spool)]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_a_spool_directory_others_can_write_is_refused(tmp_path, mode):
    spool = tmp_path / "shared"
    spool.mkdir()
    spool.chmod(mode)
    with pytest.raises(UserError, match=f"can be written by other users \\(mode {mode:04o}\\)") as info:
        RetryQueue(1 << 20, str(spool))
    assert "chmod 700" in info.value.hint
    assert os.listdir(spool) == []


def test_retry_settings():
    settings = load_settings({"OTEL_EBPF_RETRY_QUEUE_SIZE": "16K", "OTEL_EBPF_SPOOL_DIR": "/var/spool/x",
                              "OTEL_EBPF_SPOOL_SIZE": "2M"})
    assert (settings.retry_queue_size, settings.spool_dir, settings.spool_size) == (16 << 10, "/var/spool/x", 2 << 20)
    defaults = load_settings({})
    assert (defaults.retry_queue_size, defaults.spool_dir, defaults.spool_size) == (64 << 20, None, 256 << 20)
    for variable, value, reason in [("OTEL_EBPF_RETRY_QUEUE_SIZE", "lots", "suffix K or M"),
                                    ("OTEL_EBPF_SPOOL_SIZE", "0", "greater than 0")]:
        with pytest.raises(UserError, match=f"{variable}='{value}' is invalid: .*{reason}"):
            load_settings({variable: value})
