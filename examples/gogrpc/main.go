// gogrpc is the gRPC-Go server the tests trace: one unary method, demo.Greeter/SayHello, on raw
// bytes (no generated code), served as gRPC-Go serves every stream: on a goroutine of its own. The
// handler calls greet, which starts a goroutine for lookup and waits for it.
//
//	gogrpc    serves on 127.0.0.1 (a free port) until SIGINT/SIGTERM
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

func main() {
	fmt.Printf("pid %d\n", os.Getpid())
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "gogrpc:", err)
		os.Exit(1)
	}
	fmt.Printf("listening port=%d\n", listener.Addr().(*net.TCPAddr).Port)
	server := grpc.NewServer(grpc.ForceServerCodec(raw{}))
	server.RegisterService(&greeter, struct{}{})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		server.GracefulStop()
	}()
	if err := server.Serve(listener); err != nil {
		fmt.Fprintln(os.Stderr, "gogrpc:", err)
		os.Exit(1)
	}
}
