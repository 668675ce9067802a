package lmport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// ProtocolVersion is the major version of the wire protocol this client speaks.
const ProtocolVersion = 1

// Options configure Start. The zero value works inside a project with a .venv.
type Options struct {
	Python       string        // interpreter; default: LMPORT_PYTHON, then the nearest project .venv/bin/python
	Args         []string      // extra arguments for `python -m lmport.bridge.worker` (e.g. "--debug")
	Env          []string      // environment of the worker; nil means this process's
	Dir          string        // working directory of the worker; empty means this process's
	Stderr       io.Writer     // the worker's logs; nil means os.Stderr
	StartTimeout time.Duration // how long to wait for the worker's hello; default 120s (the first start imports torch)
	// Grace is added to a call's deadline before the client gives up on the worker, allowed between shutdown
	// and killing the process group in Close, and the longest a write to the worker's stdin may make no progress
	// before the worker counts as wedged (it stopped reading) and is killed. Default 5s.
	Grace time.Duration
	// MaxFrameBytes is the largest frame accepted from the worker. Default: any (2^32 - 1).
	MaxFrameBytes uint32
}

// Hello is the worker's first frame.
type Hello struct {
	Protocol        int              `msgpack:"protocol"`
	Server          string           `msgpack:"server"`
	Version         string           `msgpack:"version"`
	PID             int              `msgpack:"pid"`
	PGID            int              `msgpack:"pgid"`
	MaxFrameBytes   int64            `msgpack:"max_frame_bytes"`
	MaxInflight     int64            `msgpack:"max_inflight"`
	Methods         []string         `msgpack:"methods"`
	TimeoutProfiles map[string]int64 `msgpack:"timeout_profiles"`
}

// CallOption adjusts one call.
type CallOption func(*callSettings)

type callSettings struct {
	timeout time.Duration
	profile string
}

// WithTimeout sets the request's deadline (sent as timeout_ms; the worker aborts the request when it passes).
// A context deadline does the same; the earlier of the two wins.
func WithTimeout(d time.Duration) CallOption { return func(s *callSettings) { s.timeout = d } }

// WithTimeoutProfile picks a named deadline from the worker's profiles ("default", "streaming",
// "ml_inference", "batch_job") instead of the method's own.
func WithTimeoutProfile(name string) CallOption { return func(s *callSettings) { s.profile = name } }

// Ptr returns a pointer to v, for the optional fields of the generated option structs.
func Ptr[T any](v T) *T { return &v }

// Handle is a map the worker returned for a resource (for example from LLM); pass it back as is.
type Handle map[string]any

// Ref is the handle's reference string.
func (h Handle) Ref() string {
	ref, _ := h["ref"].(string)
	return ref
}

// HandleRef builds a handle from a bare ref string.
func HandleRef(ref string) Handle { return Handle{"ref": ref} }

// message is any worker -> host frame; unknown keys are ignored.
type message struct {
	Type   string             `msgpack:"type"`
	ID     any                `msgpack:"id"`
	OK     bool               `msgpack:"ok"`
	Result msgpack.RawMessage `msgpack:"result"`
	Error  *wireError         `msgpack:"error"`
	Seq    int64              `msgpack:"seq"`
	Data   msgpack.RawMessage `msgpack:"data"`
	Name   string             `msgpack:"name"`
}

// request is a `request` or `cancel` message; fields in sorted key order, so frames match the vectors.
type request struct {
	ID             uint64         `msgpack:"id"`
	Method         string         `msgpack:"method,omitempty"`
	Params         map[string]any `msgpack:"params,omitempty"`
	Stream         bool           `msgpack:"stream,omitempty"`
	TimeoutMS      int64          `msgpack:"timeout_ms,omitempty"`
	TimeoutProfile string         `msgpack:"timeout_profile,omitempty"`
	Type           string         `msgpack:"type"`
}

// pending is one request awaiting its response; stream is set for streaming requests.
type pending struct {
	done   chan *message // buffered 1: the reader never blocks on a caller
	stream *Stream
}

const (
	stateReady = iota
	stateClosing
	stateExited
)

// API has one method per worker method (generated from the manifest into generated_api.go). Worker and Pool
// embed it, so both offer the same typed methods; code can take either as an API value.
type API struct{ c caller }

// caller sends the generated methods' requests: Worker to its process, Pool to one of its workers.
type caller interface {
	invoke(ctx context.Context, method, profile string, params map[string]any, out any, opts []CallOption) error
	invokeStream(ctx context.Context, method string, params map[string]any, opts []CallOption) (*Stream, error)
}

