"""Where OpenSSL's plaintext is read (otel_ebpf/protocols/tls.py), on this machine's real files and processes."""

import os
import ssl

from otel_ebpf.kernel.attach import Kind
from otel_ebpf.kernel.layout import COOKIE_TLS, TLS_READ, TLS_READ_EX, TLS_SET_FD, TLS_WRITE, TLS_WRITE_EX
from otel_ebpf.protocols import tls
from tests.e2e.servers import NGINX


def libssl_of_this_process() -> str:
    assert ssl.OPENSSL_VERSION  # the ssl module maps libssl into this process
    (path,) = {m.path for m in tls.files.mappings() if os.path.basename(m.path).startswith("libssl.")}
    return os.path.realpath(path)


def test_openssl_3_has_every_function_and_set_fd_has_no_return_probe():
    sites = tls.sites(libssl_of_this_process())
    by_op = {}
    for site in sites:
        assert site.cookie & COOKIE_TLS
        by_op.setdefault(site.cookie & ~COOKIE_TLS, set()).add(site.kind)
    both = {Kind.ENTRY, Kind.RETURN}
    assert by_op == {TLS_READ: both, TLS_WRITE: both, TLS_READ_EX: both, TLS_WRITE_EX: both,
                     TLS_SET_FD: {Kind.ENTRY}}


def test_a_file_without_openssl_has_no_sites():
    assert tls.sites("/bin/true") == []


def test_a_process_is_read_in_the_libssl_it_maps():
    assert libssl_of_this_process() in tls.libraries(os.getpid())


def test_a_program_linked_with_libssl_is_read_there_before_it_maps_it():
    """nginx names libssl in DT_NEEDED: its uprobes can go on before the dynamic loader maps it."""
    candidates = tls.program_candidates(str(NGINX), str(NGINX))
    assert "/usr/lib/x86_64-linux-gnu/libssl.so.3" in candidates and str(NGINX) not in candidates
    assert tls.program_candidates("/bin/true", "/bin/true") == ["/bin/true"]  # it might link OpenSSL in
