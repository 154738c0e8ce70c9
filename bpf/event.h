/* What crosses the kernel/user boundary. This header is the single definition: user space
 * (otel_ebpf/kernel/layout.py) mirrors it and checks the mirror against the compiled program at
 * start-up and in tests/unit/test_event_layout.py. Fixed-width fields only, padding spelled out
 * (gcc -Wpadded -Werror guards it).
 *
 * Two channels, each a BPF ring buffer:
 * - `spans`: one fixed-size struct span_record per finished call, so a drained batch is one array;
 * - `notices`: variable-size records that start with struct notice_header: processes starting, forking,
 *   exec'ing and exiting, HTTP requests and responses. Spans refer to them by (pid, process_seq) and by
 *   trace and span ids; user space reads the notices before the spans they explain. */
#ifndef OTEL_EBPF_EVENT_H
#define OTEL_EBPF_EVENT_H

/* One finished call of a probed function, emitted by the return probe. pid and process_seq are next to each
 * other: together, one 64-bit key of the process (user space groups spans by it). */
struct span_record {
	__u64 start_ns;          /* CLOCK_MONOTONIC at function entry */
	__u64 end_ns;            /* CLOCK_MONOTONIC at function return */
	__u64 trace_id[2];       /* 16 bytes, in W3C order, shared by every call nested under the trace root */
	__u64 span_id;           /* 8 bytes naming this call */
	__u64 parent_span_id;    /* enclosing probed call, the HTTP request served, or the TRACEPARENT span; 0: root */
	__u64 goroutine_id;      /* Go: the goroutine's id (runtime.g.goid); 0 for native code or unknown */
	__u32 pid;               /* thread group id, as seen in the tracer's PID namespace */
	__u32 process_seq;       /* which process this pid was (pids are reused): see struct process_notice */
	__u32 probe_id;          /* which probe: the attach cookie's PROBE_ID bits, a number user space gave */
	__u32 flags;             /* SPAN_* bits */
	__u32 tid;               /* thread id, as seen in the tracer's PID namespace */
	__u32 depth;             /* nesting depth among probed calls on its thread or goroutine, 0 = outermost */
};

/* span_record.flags */
#define SPAN_REMOTE_PARENT 1 /* the parent is the process's TRACEPARENT: a span of another process */

/* The attach cookie of every uprobe: which probe it is and how to pair its calls. */
#define COOKIE_PROBE_ID_MASK 0xFFFFFFULL  /* bits 0-23: the probe id */
#define COOKIE_GO (1ULL << 24)            /* Go code: calls nest per goroutine (see goroutine_key) */
#define COOKIE_PROCESS_START (1ULL << 25) /* the entry point of a probed executable: watch the process */
#define COOKIE_TLS (1ULL << 26)           /* OpenSSL's SSL_read & co. (http.bpf.c): the probe id is a TLS_* */
#define COOKIE_GO_HOOK (1ULL << 27)       /* Go's runtime and net/http (http.bpf.c): the probe id is a GO_HOOK_* */
#define COOKIE_CAPTURE (1ULL << 28)       /* the probe reads arguments or its result (capture_plans, capture.bpf.c) */
#define COOKIE_INSTANT (1ULL << 29)       /* a USDT probe: entry and return at once, a zero-length span */
#define COOKIE_FILTER (1ULL << 30)        /* only calls whose name strings match (name_filters, filter.bpf.c) */
#define COOKIE_GOID_SHIFT 32              /* bits 32-47: offset of goid in runtime.g, 0 when unknown */
/* Probe ids are below this: the latency map has one slot per probe id, per CPU (336 bytes each). */
#define MAX_PROBES 1024

enum notice_kind {
	NOTICE_PROCESS = 1,       /* struct process_notice */
	NOTICE_PROCESS_EXIT = 2,  /* struct process_notice without identity */
	NOTICE_HTTP_REQUEST = 3,  /* struct http_request_notice */
	NOTICE_HTTP_RESPONSE = 4, /* struct http_response_notice */
	NOTICE_FDS_CLOSED = 5,    /* struct fds_closed_notice */
	NOTICE_HTTP2 = 6,         /* struct http2_notice */
	NOTICE_HTTP_CLIENT = 7,   /* struct http_client_notice */
	NOTICE_GO_STREAM = 8,     /* struct go_stream_notice */
	NOTICE_CAPTURE = 9,       /* struct capture_notice */
	NOTICE_EXEC = 10,         /* struct exec_notice */
};