// Worker is a running lmport worker. All methods are safe for concurrent use; requests from every goroutine
// are multiplexed over the worker's stdin/stdout and batched by its engine.
type Worker struct {
	API
	hello    Hello
	cmd      *exec.Cmd
	stdin    *os.File // our own pipe (not exec's StdinPipe), so that writes can have a deadline
	grace    time.Duration
	profiles map[string]int64

	writeMu sync.Mutex // one frame at a time on stdin

	mu      sync.Mutex
	pending map[uint64]*pending
	nextID  uint64
	state   int
	exitErr *Error

	exited    chan struct{} // closed once the process has been reaped and every pending call failed
	closeOnce sync.Once
	events    chan Event // sent to by the reader only; closed by it once the worker has exited
}

// Event is an `event` frame from the worker (model_loaded, shutting_down, protocol_error, ...).
type Event struct {
	Name string
	Data any
}

// Start launches `python -m lmport.bridge.worker` in its own process group and waits for its hello. ctx bounds the
// start only; the worker lives until Close (or until this process exits: the worker watches its parent).
func Start(ctx context.Context, opts Options) (*Worker, error) {
	python, root, err := findPython(opts.Python)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(python, append([]string{"-m", "lmport.bridge.worker"}, opts.Args...)...)
	cmd.Dir = opts.Dir
	cmd.Env = append([]string(nil), opts.Env...) // a copy: pools start workers in parallel from one Options
	if opts.Env == nil {
		cmd.Env = os.Environ()
	}
	if root != "" { // the last PYTHONPATH entry wins in exec
		cmd.Env = append(cmd.Env, "PYTHONPATH="+strings.Trim(root+":"+lookupEnv(cmd.Env, "PYTHONPATH"), ":"))
	}
	cmd.Stderr = opts.Stderr
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // Close kills the whole group
	stdinR, stdin, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdin = stdinR // an *os.File: the worker gets it as is, with no copying goroutine
	stdout, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
		if err != nil {
			err = &Error{Code: "spawn_failed", Message: "cannot start the worker: " + err.Error(), cause: err}
		}
	}
	_ = stdinR.Close() // the worker's end
	if err != nil {
		_ = stdin.Close()
		return nil, err
	}
	w := &Worker{cmd: cmd, stdin: stdin, grace: orDefault(opts.Grace, 5*time.Second),
		pending: map[uint64]*pending{}, exited: make(chan struct{}), events: make(chan Event, 64)}
	w.API = API{c: w}
	maxFrame := opts.MaxFrameBytes
	if maxFrame == 0 {
		maxFrame = math.MaxUint32 // worker -> host frames have no limit beyond the 32-bit length
	}
	helloCh := make(chan error, 1)
	go w.readLoop(stdout, maxFrame, helloCh)

	timer := time.NewTimer(orDefault(opts.StartTimeout, 120*time.Second))
	defer timer.Stop()
	select {
	case err = <-helloCh:
	case <-timer.C:
		err = &Error{Code: "spawn_failed", Message: "worker sent no hello in time"}
	case <-ctx.Done():
		err = contextError("start", ctx.Err())
	}
	if err != nil {
		w.kill()
		<-w.exited
		return nil, err
	}
	return w, nil
}

func lookupEnv(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if strings.HasPrefix(env[i], key+"=") {
			return env[i][len(key)+1:]
		}
	}
	return ""
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// Hello is the worker's hello frame: version, pid, pgid, limits, methods, timeout profiles.
func (w *Worker) Hello() Hello { return w.hello }

// PGID is the worker's process group.
func (w *Worker) PGID() int { return w.cmd.Process.Pid } // Setpgid: the group is named after the worker's pid

// Events delivers the worker's event frames; events are dropped when nobody reads and the buffer is full. The
// channel is closed once the worker has exited (after its last event), so `for ev := range w.Events()` ends.
func (w *Worker) Events() <-chan Event { return w.events }

// Done is closed once the worker process has exited.
func (w *Worker) Done() <-chan struct{} { return w.exited }

// Call calls any worker method by name, decoding the result into out (a pointer, or nil to discard it).
// The generated methods are typed shortcuts for it. Without a timeout option the client-side deadline follows the
// method's own timeout profile from the manifest (generate: "ml_inference"), as the worker's does.
func (w *Worker) Call(ctx context.Context, method string, params map[string]any, out any, opts ...CallOption) error {
	return w.invoke(ctx, method, methodProfile(method), params, out, opts)
}

