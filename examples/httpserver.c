/* A small HTTP/1.1 server for tracing HTTP requests: one thread per connection
 * (so requests run on different threads), keep-alive, Content-Length bodies.
 *
 *   httpserver PORT [MAX_REQUESTS [msg]]
 *
 * Listens on 127.0.0.1:PORT (0: a free port, printed). With MAX_REQUESTS > 0 it
 * stops accepting after that many responses, waits for its connections to be
 * closed (idle ones time out after IDLE_TIMEOUT_S) and exits 0. With `msg` it
 * accepts without asking for the peer's address (then asks getpeername) and
 * reads with recvmsg instead of read, as some servers do.
 *
 * Routes (GET only, any other method gets 405; a malformed request 400):
 *   /work?n=K   0 <= K <= 20: handle_request -> parse_query, compute -> fib..., render
 *   /health     200, no probed calls
 *   else        404, no probed calls
 *
 * stdout is the ground truth (parsed by tests/ground_truth.py):
 *   pid N
 *   listening port=P
 *   call ...    one line per probed call (see groundtruth.c)
 *   request tid=T fd=F method=M path=P query=Q status=S traceparent=V start=NS end=NS
 *   done calls=N
 * A request line comes after its response was written. query and traceparent
 * are `-` when absent. start is CLOCK_REALTIME right after the read() that
 * returned the request's first bytes, end right after its response's writev(). */
#define _GNU_SOURCE
#include "groundtruth.h"
#include "work.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/uio.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 8192
#define MAX_N 20
#define IDLE_TIMEOUT_S 10

static int listen_fd;
static long max_requests;
static long served;
static int use_msg;
static int connections;
static pthread_mutex_t connections_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t connections_closed = PTHREAD_COND_INITIALIZER;

struct request {
    char *method;
    char *path;
    char *query;             /* NULL when the target has no '?' */
    char *traceparent;       /* NULL when absent */
    long content_length;
    int keep_alive;
};

static long long realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* n from "n=K" among the &-separated parameters; -1 when missing or out of range. */
TRACED int parse_query(const char *query)
{
    struct gt_call call = gt_enter();
    int n = -1;
    const char *p = query;
    while (p) {
        char *end;
        if (!strncmp(p, "n=", 2) && p[2] >= '0' && p[2] <= '9') {
            long v = strtol(p + 2, &end, 10);
            if ((*end == '\0' || *end == '&') && v <= MAX_N)
                n = (int)v;
        }
        p = strchr(p, '&');
        if (p)
            p++;
    }
    gt_exit("parse_query", &call);
    return n;
}

TRACED int render(int n, long result, char *body, size_t size)
{
    struct gt_call call = gt_enter();
    int length = snprintf(body, size, "fib(%d) = %ld\n", n, result);
    gt_exit("render", &call);
    return length;
}

/* The /work route: returns the status and fills body. */
TRACED int handle_request(const char *query, char *body, size_t size)
{
    struct gt_call call = gt_enter();
    int status = 200;
    int n = parse_query(query);
    if (n < 0) {
        snprintf(body, size, "n must be 0..%d\n", MAX_N);
        status = 400;
    } else {
        render(n, compute(n), body, size);
    }
    gt_exit("handle_request", &call);
    return status;
}

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    default: return "Error";
    }
}

/* Length of the header section through its empty line (CRLF or bare LF
 * endings, RFC 9112 section 2.2); 0 while it is incomplete. */