/* The first bytes of every notice. */
struct notice_header {
	__u32 kind;              /* enum notice_kind */
	__u32 length;            /* bytes of the whole record, this header included */
};

/* A process's identity as copied at exec, in three regions of identity.data: the path execve was given,
 * its arguments (each NUL-terminated) and the few variables that say who it is and which trace started it
 * ("NAME=value", each NUL-terminated). What does not fit is left out and flagged. */
#define IDENTITY_FILENAME 256
#define IDENTITY_ARGV 512
#define IDENTITY_ENV 1024
#define IDENTITY_ENV_VALUE 512   /* the longest variable kept, "NAME=value" and its NUL included */
#define IDENTITY_MAX_ARGS 32
#define IDENTITY_MAX_ENV 256     /* environment entries looked at */

/* identity.flags */
#define IDENTITY_CAPTURED 1      /* the kernel saw the exec: what follows is the process's own */
#define IDENTITY_ARGV_CUT 2      /* more arguments than fit */
#define IDENTITY_ENV_CUT 4       /* a variable did not fit, or there were too many entries to look at */
#define IDENTITY_HAS_PARENT 8    /* TRACEPARENT was valid: parent_* hold it */
#define IDENTITY_PARENT_SAMPLED 16 /* ... and its sampled flag was set */

struct identity {
	__u32 flags;             /* IDENTITY_* */
	__u16 filename_length;   /* bytes of the path, from data[0] (no NUL) */
	__u16 argv_length;       /* bytes of arguments, from data[IDENTITY_FILENAME] */
	__u16 env_length;        /* bytes of variables, from data[IDENTITY_FILENAME + IDENTITY_ARGV] */
	__u16 traceparent_at;    /* where TRACEPARENT starts among the variables, plus one; 0: none */
	__u32 pad;
	__u64 parent_trace_id[2]; /* TRACEPARENT parsed in the kernel (bits.h), in W3C byte order */
	__u64 parent_span_id;
	__u8 data[IDENTITY_FILENAME + IDENTITY_ARGV + IDENTITY_ENV];
};

/* A process the kernel follows (a traced command and its descendants, a --pid process, any process running
 * a probed executable system-wide), announced once before its first span. process_seq is a number the kernel
 * gives each new program (a fork, an exec) so that a reused pid is not mistaken for its previous owner; 0
 * marks processes user space registered itself and read from /proc. */
struct process_notice {
	struct notice_header header; /* NOTICE_PROCESS or NOTICE_PROCESS_EXIT */
	__u32 pid;               /* as seen in the tracer's PID namespace */
	__u32 process_seq;
	__u32 parent_pid;        /* fork: the process it is a copy of (identity and all), else 0 */
	__u32 parent_seq;
	__u32 cause;             /* PROCESS_CAUSE_* */
	__u32 pad;
	struct identity identity; /* NOTICE_PROCESS only: an exit notice ends before it */
};

/* A process exec'd a new program; sent for every exec only when probes name binaries by a path pattern
 * (DISCOVER_EXECS), for user space to match the program against them. */
struct exec_notice {
	struct notice_header header; /* NOTICE_EXEC */
	__u32 pid;               /* as seen in the tracer's PID namespace */
	__u32 pad;
};

/* process_notice.cause */
#define PROCESS_CAUSE_EXEC 1     /* it exec'd: a new program, identity captured */
#define PROCESS_CAUSE_FORK 2     /* forked from parent_pid: the same program */
#define PROCESS_CAUSE_FOUND 3    /* first seen at a probed call; identity captured if its exec was seen */

/* What a COOKIE_TLS uprobe is on (in its probe id bits). */
#define TLS_READ 1               /* SSL_read(ssl, buf, num): returns the bytes read */
#define TLS_WRITE 2              /* SSL_write(ssl, buf, num): returns the bytes written */
#define TLS_READ_EX 3            /* SSL_read_ex(ssl, buf, num, *readbytes): returns 1 when it read */
#define TLS_WRITE_EX 4           /* SSL_write_ex(ssl, buf, num, *written): returns 1 when it wrote */
#define TLS_SET_FD 5             /* SSL_set_fd(ssl, fd): the socket of an SSL object (entry only) */