// methodProfile is the method's own timeout profile (generated from the manifest); "default" for one it lacks.
func methodProfile(method string) string {
	if profile, ok := methodProfiles[method]; ok {
		return profile
	}
	return "default"
}

// CallStream starts a streaming call of any method by name; the Stream decodes its deltas as Chunk and its final
// response as Summary, the shapes of the streaming methods (generate, chat).
func (w *Worker) CallStream(ctx context.Context, method string, params map[string]any,
	opts ...CallOption) (*Stream, error) {
	return w.invokeStream(ctx, method, params, opts)
}

// invoke is the unary path of every generated method.
func (w *Worker) invoke(ctx context.Context, method, profile string, params map[string]any, out any,
	opts []CallOption) error {
	p := &pending{done: make(chan *message, 1)}
	id, limit, err := w.send(ctx, method, profile, params, p, opts)
	if err != nil {
		return err
	}
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case msg := <-p.done:
		if !msg.OK {
			return msg.Error.toError()
		}
		if out == nil || len(msg.Result) == 0 {
			return nil
		}
		if err := decodeResult(method+" result", msg.Result, out); err != nil {
			return err
		}
		return nil
	case <-ctx.Done():
		w.cancel(id)
		return contextError(method, ctx.Err())
	case <-timer.C:
		w.cancel(id)
		go w.probe()
		return &Error{Code: "deadline_exceeded", Details: map[string]any{"client_side": true},
			Message: fmt.Sprintf("%s got no answer within its deadline + %s grace", method, w.grace)}
	}
}

func (w *Worker) invokeStream(ctx context.Context, method string, params map[string]any,
	opts []CallOption) (*Stream, error) {
	return w.startStream(ctx, method, params, opts, nil)
}

// startStream sends a streaming request; onEnd (if not nil) runs once when the stream ends, however it ends.
func (w *Worker) startStream(ctx context.Context, method string, params map[string]any, opts []CallOption,
	onEnd func()) (*Stream, error) {
	s := newStream(w, ctx, method, onEnd)
	p := &pending{done: make(chan *message, 1), stream: s}
	_, limit, err := w.send(ctx, method, "streaming", params, p, opts)
	if err != nil {
		return nil, err
	}
	s.start(p.done, limit)
	return s, nil
}

// send registers the request and writes it; it returns the id and the client-side limit (deadline + grace).
func (w *Worker) send(ctx context.Context, method, profile string, params map[string]any, p *pending,
	opts []CallOption) (uint64, time.Duration, error) {
	var settings callSettings
	for _, opt := range opts {
		opt(&settings)
	}
	if err := ctx.Err(); err != nil {
		return 0, 0, contextError(method, err)
	}
	req := request{Type: "request", Method: method, Params: params, TimeoutProfile: settings.profile,
		Stream: p.stream != nil}
	budget := settings.timeout
	if dl, ok := ctx.Deadline(); ok && (budget == 0 || time.Until(dl) < budget) {
		budget = time.Until(dl)
	}
	if budget > 0 {
		req.TimeoutMS = max64(budget.Milliseconds(), 1)
	} else {
		if settings.profile != "" {
			profile = settings.profile
		}
		budget = time.Duration(w.profileMS(profile)) * time.Millisecond
	}

	w.mu.Lock()
	if w.state != stateReady {
		err := w.unavailable(method)
		w.mu.Unlock()
		return 0, 0, notSent(err)
	}
	w.nextID++
	req.ID = w.nextID
	if p.stream != nil {
		p.stream.id = req.ID // before the reader can see p: its chunks may arrive before send returns
	}
	w.pending[req.ID] = p
	w.mu.Unlock()

	if err := w.write(&req); err != nil {
		w.settle(req.ID)
		e, ok := err.(*Error)
		if !ok {
			return 0, 0, &Error{Code: "invalid_params", Message: fmt.Sprintf("cannot encode %s parameters: %v", method, err)}
		}
		w.mu.Lock()
		if w.state != stateReady { // Close (or the worker's exit) won the race: stdin was closed under the write
			e = w.unavailable(method)
		}
		w.mu.Unlock()
		return 0, 0, notSent(e)
	}
	return req.ID, budget + w.grace, nil
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

func (w *Worker) profileMS(profile string) int64 {
	if ms, ok := w.profiles[profile]; ok {
		return ms
	}
	return w.profiles["default"]
}

// ready reports whether a call now would be written to the worker (it is neither closing nor gone).
func (w *Worker) ready() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.state == stateReady
}

func (w *Worker) unavailable(method string) *Error {
	if w.state == stateExited && w.exitErr != nil {
		return w.exitErr
	}
	return &Error{Code: "shutting_down", Retryable: true, Message: "worker is closed; cannot call " + method}
}

