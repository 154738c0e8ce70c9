/* The one compilation unit BCC builds: every map and program of otel-ebpf, whatever the number of probed
 * functions (probes are told apart by their attach cookies, so nothing here depends on them).
 *
 * Tunables (-D): MAX_DEPTH, MAX_THREADS, MAX_PROCESSES, MAX_IDENTITIES, SPAN_RING_PAGES, NOTICE_RING_PAGES,
 * SPAN_WAKE_EVERY (every so many ids of a call stack, a span wakes user space), PIDNS_DEV and PIDNS_INO (see
 * visible_ids), SAMPLE_ALL or SAMPLE_THRESHOLD (a root is sampled when the lower 64 bits of its trace id,
 * read big-endian, are below it: the OpenTelemetry TraceIdRatioBased rule), PARENT_BASED, MIN_DURATION_NS,
 * FOLLOW_ONLY (trace only processes user space registered and their descendants, rather than every process
 * that runs a probed binary), and HTTP_TRACING (http.bpf.c: probed calls become children of the HTTP
 * request they serve).
 *
 * Every tracepoint is declared here, in the unit itself: BCC generates the structs of their arguments (from
 * the running kernel's tracefs formats) only for the file it is given. */
#include <uapi/linux/ptrace.h>
#include <linux/signal.h> /* sigset_t, in the arguments of epoll_pwait and ppoll */
#include "maps.h"
#include "bits.h"
#ifdef HTTP_TRACING
#include "http_maps.h"
#endif
#include "common.bpf.h"
#ifdef HTTP_TRACING
#include "http.bpf.c"
#include "tls.bpf.c"
#endif
#include "capture.bpf.c"
#include "filter.bpf.c"
#include "uprobe.bpf.c"
#include "process.bpf.c"

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { capture_exec(args->filename, args->argv, args->envp); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { capture_exec(args->filename, args->argv, args->envp); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_execve) { exec_failed(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { exec_failed(args->ret); return 0; }
TRACEPOINT_PROBE(sched, sched_process_exec) { on_exec(args->old_pid); return 0; }
TRACEPOINT_PROBE(task, task_newtask) { on_new_task(args->pid, args->clone_flags); return 0; }
TRACEPOINT_PROBE(sched, sched_process_exit) { on_task_exit(); return 0; }

#ifdef HTTP_TRACING
TRACEPOINT_PROBE(syscalls, sys_enter_read) { remember_read(args->fd, args->buf, IO_READ); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { on_read(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { remember_read(args->fd, args->ubuf, IO_READ); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { on_read(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { remember_read(args->fd, args->vec, IO_READV); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { on_read(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { remember_read(args->fd, args->msg, IO_RECVMSG); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { on_read(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { remember_write(args->fd, args->buf, IO_WRITE); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { remember_write(args->fd, args->buff, IO_WRITE); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { remember_write(args->fd, args->vec, IO_WRITEV); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { remember_write(args->fd, args->msg, IO_SENDMSG); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) { remember_write(args->out_fd, NULL, IO_SENDFILE); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_splice) { remember_write(args->fd_out, NULL, IO_SENDFILE); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_splice) { on_write(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { remember_accept(args->fd, args->upeer_sockaddr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { on_accept(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_accept) { remember_accept(args->fd, args->upeer_sockaddr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { on_accept(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_connect) { remember_connect(args->fd, args->uservaddr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { on_connect(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_getpeername) { remember_peername(args->fd, args->usockaddr); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_getpeername) { on_peername(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_dup) { remember_dup(args->fildes); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_dup) { on_dup(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { remember_dup(args->oldfd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_dup2) { on_dup(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { remember_dup(args->oldfd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_dup3) { on_dup(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_fcntl)
{
	if (args->cmd == F_DUPFD_CMD || args->cmd == F_DUPFD_CLOEXEC_CMD)
		remember_dup(args->fd);
	return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_fcntl) { on_dup(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { on_open(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_socket) { on_open(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_close) { on_close(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_close_range) { on_close_range(args->fd, args->max_fd, args->flags); return 0; }
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol == IPPROTO_TCP_NUMBER && args->oldstate == TCP_SYN_RECV_STATE &&
	    args->newstate == TCP_ESTABLISHED_STATE)
		on_passive_open(args->family, args->sport, args->dport, args->saddr, args->daddr, args->saddr_v6,
				args->daddr_v6);
	return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_wait) { on_wait(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait) { on_wait(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait2) { on_wait(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_poll) { on_wait(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_ppoll) { on_wait(); return 0; }
#endif