/* What a COOKIE_GO_HOOK uprobe is on (in its probe id bits): where context passes between goroutines. */
#define GO_HOOK_NEWPROC 1        /* runtime.newproc1: a goroutine starts another (entry and returns) */
#define GO_HOOK_ROUND_TRIP 2     /* net/http.(*Transport).roundTrip: a caller hands a request over (entry) */
#define GO_HOOK_REQUEST_WRITE 3  /* net/http.(*Request).write: a goroutine writes one (entry) */

/* Bytes of a read kept for user space to parse: request line and the headers that fit. */
#define HTTP_REQUEST_CAPTURE 1024
/* Reads of one request sent until its response starts: enough for header sections of a few KiB. */
#define HTTP_REQUEST_READS 4
/* Bytes kept of a response write: the status line and header section (from the write's first buffer). */
#define HTTP_RESPONSE_CAPTURE 512
/* Response writes whose first bytes are kept: a header section written piece by piece. */
#define HTTP_RESPONSE_HEAD_WRITES 4
/* Bytes kept of the end of every response write: where a chunked body's last chunk shows. */
#define HTTP_RESPONSE_TAIL 8

/* A read of an HTTP/1.x request on an accepted socket of a watched process: its first read (read == 0)
 * starts a SERVER span; later reads (read 1, 2, ..., while no response was written) continue its header
 * section. */
struct http_request_notice {
	struct notice_header header; /* NOTICE_HTTP_REQUEST */
	__u32 fd;                /* the connection's file descriptor in that process */
	__u32 pid;
	__u32 tid;               /* the thread that read it */
	__u32 process_seq;
	__u64 start_ns;          /* CLOCK_MONOTONIC when the read returned */
	__u64 trace_id[2];       /* made here; user space replaces it by a traceparent header's */
	__u64 span_id;           /* of the SERVER span: parent of the function spans on the handling thread */
	__u32 sampled;           /* the kernel's sampling decision for this request's trace */
	__u32 length;            /* bytes of data that are valid; only these are sent */
	__u16 read;              /* 0: the read that began the request; then later reads of it */
	__u16 flags;             /* HTTP_TLS */
	__u16 family;            /* of both addresses: AF_INET or AF_INET6 as accept returned the peer, else 0 */
	__u16 peer_port;         /* host byte order */
	__u8 peer_addr[16];      /* AF_INET: the first 4 bytes */
	__u16 local_port;        /* 0: the local end is not known */
	__u8 held_length;        /* bytes of `held` that come before data: a short read before this one */
	__u8 pad;
	__u8 held[4];
	__u8 local_addr[16];
	__u8 data[HTTP_REQUEST_CAPTURE];
};

/* http_request_notice.flags */
#define HTTP_TLS 1               /* read in plaintext from SSL_read: an HTTPS request */

/* A response write on a connection with a request in flight (write, writev, sendto, sendmsg, sendfile,
 * splice), or the connection's close (closed = 1). User space finds where the response ends from these. */
struct http_response_notice {
	struct notice_header header; /* NOTICE_HTTP_RESPONSE; records without data end at `data` */
	__u32 fd;
	__u32 pid;
	__u32 tid;
	__u32 length;            /* bytes of data that are valid: the write's first bytes */
	__u64 end_ns;            /* CLOCK_MONOTONIC when the write returned, or at the close */
	__u64 span_id;           /* of the SERVER span of the connection's request, as in its http_request_notice */
	__u64 written;           /* bytes the write wrote: its return value */
	__u32 write;             /* writes of this response before this one */
	__u16 closed;            /* 1: the connection closed; nothing was written */
	__u16 tail_length;       /* bytes of tail that are valid */
	__u8 tail[HTTP_RESPONSE_TAIL]; /* the last bytes written (not for sendfile and splice: file data) */
	__u8 data[HTTP_RESPONSE_CAPTURE]; /* only while write < HTTP_RESPONSE_HEAD_WRITES */
};

/* An HTTP/1.x request a watched process wrote on a socket it connected: a CLIENT span, the child of the probed
 * call in flight on that thread (else of the request it serves). Its response comes back as
 * http_response_notice records of the reads (span_id is this one's), or the connection's close. */
