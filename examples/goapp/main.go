// goapp is the Go program the tests trace: a request handler with nested calls, goroutines
// fanning out, plain recursion and recursion deep enough to make the goroutine's stack grow (and
// so move) while traced calls are in flight: what breaks return probes on Go.
//
//	goapp work N             handle N requests without HTTP, then exit
//	goapp serve [-port P]    HTTP on 127.0.0.1:P (env GOAPP_PORT; 0 picks a free port) until
//	                         SIGINT/SIGTERM; GET /?id=N handles request N
//	goapp lookup N           call lookup(id, name) N times (the capture tests), printing
//	                         `lookup id=ID name=HEX n=N err=TEXT|-` for each call
//
// env GOAPP_START_DELAY_MS: sleep that long after printing the pid, so a tracer can attach first.
// env GOAPP_DOWNSTREAM: a URL each request also fetches (with `?n=ID` added) once its work is done, on
// one keep-alive connection of net/http's client: `fetch id=N status=S reused=BOOL` per request.
//
// stdout: `pid N`, in serve mode `listening port=P`, one `call ...` line per call of a
// function that calls gtEnter (see groundtruth.go), then `done calls=N`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// deepLevels of deepFrameBytes each exceed the 8 KiB a goroutine starts with, so the stack grows
// in deep's own prologue: its first instruction then runs twice for one call, and the stack (with
// the calls of deep in flight) moves. Frames over 4 KiB get the longer form of the stack check.
const (
	deepLevels     = 6
	deepFrameBytes = 5000
)

type Server struct {
	name       string
	downstream string
	client     *http.Client
}

type request struct {
	id    int
	parts int
}

//go:noinline
func (s *Server) handle(id int) string {
	defer gtExit(gtEnter())
	req := s.parse(id)
	total := s.fanOut(req)
	if s.downstream != "" {
		s.fetch(id)
	}
	return fmt.Sprintf("%s: request %d -> %d\n", s.name, req.id, total)
}

// fetch asks the downstream service about the request, reading the whole answer so that the connection
// is kept for the next one; it says whether it got a connection used before.
//
//go:noinline
func (s *Server) fetch(id int) {
	defer gtExit(gtEnter())
	status, reused := 0, false
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused }}
	ctx := httptrace.WithClientTrace(context.Background(), trace)
	request, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s?n=%d", s.downstream, id), nil)
	if err == nil {
		if response, err := s.client.Do(request); err == nil {
			io.Copy(io.Discard, response.Body)
			response.Body.Close()
			status = response.StatusCode
		}
	}
	gt.Lock()
	fmt.Fprintf(gt.out, "fetch id=%d status=%d reused=%t\n", id, status, reused)
	gt.Unlock()
}

// parse turns a request id into the number of goroutines its work is split into: 2 or 3.
//
//go:noinline
func (s *Server) parse(id int) request {
	defer gtExit(gtEnter())
	return request{id: id, parts: 2 + id%2}
}

//go:noinline
func (s *Server) fanOut(req request) int {
	defer gtExit(gtEnter())
	results := make([]int, req.parts)
	var wg sync.WaitGroup
	for k := range results {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			results[k] = work(req.id + k)
		}(k)
	}
	wg.Wait()
	total := 0
	for _, r := range results {
		total += r
	}
	return total
}

// work runs on a fresh goroutine, whose stack has the initial size, so deep makes it grow every time.
//
//go:noinline
func work(n int) int {
	defer gtExit(gtEnter())
	return fib(3+n%3) + deep(deepLevels)
}

//go:noinline
func fib(n int) int {
	defer gtExit(gtEnter())
	if n < 2 {
		return n
	}
	return fib(n-1) + fib(n-2)
}

//go:noinline
func deep(n int) int {
	defer gtExit(gtEnter())
	var frame [deepFrameBytes]byte
	frame[n%deepFrameBytes] = byte(n)
	if n == 0 {
		return int(frame[0])
	}
	return deep(n-1) + int(frame[n%deepFrameBytes])
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fmt.Fprintf(gt.out, "pid %d\n", os.Getpid())
	if ms, err := strconv.Atoi(os.Getenv("GOAPP_START_DELAY_MS")); err == nil {
		time.Sleep(time.Duration(ms) * time.Millisecond)
	}
	server := &Server{name: "goapp", downstream: os.Getenv("GOAPP_DOWNSTREAM"), client: &http.Client{}}
	switch os.Args[1] {
	case "work":
		if len(os.Args) != 3 {
			usage()
		}
		n, err := strconv.Atoi(os.Args[2])
		if err != nil || n < 0 {
			usage()
		}
		for id := 0; id < n; id++ {
			server.handle(id)
		}
	case "serve":
		serve(server, os.Args[2:])
	case "lookup":
		n, err := strconv.Atoi(os.Args[len(os.Args)-1])
		if len(os.Args) != 3 || err != nil || n < 0 {
			usage()
		}
		lookups(n)
	default:
		usage()
	}
	gtDone()
}

func serve(server *Server, args []string) {
	flags := flag.NewFlagSet("serve", flag.ExitOnError)
	port := flags.Int("port", envInt("GOAPP_PORT", 0), "TCP port on 127.0.0.1; 0 picks a free one")
	flags.Parse(args)
	listener, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, "goapp:", err)
		os.Exit(1)
	}
	fmt.Fprintf(gt.out, "listening port=%d\n", listener.Addr().(*net.TCPAddr).Port)
	httpServer := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.Atoi(r.URL.Query().Get("id"))
		if err != nil || id < 0 {
			http.Error(w, "id must be a number >= 0", http.StatusBadRequest)
			return
		}
		fmt.Fprint(w, server.handle(id))
	})}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		httpServer.Shutdown(context.Background())
	}()
	if err := httpServer.Serve(listener); !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "goapp:", err)
		os.Exit(1)
	}
}

// notFound is the error of a lookup of a name that is not there: a type of its own, as error.type shows it.
type notFound struct{ name string }

func (e *notFound) Error() string { return "not found: " + e.name }

var lookupNames = []string{"alice", "", "bob", "missing", "caf\u00e9 \u2615", strings.Repeat("long", 50)}

// lookup counts a name's bytes times id; an empty name or "missing" is an error.
//
//go:noinline
func lookup(id int, name string) (int, error) {
	if name == "" {
		return -1, errors.New("empty name")
	}
	if name == "missing" {
		return 0, &notFound{name}
	}
	return id * len(name), nil
}

func lookups(n int) {
	for id := 0; id < n; id++ {
		name := lookupNames[id%len(lookupNames)]
		found, err := lookup(id-2, name)
		shown := "-"
		if err != nil {
			shown = err.Error()
		}
		fmt.Fprintf(gt.out, "lookup id=%d name=%x n=%d err=%s\n", id-2, name, found, shown)
	}
}

func envInt(name string, fallback int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return n
	}
	return fallback
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: goapp work N | goapp serve [-port P] | goapp lookup N")
	os.Exit(2)
}
