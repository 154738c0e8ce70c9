// goh2 is the Go HTTP/2 server the tests trace, each stream served on a goroutine of its own: gRPC-Go
// with one unary method, demo.Greeter/SayHello, on raw bytes (no generated code), or net/http over h2c
// (prior knowledge) where GET /?body=B answers greet(B). Either way the handler calls greet, which
// starts a goroutine for lookup and waits for it.
//
//	goh2 grpc    gRPC on 127.0.0.1 (a free port) until SIGINT/SIGTERM
//	goh2 h2c     net/http's unencrypted HTTP/2 the same way: status 404 for "missing", 500 for "crash"
//
// stdout: `pid N`, `listening port=P`, then per call `greet body=B start=NS end=NS` and
// `lookup body=B start=NS end=NS` (CLOCK_REALTIME inside the function). A body "missing" answers
// NOT_FOUND, "crash" UNKNOWN, one starting with "slow" takes 200 ms.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var out sync.Mutex

func report(fn, body string, start int64) {
	end := time.Now().UnixNano()
	out.Lock()
	defer out.Unlock()
	fmt.Printf("%s body=%s start=%d end=%d\n", fn, body, start, end)
}

//go:noinline
func greet(body string) (string, error) {
	defer report("greet", body, time.Now().UnixNano())
	var found string
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		found = lookup(body)
	}()
	wg.Wait()
	switch {
	case body == "missing":
		return "", status.Error(codes.NotFound, "no such greeting")
	case body == "crash":
		return "", errors.New("boom")
	case strings.HasPrefix(body, "slow"):
		time.Sleep(200 * time.Millisecond)
	}
	return found, nil
}

//go:noinline
func lookup(body string) string {
	defer report("lookup", body, time.Now().UnixNano())
	return "hello " + body
}

// raw passes messages through as bytes: a client sends any body, without generated code.
type raw struct{}

func (raw) Marshal(v any) ([]byte, error)      { return *v.(*[]byte), nil }
func (raw) Unmarshal(data []byte, v any) error { *v.(*[]byte) = append([]byte(nil), data...); return nil }
func (raw) Name() string                       { return "proto" }

func sayHello(_ any, _ context.Context, decode func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	var body []byte
	if err := decode(&body); err != nil {
		return nil, err
	}
	reply, err := greet(string(body))
	if err != nil {
		return nil, err
	}
	answer := []byte(reply)
	return &answer, nil
}

var greeter = grpc.ServiceDesc{
	ServiceName: "demo.Greeter",
	HandlerType: (*any)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "SayHello", Handler: sayHello}},
}

// answer serves GET /?body=B over HTTP/2.
func answer(w http.ResponseWriter, r *http.Request) {
	reply, err := greet(r.URL.Query().Get("body"))
	switch {
	case status.Code(err) == codes.NotFound:
		http.Error(w, err.Error(), http.StatusNotFound)
	case err != nil:
		http.Error(w, err.Error(), http.StatusInternalServerError)
	default:
		fmt.Fprint(w, reply)
	}
}

func main() {
	if len(os.Args) != 2 || os.Args[1] != "grpc" && os.Args[1] != "h2c" {
		fmt.Fprintln(os.Stderr, "usage: goh2 grpc | goh2 h2c")
		os.Exit(2)
	}
	fmt.Printf("pid %d\n", os.Getpid())
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "goh2:", err)
		os.Exit(1)
	}
	fmt.Printf("listening port=%d\n", listener.Addr().(*net.TCPAddr).Port)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if os.Args[1] == "grpc" {
		server := grpc.NewServer(grpc.ForceServerCodec(raw{}))
		server.RegisterService(&greeter, struct{}{})
		go func() {
			<-ctx.Done()
			server.GracefulStop()
		}()
		err = server.Serve(listener)
	} else {
		server := &http.Server{Handler: http.HandlerFunc(answer), Protocols: new(http.Protocols)}
		server.Protocols.SetUnencryptedHTTP2(true)
		go func() {
			<-ctx.Done()
			server.Shutdown(context.Background())
		}()
		if err = server.Serve(listener); errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "goh2:", err)
		os.Exit(1)
	}
}