struct http_client_notice {
	struct notice_header header; /* NOTICE_HTTP_CLIENT */
	__u32 fd;
	__u32 pid;
	__u32 tid;
	__u32 process_seq;
	__u64 start_ns;          /* CLOCK_MONOTONIC when the write returned */
	__u64 trace_id[2];       /* the trace of the span it is a child of, as the kernel knows it, or a new one */
	__u64 span_id;           /* of the CLIENT span */
	__u64 parent_span_id;    /* 0: a root */
	__u32 sampled;
	__u32 length;            /* bytes of data that are valid */
	__u16 family;            /* of the server's address, as connect was given it */
	__u16 peer_port;
	__u16 flags;             /* HTTP_TLS: written in plaintext to SSL_write */
	__u16 pad;
	__u8 peer_addr[16];
	__u8 data[HTTP_REQUEST_CAPTURE];
};

/* Bytes kept of each read and write of an HTTP/2 connection: its frames, as far as they fit. */
#define HTTP2_CAPTURE 4096

/* A read or write of an HTTP/2 connection (one whose first read was the client's preface, or a connected socket
 * whose first write was), on its socket or in plaintext at OpenSSL: user space follows the frames of each
 * direction from these and decodes their headers. The record ends after the `captured` bytes of data: the first
 * bytes of what was read or written, across its iovecs. A write of an outbound connection carries the context
 * of the writing thread or goroutine (as current_context finds it): the streams it opens are children of it. */
struct http2_notice {
	struct notice_header header; /* NOTICE_HTTP2 */
	__u32 fd;
	__u32 pid;
	__u32 tid;
	__u32 process_seq;
	__u64 ns;                /* CLOCK_MONOTONIC when the read or write returned */
	__u64 length;            /* bytes read or written */
	__u32 captured;          /* bytes of data that are valid */
	__u16 direction;         /* HTTP2_RECEIVED, HTTP2_SENT, or HTTP2_CLOSED (the connection closed: no data) */
	__u16 flags;             /* HTTP_TLS, HTTP2_OUTBOUND */
	__u16 family;            /* of both addresses, as in http_request_notice */
	__u16 peer_port;
	__u16 local_port;
	__u16 pad;
	__u8 peer_addr[16];
	__u8 local_addr[16];     /* port 0 on outbound connections: not known */
	__u64 trace_id[2];       /* outbound writes: the trace of the span in flight there; zeros: none */
	__u64 parent_span_id;
	__u32 sampled;
	__u32 pad2;
	__u8 data[HTTP2_CAPTURE];
};

/* http2_notice.flags, besides HTTP_TLS */
#define HTTP2_OUTBOUND 2         /* a connection the process connected: it sends the requests */

/* http2_notice.direction */
#define HTTP2_RECEIVED 0
#define HTTP2_SENT 1
#define HTTP2_CLOSED 2

/* A Go program started the goroutine that serves the next stream of an HTTP/2 connection it reads: a function
 * of GO_STREAM_HANDLERS (user space) started by a goroutine that reads that connection, or was started by one.
 * Its calls start from the ids here, which the stream's SERVER span takes: user space gives this to the oldest
 * stream of the connection not yet served by one. */
struct go_stream_notice {
	struct notice_header header; /* NOTICE_GO_STREAM */
	__u32 fd;
	__u32 pid;
	__u32 process_seq;
	__u32 sampled;
	__u64 ns;                /* CLOCK_MONOTONIC at the goroutine's start */
	__u64 trace_id[2];
	__u64 span_id;           /* of the SERVER span */
};

/* What a probe reads of its calls, as a probe spec asks (user space writes it to capture_plans by probe id):
 * values of argument registers at entry, and of the result register at the return. Nothing else is read. */
#define MAX_CAPTURES 8           /* values read at entry, at most */
#define CAPTURE_STRING_MAX 1024  /* the longest str<N> or hex<N> */
#define CAPTURE_DATA 2048        /* bytes of strings one capture notice carries in all */

