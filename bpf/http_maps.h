/* The maps of http.bpf.c, each with what it keeps track of. */
#ifndef OTEL_EBPF_HTTP_MAPS_H
#define OTEL_EBPF_HTTP_MAPS_H

/* A read or write in progress on a thread of a watched process: the syscall's arguments, kept from
 * entry to exit, where the data is there to read. Keyed by pid_tgid. */
struct pending_io {
	__u64 buf;
	__u32 fd;
	__u32 pad;
};
BPF_HASH(pending_reads, __u64, struct pending_io, MAX_THREADS);
BPF_HASH(pending_writes, __u64, struct pending_io, MAX_THREADS);

struct connection_key {
	__u32 tgid;
	__u32 fd;
};

/* Requests in flight per connection. LRU: a connection closed behind our back cannot stay forever. */
BPF_TABLE("lru_hash", struct connection_key, struct request_context, requests, MAX_THREADS);

/* The request each thread is handling, by pid_tgid: probed calls starting there become its children. */
BPF_TABLE("lru_hash", __u64, struct request_context, thread_requests, MAX_THREADS);

#endif