// writeChunk is how much of a frame one write may take before its no-progress deadline is renewed.
const writeChunk = 1 << 20

// write sends one frame. A worker that stops reading its stdin (stopped, wedged) would block it, and with it every
// caller, the probe and Close, once the pipe is full: a write that makes no progress for the grace kills the
// worker's group instead (that fails every pending call, and every blocked write with EPIPE).
func (w *Worker) write(msg any) error {
	frame, err := EncodeFrame(msg)
	if err != nil {
		return err
	}
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	for len(frame) > 0 {
		chunk := frame
		if len(chunk) > writeChunk {
			chunk = chunk[:writeChunk]
		}
		_ = w.stdin.SetWriteDeadline(time.Now().Add(w.grace))
		n, err := w.stdin.Write(chunk)
		frame = frame[n:]
		if errors.Is(err, os.ErrDeadlineExceeded) {
			message := fmt.Sprintf("worker stopped reading its input (a write made no progress for %s); killed it",
				w.grace)
			w.mu.Lock()
			if w.state == stateReady && w.exitErr == nil {
				w.exitErr = &Error{Code: "worker_exited", Message: message}
			}
			w.mu.Unlock()
			w.kill()
			return &Error{Code: "worker_exited", Message: message, cause: err}
		}
		if err != nil {
			return &Error{Code: "worker_exited", Message: "cannot write to the worker: " + err.Error(), cause: err}
		}
	}
	return nil
}

// settle removes a pending request; nil if it was already answered or cancelled.
func (w *Worker) settle(id uint64) *pending {
	w.mu.Lock()
	defer w.mu.Unlock()
	p := w.pending[id]
	delete(w.pending, id)
	return p
}

// cancel drops a request locally and tells the worker to stop working on it (cancel is idempotent).
func (w *Worker) cancel(id uint64) {
	if w.settle(id) == nil {
		return
	}
	w.mu.Lock()
	alive := w.state != stateExited
	w.mu.Unlock()
	if alive { // in a goroutine: the caller may be the reader (a stream's bad chunk), which must never wait on stdin
		go func() { _ = w.write(&request{Type: "cancel", ID: id}) }()
	}
}

// probe runs after a client-side deadline: a worker that no longer answers ping is killed, which fails every
// pending call instead of leaving them to their own deadlines.
func (w *Worker) probe() {
	ctx, cancel := context.WithTimeout(context.Background(), w.grace)
	defer cancel()
	err := w.invoke(ctx, "ping", "default", map[string]any{}, nil, nil)
	if err != nil && HasCode(err, "deadline_exceeded") {
		w.setExitErr(&Error{Code: "worker_exited", Message: "worker stopped answering (ping timed out); killed it"})
		w.signalGroup(syscall.SIGTERM)
		if !w.waitExit(w.grace) {
			w.kill()
		}
	}
}

func (w *Worker) readLoop(stdout io.Reader, maxFrame uint32, helloCh chan<- error) {
	err := w.readHello(stdout, maxFrame)
	helloCh <- err
	if err == nil {
		for {
			body, err := ReadFrame(stdout, maxFrame)
			if err != nil {
				if e, ok := err.(*Error); ok {
					w.setExitErr(e)
					w.kill()
				}
				break
			}
			var msg message
			if err := Decode(body, &msg); err != nil {
				w.setExitErr(&Error{Code: "protocol_error", Message: "unreadable frame from the worker: " + err.Error()})
				w.kill()
				break
			}
			w.dispatch(&msg)
		}
	}
	// Wait also waits for exec's copy of the worker's stderr (when Options.Stderr is not an *os.File), which lasts
	// as long as anything in the group holds that pipe: if the worker is gone and a child of it is not, sweep the
	// group after the grace so that Wait, and every pending call, cannot hang on it.
	sweep := time.AfterFunc(w.grace, w.sweep)
	_, _ = io.Copy(io.Discard, stdout) // drain so Wait can return
	waitErr := w.cmd.Wait()
	sweep.Stop()
	_ = w.stdin.Close() // fails any write still blocked; exec closes only the pipes it made
	w.mu.Lock()
	if w.exitErr == nil {
		if w.state == stateClosing {
			w.exitErr = &Error{Code: "shutting_down", Retryable: true, Message: "worker was closed"}
		} else {
			w.exitErr = &Error{Code: "worker_exited", Message: describeExit(waitErr),
				Details: map[string]any{"exit_code": w.cmd.ProcessState.ExitCode()}}
		}
	}
	w.state = stateExited
	failed := w.pending
	w.pending = map[uint64]*pending{}
	exitErr := w.exitErr
	w.mu.Unlock()
	for _, p := range failed {
		p.done <- &message{Error: &wireError{Code: exitErr.Code, Message: exitErr.Message, Details: exitErr.Details,
			Retryable: exitErr.Retryable}}
	}
	w.sweep()
	close(w.events) // the reader is the only sender, and it is done
	close(w.exited)
}