/* capture_slot.kind */
#define CAPTURE_NONE 0           /* an unused slot: the plan ends before it */
#define CAPTURE_VALUE 1          /* the register itself: int, uint, bool, ptr */
#define CAPTURE_STRING 2         /* a NUL-terminated string the register points to, up to `length` bytes */
#define CAPTURE_BYTES 3          /* `length` bytes the register points to (hex<N>) */
#define CAPTURE_GO_STRING 4      /* Go: pointer in `reg`, length in `length_reg`; up to `length` bytes */

/* Registers a slot reads, as numbered here (not as in pt_regs). */
#define REG_RDI 0
#define REG_RSI 1
#define REG_RDX 2
#define REG_RCX 3
#define REG_R8 4
#define REG_R9 5
#define REG_RAX 6
#define REG_RBX 7
#define REG_R10 8
#define REG_R11 9
#define REG_RBP 10
#define REG_RSP 11
#define REG_R12 12
#define REG_R13 13
#define REG_R14 14
#define REG_R15 15
#define CAPTURE_REGISTERS 16

struct capture_slot {
	__u8 kind;               /* CAPTURE_* */
	__u8 reg;                /* REG_* */
	__u8 length_reg;         /* CAPTURE_GO_STRING: the register of its length */
	__u8 flags;              /* SLOT_* */
	__u16 length;            /* strings and bytes: the most copied, at most CAPTURE_STRING_MAX */
	__u16 pad;
	__s32 offset;            /* SLOT_MEMORY: added to the register */
	__u32 pad2;
};

/* capture_slot.flags */
#define SLOT_MEMORY 1            /* the value is the 8 bytes at reg + offset (a USDT argument such as -4@8(%rsp)) */

/* Slots read at the return: the result captured, and a Go error result's first word (nil or its type). */
#define CAPTURE_RESULTS 2

struct capture_plan {
	struct capture_slot entry[MAX_CAPTURES];      /* read at entry, in order, up to the first CAPTURE_NONE */
	struct capture_slot result[CAPTURE_RESULTS];  /* read at the return, up to the first CAPTURE_NONE */
};

/* One value as read: the register, or for strings and bytes where they are in capture_notice.data. */
struct captured_value {
	__u64 value;             /* CAPTURE_VALUE: the register; else the offset of its bytes in data */
	__u16 length;            /* bytes copied */
	__u16 flags;             /* CAPTURED_* */
	__u32 pad;
};

/* captured_value.flags */
#define CAPTURED_CUT 1           /* longer than the bound: only the first `length` bytes were copied */
#define CAPTURED_FAULT 2         /* the memory could not be read (a NULL or bad pointer): no bytes */

/* What a call's probe read at entry (at = CAPTURE_AT_ENTRY, sent as the call starts) or at its return
 * (CAPTURE_AT_RETURN, sent just before its span): user space joins it to the span with the same span_id. The
 * record ends after its strings' bytes. Sent only for sampled calls. */
struct capture_notice {
	struct notice_header header; /* NOTICE_CAPTURE */
	__u32 pid;
	__u32 probe_id;
	__u64 span_id;           /* of the call's span */
	__u16 at;                /* CAPTURE_AT_* */
	__u16 count;             /* values that are valid */
	__u32 data_length;       /* bytes of data that are valid */
	struct captured_value values[MAX_CAPTURES];
	__u8 data[2 * CAPTURE_DATA]; /* the second half is room for a last string, never sent past data_length */
};

/* capture_notice.at */
#define CAPTURE_AT_ENTRY 0
#define CAPTURE_AT_RETURN 1

/* Which calls of a probe are traced, by two strings its arguments point to at both of its sites (Python's
 * function__entry and function__return pass the file and function name): a call is traced when some rule
 * matches both. User space writes one per filtered probe, by probe id. */
#define NAME_PATTERN_MAX 64      /* bytes of a pattern */
#define NAME_RULES 8             /* rules of one filter */
#define FILTER_NAME_MAX 128      /* bytes of the name compared (longer names are compared by their start) */
#define FILTER_FILE_MAX 256      /* bytes of the file compared (longer paths: by their start) */

/* name_pattern.kind */
#define PATTERN_ANY 0            /* `*`: anything */
#define PATTERN_EXACT 1          /* the whole string */
#define PATTERN_PREFIX 2         /* `text*` */
#define PATTERN_SUFFIX 3         /* `*text` */

