/* What crosses the kernel/user boundary. This header is the single definition: user space
 * (otel_ebpf/events.py) mirrors it and checks the mirror against the compiled program at start-up
 * and in tests/unit/test_event_layout.py. Fixed-width fields only, padding spelled out. Every event
 * starts with its kind, so user space can tell them apart in the one ring buffer. */
#ifndef OTEL_EBPF_EVENT_H
#define OTEL_EBPF_EVENT_H

enum event_kind {
	EVENT_SPAN = 1,
	EVENT_HTTP_REQUEST = 2,
	EVENT_HTTP_RESPONSE = 3,
	EVENT_PROCESS_START = 4,
	EVENT_PROCESS_EXIT = 5,
};

/* One finished call of a probed function, emitted by the return probe. */
struct span_event {
	__u32 kind;              /* EVENT_SPAN */
	__u32 probe_id;          /* index into the probe table user space compiled into the program */
	__u64 start_ns;          /* CLOCK_MONOTONIC at function entry */
	__u64 end_ns;            /* CLOCK_MONOTONIC at function return */
	__u64 trace_id[2];       /* 16 random bytes shared by every call nested under the trace root */
	__u64 span_id;           /* 8 random bytes naming this call */
	__u64 parent_span_id;    /* enclosing probed call on this thread, or the HTTP request it serves; 0: root */
	__u32 pid;               /* thread group id, as seen in the tracer's PID namespace */
	__u32 tid;               /* thread id, as seen in the tracer's PID namespace */
	__u32 depth;             /* nesting depth among probed calls on its thread, 0 = outermost */
	__u32 process_seq;       /* which process this pid was (pids are reused): see struct process_event */
	__u64 goroutine_id;      /* Go: the goroutine's id (runtime.g.goid); 0 for native code */
};

/* Bytes of a request kept for user space to parse: request line and the headers that fit. */
#define HTTP_REQUEST_CAPTURE 1024
/* Bytes of a response kept: the status line. */
#define HTTP_RESPONSE_CAPTURE 32

/* An HTTP/1.x request arrived on a socket of a traced process: the start of a SERVER span. */
struct http_request_event {
	__u32 kind;              /* EVENT_HTTP_REQUEST */
	__u32 fd;                /* the connection's file descriptor in that process */
	__u64 start_ns;          /* CLOCK_MONOTONIC when the read that brought the request returned */
	__u64 trace_id[2];       /* made here; user space replaces it by a traceparent header's */
	__u64 span_id;           /* of the SERVER span: parent of the function spans on the handling thread */
	__u32 pid;
	__u32 tid;               /* the thread that read the request */
	__u32 length;            /* bytes of data that are valid */
	__u32 sampled;           /* the kernel's sampling decision for this request's trace */
	__u32 process_seq;
	__u32 pad;
	__u8 data[HTTP_REQUEST_CAPTURE];
};

/* The response to a request was written, or the connection closed without one (length 0). */
struct http_response_event {
	__u32 kind;              /* EVENT_HTTP_RESPONSE */
	__u32 fd;
	__u64 end_ns;            /* CLOCK_MONOTONIC when the write of the response returned */
	__u64 span_id;           /* of the SERVER span it ends, as in its http_request_event */
	__u32 pid;
	__u32 tid;
	__u32 length;
	__u32 pad;
	__u8 data[HTTP_RESPONSE_CAPTURE];
};

/* A process made its first probed call (user space reads its identity from /proc at once: it may be
 * short-lived), or such a process exited. process_seq is a random number given to the process at its first
 * probed call, so that a reused pid is not mistaken for its previous owner; 0 marks processes user space
 * registered itself. */
struct process_event {
	__u32 kind;              /* EVENT_PROCESS_START or EVENT_PROCESS_EXIT */
	__u32 pid;
	__u32 process_seq;
	__u32 pad;
};

/* Never sent: the value type of the `event_layout` map, so user space can check every layout. */
struct event_layouts {
	struct span_event span;
	struct http_request_event http_request;
	struct http_response_event http_response;
	struct process_event process;
};

/* Slots of the `counters` map: things the kernel side could not do, so user space can report them. */
enum counter {
	COUNTER_EVENTS_LOST = 0,      /* ring buffer full: a finished call could not be emitted */
	COUNTER_DEPTH_EXCEEDED = 1,   /* a call nested deeper than MAX_DEPTH: not recorded */
	COUNTER_UNMATCHED_RETURN = 2, /* a return without its entry (probe attached mid-call, longjmp) */
	COUNTER_NOTICES_LOST = 3,     /* ring buffer full: an HTTP or process event could not be emitted */
	COUNTER_MAX = 4,
};

/* Layout of the `latency` map (see maps.h). */
#define LATENCY_BUCKETS 40
#define LATENCY_SLOTS (LATENCY_BUCKETS + 1)

#endif