static size_t head_length(const char *buf, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (buf[i + 1] == '\n')
            return i + 2;
        if (buf[i + 1] == '\r' && i + 2 < len && buf[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    char *end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        *--end = '\0';
    return s;
}

/* Parses the NUL-terminated header section in place; 0 when malformed. */
static int parse_head(char *head, struct request *req)
{
    char *line = strsep(&head, "\n");
    char *version;
    req->method = strsep(&line, " ");
    char *target = strsep(&line, " ");
    version = line ? trim(line) : NULL;
    if (!*req->method || !target || *target != '/' || !version)
        return 0;
    for (const char *c = target; *c; c++)
        if (*c <= ' ' || *c > '~')
            return 0;
    req->path = strsep(&target, "?");
    req->query = target;
    req->traceparent = NULL;
    req->content_length = 0;
    if (!strcmp(version, "HTTP/1.1"))
        req->keep_alive = 1;
    else if (!strcmp(version, "HTTP/1.0"))
        req->keep_alive = 0;
    else
        return 0;

    while ((line = strsep(&head, "\n")) && *trim(line)) {
        char *name = strsep(&line, ":");
        if (!line)
            return 0;
        char *value = trim(line);
        if (!strcasecmp(name, "traceparent"))
            req->traceparent = value;
        else if (!strcasecmp(name, "content-length"))
            req->content_length = strtol(value, NULL, 10);
        else if (!strcasecmp(name, "transfer-encoding"))
            return 0;    /* chunked bodies are not supported: 400 */
        else if (!strcasecmp(name, "connection"))
            req->keep_alive = strcasestr(value, "close") ? 0
                : strcasestr(value, "keep-alive") ? 1 : req->keep_alive;
    }
    return req->content_length >= 0;
}

/* Makes s safe to print as one space-free word of a ground-truth line. */
static const char *word(char *s)
{
    if (!s)
        return "-";
    for (char *c = s; *c; c++)
        if (*c <= ' ' || *c > '~')
            *c = '_';
    return s;
}

static int respond(int fd, int status, const char *body, int keep_alive)
{
    char head[256];
    int head_length = snprintf(head, sizeof head,
                               "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                               status, reason(status), strlen(body), keep_alive ? "" : "Connection: close\r\n");
    struct iovec iov[2] = {{head, (size_t)head_length}, {(void *)body, strlen(body)}};
    /* The header section and the body in one writev, as nginx answers: the tracer
     * must find the response's end from its Content-Length. The loop only runs
     * again if the kernel took part of it. */
    for (int i = 0; i < 2;) {
        ssize_t n = writev(fd, iov + i, 2 - i);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return 0;
        for (; i < 2 && (size_t)n >= iov[i].iov_len; i++)
            n -= iov[i].iov_len;
        if (i < 2) {
            iov[i].iov_base = (char *)iov[i].iov_base + n;
            iov[i].iov_len -= n;
        }
    }
    return 1;
}

static int route(struct request *req, char *body, size_t size)
{
    if (strcmp(req->method, "GET")) {
        snprintf(body, size, "GET only\n");
        return 405;
    }
    if (!strcmp(req->path, "/work"))
        return handle_request(req->query, body, size);
    if (!strcmp(req->path, "/health")) {
        snprintf(body, size, "ok\n");
        return 200;
    }
    snprintf(body, size, "not found\n");
    return 404;
}

/* read(), or with `msg` recvmsg() into one iovec. */
static ssize_t receive(int fd, char *buf, size_t size)
{
    if (!use_msg)
        return read(fd, buf, size);
    struct iovec iov = { .iov_base = buf, .iov_len = size };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    return recvmsg(fd, &msg, 0);
}

/* Reads and drops a request body; 0 when the connection ended first. */
static int discard(int fd, char *buf, size_t size, long length)
{
    while (length > 0) {
        ssize_t n = receive(fd, buf, (size_t)length < size ? (size_t)length : size);
        if (n <= 0)
            return 0;
        length -= n;
    }
    return 1;
}

static void serve(int fd)
{
    char buf[HEAD_MAX + 1], body[128];
    size_t len = 0;
    long long last_read_ns = 0;
    for (;;) {
        /* Bytes left over from the previous read belong to a pipelined request. */
        long long start = len ? last_read_ns : 0;
        size_t head;
        while (!(head = head_length(buf, len))) {
            if (len == HEAD_MAX)
                return;
            ssize_t n = receive(fd, buf + len, HEAD_MAX - len);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return;    /* closed, failed, or idle too long */
            last_read_ns = realtime_ns();
            if (!start)
                start = last_read_ns;
            len += n;
        }

        struct request req;
        char saved = buf[head];
        buf[head] = '\0';
        int valid = parse_head(buf, &req);
        int status = valid ? route(&req, body, sizeof body) : 400;
        if (!valid) {
            snprintf(body, sizeof body, "bad request\n");
            req.method = req.path = "-";
            req.query = req.traceparent = NULL;
            req.keep_alive = 0;
        }
        if (!respond(fd, status, body, req.keep_alive))
            return;
        long long end = realtime_ns();
        printf("request tid=%d fd=%d method=%s path=%s query=%s status=%d traceparent=%s start=%lld end=%lld\n",
               gettid(), fd, word(req.method), word(req.path), word(req.query), status,
               word(req.traceparent), start, end);
        if (max_requests && __atomic_add_fetch(&served, 1, __ATOMIC_SEQ_CST) == max_requests)
            shutdown(listen_fd, SHUT_RDWR);    /* wakes accept() in main */
        if (!req.keep_alive)
            return;

        buf[head] = saved;
        size_t in_buffer = len - head;
        size_t body_part = (size_t)req.content_length < in_buffer ? (size_t)req.content_length : in_buffer;
        if (!discard(fd, buf, sizeof buf, req.content_length - (long)body_part))
            return;
        len = in_buffer - body_part;
        memmove(buf, buf + head + body_part, len);
    }
}

static void *connection(void *arg)
{
    int fd = (int)(long)arg;
    serve(fd);
    close(fd);
    pthread_mutex_lock(&connections_lock);
    if (--connections == 0)
        pthread_cond_signal(&connections_closed);
    pthread_mutex_unlock(&connections_lock);
    return NULL;
}

/* Parses a decimal long in [0, max]; -1 when s is not one. */
static long parse_number(const char *s, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    return errno || end == s || *end || v < 0 || v > max ? -1 : v;
}

int main(int argc, char **argv)
{
    long port = argc > 1 ? parse_number(argv[1], 65535) : -1;
    max_requests = argc > 2 ? parse_number(argv[2], 1000000000) : 0;
    use_msg = argc > 3 && !strcmp(argv[3], "msg");
    if (argc > 4 || (argc > 3 && !use_msg) || port < 0 || max_requests < 0) {
        fprintf(stderr, "usage: %s PORT [MAX_REQUESTS [msg]]\n", argv[0]);
        return 2;
    }
    /* Line buffered even when piped, so each line is written whole. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);    /* a client that hangs up is one failed write, not the end */

    struct sockaddr_in address = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t address_len = sizeof address;
    int one = 1;
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0 || setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one)
        || bind(listen_fd, (struct sockaddr *)&address, sizeof address) || listen(listen_fd, 128)
        || getsockname(listen_fd, (struct sockaddr *)&address, &address_len)) {
        perror("listen");
        return 1;
    }
    printf("pid %d\n", getpid());
    printf("listening port=%d\n", ntohs(address.sin_port));

    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    struct timeval idle = { IDLE_TIMEOUT_S, 0 };
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t peer_length = sizeof peer;
        int fd = use_msg ? accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC)
                         : accept4(listen_fd, (struct sockaddr *)&peer, &peer_length, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            break;    /* shut down after MAX_REQUESTS */
        }
        if (use_msg && getpeername(fd, (struct sockaddr *)&peer, &peer_length)) {
            close(fd);
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
        pthread_t thread;
        pthread_mutex_lock(&connections_lock);
        connections++;
        pthread_mutex_unlock(&connections_lock);
        int err = pthread_create(&thread, &detached, connection, (void *)(long)fd);
        if (err) {
            fprintf(stderr, "pthread_create: %s\n", strerror(err));
            return 1;
        }
    }
    pthread_mutex_lock(&connections_lock);
    while (connections)
        pthread_cond_wait(&connections_closed, &connections_lock);
    pthread_mutex_unlock(&connections_lock);
    printf("done calls=%ld\n", gt_total_calls());
    return 0;
}