func (w *Worker) setExitErr(e *Error) {
	w.mu.Lock()
	if w.exitErr == nil {
		w.exitErr = e
	}
	w.mu.Unlock()
}

func describeExit(err error) string {
	if err == nil {
		return "lmport worker exited with code 0"
	}
	return "lmport worker " + err.Error()
}

func (w *Worker) readHello(stdout io.Reader, maxFrame uint32) error {
	body, err := ReadFrame(stdout, maxFrame)
	if err != nil {
		return &Error{Code: "spawn_failed", Message: "worker exited before its hello: " + err.Error()}
	}
	var head message
	if err := Decode(body, &head); err != nil || head.Type != "hello" {
		return &Error{Code: "protocol_error", Message: "the worker's first frame is not a hello"}
	}
	if err := Decode(body, &w.hello); err != nil {
		return &Error{Code: "protocol_error", Message: "unreadable hello: " + err.Error()}
	}
	if w.hello.Protocol != ProtocolVersion {
		return &Error{Code: "protocol_mismatch", Message: fmt.Sprintf("worker speaks protocol %d; this client speaks %d",
			w.hello.Protocol, ProtocolVersion)}
	}
	w.profiles = w.hello.TimeoutProfiles
	if w.profiles["default"] == 0 { // a hello without profiles: the manifest's defaults (a copy: the caller may edit those)
		w.profiles = make(map[string]int64, len(DefaultTimeoutProfiles))
		for name, ms := range DefaultTimeoutProfiles {
			w.profiles[name] = ms
		}
	}
	return nil
}

func (w *Worker) dispatch(msg *message) {
	switch msg.Type {
	case "response":
		if p := w.settle(idOf(msg.ID)); p != nil {
			p.done <- msg
		}
	case "chunk":
		w.mu.Lock()
		p := w.pending[idOf(msg.ID)]
		w.mu.Unlock()
		if p != nil && p.stream != nil {
			p.stream.push(msg.Seq, msg.Data)
		}
	case "event":
		var data any
		_ = Decode(msg.Data, &data)
		select {
		case w.events <- Event{Name: msg.Name, Data: data}:
		default:
		}
	}
}

// idOf reads a response id; this client only sends unsigned integer ids.
func idOf(v any) uint64 {
	switch n := v.(type) {
	case int64:
		if n > 0 {
			return uint64(n)
		}
	case uint64:
		return n
	}
	return 0
}

// Close stops the worker: a shutdown request, up to Grace for it to exit, then SIGTERM and SIGKILL to its
// process group. Pending calls fail with shutting_down. Safe to call more than once and concurrently.
func (w *Worker) Close() error {
	w.closeOnce.Do(func() {
		w.mu.Lock()
		ready := w.state == stateReady
		if ready {
			w.state = stateClosing
		}
		w.nextID++
		id := w.nextID
		w.mu.Unlock()
		go func() { // not in line: a wedged worker would block the write, and the signals below must always run
			if ready {
				_ = w.write(&request{Type: "request", ID: id, Method: "shutdown", Params: map[string]any{}})
			}
			_ = w.stdin.Close()
		}()
		if !w.waitExit(w.grace) {
			w.signalGroup(syscall.SIGTERM)
			if !w.waitExit(minDuration(w.grace, 2*time.Second)) {
				w.kill()
			}
		}
		<-w.exited
	})
	return nil
}

func minDuration(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

func (w *Worker) waitExit(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-w.exited:
		return true
	case <-timer.C:
		return false
	}
}

func (w *Worker) signalGroup(sig syscall.Signal) {
	if w.PGID() <= 1 { // never true after a successful Start; -1 or 1 would signal far more than the worker
		return
	}
	err := syscall.Kill(-w.PGID(), sig)
	if err != nil && !errors.Is(err, syscall.ESRCH) {
		_ = w.cmd.Process.Signal(sig)
	}
}

// kill ends the whole process group at once.
func (w *Worker) kill() { w.signalGroup(syscall.SIGKILL) }

// sweep kills whatever the leader left behind in its group once it has exited.
func (w *Worker) sweep() { w.kill() }
