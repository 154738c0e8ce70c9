package main

// Ground truth for the end-to-end tests, in the format of the C examples (tests/ground_truth.py):
//
//	call fn=<name> tid=<goroutine id> seq=<n> parent=<n> start=<ns> end=<ns>
//
// Go has no stable thread per call: the scheduler moves goroutines between threads, so "tid" is
// the goroutine id and seq and parent count calls per goroutine. fn is the name the Go runtime
// gives the function (main.(*Server).handle), the same name the symbol table and pclntab hold.
// start and end are CLOCK_REALTIME ns read inside the function.

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"
)

type gtCall struct {
	fn        string
	goroutine int64
	seq       int
	parent    int
	start     int64
}

type gtGoroutine struct {
	seq   int
	stack []int
}

var gt = struct {
	sync.Mutex
	goroutines map[int64]*gtGoroutine
	calls      int
	out        *os.File
}{goroutines: map[int64]*gtGoroutine{}, out: os.Stdout}

// goroutineID parses "goroutine N [running]:", the first line runtime.Stack prints: the runtime
// does not expose the id otherwise, and this program is the only place that needs it.
func goroutineID() int64 {
	var buf [64]byte
	line := buf[:runtime.Stack(buf[:], false)]
	line = bytes.TrimPrefix(line, []byte("goroutine "))
	id, err := strconv.ParseInt(string(line[:bytes.IndexByte(line, ' ')]), 10, 64)
	if err != nil {
		panic("cannot parse the goroutine id: " + err.Error())
	}
	return id
}

// gtEnter is the first thing a traced function does, as `defer gtExit(gtEnter())`: the argument
// is evaluated at once, the deferred gtExit runs as the function returns.
func gtEnter() *gtCall {
	pc, _, _, _ := runtime.Caller(1)
	call := &gtCall{fn: runtime.FuncForPC(pc).Name(), goroutine: goroutineID()}
	gt.Lock()
	g := gt.goroutines[call.goroutine]
	if g == nil {
		g = &gtGoroutine{}
		gt.goroutines[call.goroutine] = g
	}
	g.seq++
	call.seq = g.seq
	if len(g.stack) > 0 {
		call.parent = g.stack[len(g.stack)-1]
	}
	g.stack = append(g.stack, call.seq)
	gt.Unlock()
	call.start = time.Now().UnixNano()
	return call
}

func gtExit(call *gtCall) {
	end := time.Now().UnixNano()
	gt.Lock()
	defer gt.Unlock()
	g := gt.goroutines[call.goroutine]
	g.stack = g.stack[:len(g.stack)-1]
	gt.calls++
	fmt.Fprintf(gt.out, "call fn=%s tid=%d seq=%d parent=%d start=%d end=%d\n",
		call.fn, call.goroutine, call.seq, call.parent, call.start, end)
}

func gtDone() {
	gt.Lock()
	defer gt.Unlock()
	fmt.Fprintf(gt.out, "done calls=%d\n", gt.calls)
}
