#!/usr/bin/env bash
# Prepares a Debian 12 machine to run otel-ebpf and its tests, idempotently:
# Debian packages (BCC, kernel headers, compilers), the kernel-headers link BCC looks for, tracefs,
# and a virtualenv in .venv that sees Debian's bcc module. Says what is missing when it cannot fix it.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "setup: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (apt-get, /lib/modules, mount); try: sudo make setup"

PACKAGES=(python3-bpfcc python3-venv python3-dev linux-headers-amd64 gcc g++ make binutils bpftrace golang-go systemtap-sdt-dev
          libc6-dbg debuginfod elfutils xz-utils iproute2 util-linux openssl
          nginx-light redis-server redis-tools sqlite3 curl)
# The Rust symbol test needs a rustc; Debian's unless the machine has one (rustup's).
command -v rustc >/dev/null || PACKAGES+=(rustc)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || fail "apt-get not found: install ${missing[*]} by hand (Debian 12 package names)"
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed: no access to the Debian archive?"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
    # The servers are for the tests, which start their own on 127.0.0.1: not the packages' system services.
    for service in nginx redis-server; do
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    done
    pkill -x nginx >/dev/null 2>&1 || true
    pkill -x redis-server >/dev/null 2>&1 || true
fi

# BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel has no headers package
# of its own, Debian's newest linux-headers-*-amd64 serve for uprobes and tracepoints.
release=$(uname -r)
modules=/lib/modules/$release
if [ ! -d "$modules/build/include" ]; then
    headers=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$headers" ] || fail "no kernel headers in /usr/src: apt-get install linux-headers-amd64"
    common=${headers%-amd64}-common
    mkdir -p "$modules"
    ln -sfn "$headers" "$modules/build"
    [ -d "$common" ] && ln -sfn "$common" "$modules/source"
    echo "setup: linked $modules/build -> $headers (no headers package for $release)"
fi

if [ ! -e /sys/kernel/tracing/uprobe_events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null \
        || fail "tracefs is not mounted and could not be: mount -t tracefs nodev /sys/kernel/tracing"
fi
[ -r /sys/kernel/btf/vmlinux ] || echo "setup: note: no /sys/kernel/btf/vmlinux (BTF); uprobes still work" >&2

# Debian's bcc lives in /usr/lib/python3/dist-packages, for /usr/bin/python3 only.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv || fail "could not create .venv with /usr/bin/python3"
fi
if ! .venv/bin/python -c "import otel_ebpf, pytest, yaml" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ] \
        || [ otel_ebpf/otlp/_encode.c -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' || fail "pip install into .venv failed"
    touch .venv/.installed
fi
.venv/bin/python -c "import bcc" || fail "the venv cannot import bcc: is python3-bpfcc installed?"
.venv/bin/python -c "import otel_ebpf.otlp._encode" \
    || fail "the span encoder's C extension did not build (python3-dev and gcc are needed); see pip's output above"
echo "setup: ready (kernel $release, $(.venv/bin/python --version))"
