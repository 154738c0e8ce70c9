# One image for both the traced example and the otel-ebpf sidecar, on purpose:
# a uprobe is attached to a file's inode, not to its path. Containers started
# from the same image share its read-only layers, so /app/examples/build/nested
# seen by the sidecar is the very file (same inode) the example container runs,
# and the sidecar's probes fire in the example's processes. A separately built
# sidecar image would hold a different copy and its probes would never fire.
FROM debian:12-slim

# python3-bpfcc: BCC comes from Debian (the PyPI "bcc" is an unrelated project).
# gcc, libc6-dev, make, golang-go: to build the examples; binutils: c++filt demangles C++/Rust names.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3-bpfcc python3-venv gcc libc6-dev make golang-go binutils \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Examples first: they change less often than the tracer, so this layer is cached.
COPY examples/ examples/
RUN make -C examples

COPY . .
# --system-site-packages: the venv must see the apt-installed bcc module.
# Editable (-e): the tracer reads its BPF C sources from /app/bpf, next to the
# package, which a regular install would not copy into site-packages.
RUN python3 -m venv --system-site-packages /opt/otel-ebpf \
    && /opt/otel-ebpf/bin/pip install --no-cache-dir -e /app
ENV PATH=/opt/otel-ebpf/bin:$PATH

ENTRYPOINT ["otel-ebpf"]
CMD ["--help"]