struct name_pattern {
	__u8 kind;               /* PATTERN_* */
	__u8 length;             /* bytes of text */
	__u8 pad[2];
	char text[NAME_PATTERN_MAX];
};

struct name_rule {
	struct name_pattern file;
	struct name_pattern name;
};

struct name_filter {
	__u8 entry_file_reg;     /* REG_* holding the file's address at the entry site */
	__u8 entry_name_reg;     /* ... and the name's */
	__u8 return_file_reg;    /* the same at the return site */
	__u8 return_name_reg;
	__u32 rules;             /* rules that are valid */
	struct name_rule rule[NAME_RULES];
};

/* Descriptors [first, last] of a watched process that had sockets closed at once, without a close() per
 * descriptor: close_range, or the process's exit (0 to ~0). The requests on them end then. */
struct fds_closed_notice {
	struct notice_header header; /* NOTICE_FDS_CLOSED */
	__u32 pid;
	__u32 first;
	__u64 last;              /* a u64 so that the record has no padding */
	__u64 end_ns;            /* CLOCK_MONOTONIC */
};

/* Never sent: the value type of the `event_layout` map, so user space can check every layout. */
struct event_layouts {
	struct span_record span;
	struct process_notice process;
	struct http_request_notice http_request;
	struct http_response_notice http_response;
	struct fds_closed_notice fds_closed;
	struct http2_notice http2;
	struct http_client_notice http_client;
	struct go_stream_notice go_stream;
	struct capture_notice capture;
	struct exec_notice exec;
	struct capture_plan capture_plan; /* not a notice: the value of capture_plans */
	struct name_filter name_filter;   /* not a notice: the value of name_filters */
};

/* Slots of the `counters` map: things the kernel side could not do, so user space can report them. */
enum counter {
	COUNTER_SPANS_LOST = 0,       /* span ring buffer full: a finished call could not be emitted */
	COUNTER_DEPTH_EXCEEDED = 1,   /* a call nested deeper than MAX_DEPTH: not recorded */
	COUNTER_UNMATCHED_RETURN = 2, /* a return without its entry (probe attached mid-call, longjmp) */
	COUNTER_NOTICES_LOST = 3,     /* notice ring buffer full: an HTTP or process notice could not be emitted */
	COUNTER_WAKEUPS = 4,          /* a span woke user space (one every SPAN_WAKE_EVERY ids of a stack) */
	/* Entries put in and taken out of the LRU maps of http_maps.h: what a map holds beyond their difference
	 * was pushed out to make room (user space counts the entries). */
	COUNTER_SOCKETS_ADDED = 5,
	COUNTER_SOCKETS_REMOVED = 6,
	COUNTER_REQUESTS_ADDED = 7,
	COUNTER_REQUESTS_REMOVED = 8,
	COUNTER_THREAD_REQUESTS_ADDED = 9,
	COUNTER_THREAD_REQUESTS_REMOVED = 10,
	COUNTER_GOROUTINE_REQUESTS_ADDED = 11,
	COUNTER_GOROUTINE_REQUESTS_REMOVED = 12,
	COUNTER_CLIENT_REQUESTS_ADDED = 13,
	COUNTER_CLIENT_REQUESTS_REMOVED = 14,
	COUNTER_H2_READERS_ADDED = 15,
	COUNTER_H2_READERS_REMOVED = 16,
	COUNTER_GO_REQUESTS_ADDED = 17,
	COUNTER_GO_REQUESTS_REMOVED = 18,
	COUNTER_GO_WRITERS_ADDED = 19,
	COUNTER_GO_WRITERS_REMOVED = 20,
	/* a filtered probe's matching return whose entry it never reported (Python 3.11 reports function__entry for
	 * few calls: CPython gh-98894), or did for another call: not paired */
	COUNTER_FILTERED_UNPAIRED = 21,
	COUNTER_MAX = 22,
};

/* Per-probe latency histogram, one per CPU (the `latency` map): calls with 2^(i-1) < duration_ns <= 2^i
 * fall in buckets[i] (the last bucket is open-ended); every call is counted, sampled or not. */
#define LATENCY_BUCKETS 40
struct latency_slots {
	__u64 buckets[LATENCY_BUCKETS];
	__u64 sum_ns;            /* of all durations */
	__u64 max_ns;            /* the longest call */
};

#endif
