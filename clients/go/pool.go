package lmport

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// PoolOptions configure StartPool: Options for every worker, plus how crashed workers come back.
type PoolOptions struct {
	Options
	// NoRestart leaves a worker that exits unexpectedly down (by default it is restarted).
	NoRestart bool
	// RestartDelay is the wait before restarting a worker; it doubles after each failed start, up to 30s.
	// Default 500ms.
	RestartDelay time.Duration
}

const maxRestartDelay = 30 * time.Second

// Pool is several workers behind the same methods as Worker (both embed API). A call goes to the ready worker
// with the fewest calls in flight. A call the worker never admitted (not written because the worker was gone,
// answered overloaded, or shutting_down before any engine work) is sent to another worker; one that was written
// to a worker that then dies fails with worker_exited and is never replayed. A worker that exits unexpectedly is
// restarted while the others serve. Handles from LLM belong to the pool: each worker loads the model behind a
// handle once (every running worker at LLM time, a restarted one on its first call) and the pool maps the
// handle to that worker's own ref. All methods are safe for concurrent use; Close stops every worker.
type Pool struct {
	API
	opts PoolOptions

	mu         sync.Mutex
	slots      []*slot
	handles    map[string]map[string]any // pool ref -> the llm parameters behind it
	nextHandle int
	nextSlot   int           // where the least-loaded search starts, so ties rotate
	changed    chan struct{} // closed (and replaced) whenever a worker comes or goes
	closed     bool
	restarts   int

	done      chan struct{} // closed by Close: stops the restart loops
	watchers  sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// slot is one place in the pool: the worker living there now and what it has loaded.
type slot struct {
	index    int
	worker   *Worker
	inflight int
	refs     map[string]*workerRef // pool ref -> this worker's ref; replaced with the worker
}

// workerRef is one worker's ref for a pool handle, once its llm call has answered.
type workerRef struct {
	loaded chan struct{}
	ref    string
	handle Handle
	err    error
}

// StartPool starts n workers in parallel and returns once all of them sent their hello; if one cannot start,
// the others are closed and its error is returned.
func StartPool(ctx context.Context, n int, opts PoolOptions) (*Pool, error) {
	if n < 1 {
		return nil, invalidParam("n", "must be >= 1, got %d", n)
	}
	if opts.RestartDelay <= 0 {
		opts.RestartDelay = 500 * time.Millisecond
	}
	p := &Pool{opts: opts, handles: map[string]map[string]any{}, changed: make(chan struct{}),
		done: make(chan struct{})}
	p.API = API{c: p}
	workers := make([]*Worker, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			workers[i], errs[i] = Start(ctx, opts.Options)
		}(i)
	}
	wg.Wait()
	for i, w := range workers {
		p.slots = append(p.slots, &slot{index: i})
		if w != nil {
			p.attach(p.slots[i], w)
		}
	}
	if err := firstError(errs); err != nil {
		_ = p.Close()
		return nil, err
	}
	return p, nil
}

// Size is the number of worker places (a crashed worker's place counts while it restarts).
func (p *Pool) Size() int { return len(p.slots) }

// Workers are the workers running now, by place; nil where one is restarting.
func (p *Pool) Workers() []*Worker {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*Worker, len(p.slots))
	for i, s := range p.slots {
		out[i] = s.worker
	}
	return out
}

// Restarts counts the workers restarted after an unexpected exit.
func (p *Pool) Restarts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.restarts
}

// Call calls any worker method by name on one worker (see Worker.Call); pool handles among params are mapped.
func (p *Pool) Call(ctx context.Context, method string, params map[string]any, out any, opts ...CallOption) error {
	return p.invoke(ctx, method, methodProfile(method), params, out, opts)
}

// CallStream starts a streaming call of any method by name on one worker (see Worker.CallStream).
func (p *Pool) CallStream(ctx context.Context, method string, params map[string]any,
	opts ...CallOption) (*Stream, error) {
	return p.invokeStream(ctx, method, params, opts)
}

// Close stops every worker (see Worker.Close); later calls fail with shutting_down. Safe to call more than once.
func (p *Pool) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		close(p.done)
		p.broadcast()
		workers := make([]*Worker, 0, len(p.slots))
		for _, s := range p.slots {
			if s.worker != nil {
				workers = append(workers, s.worker)
			}
		}
		p.mu.Unlock()
		errs := make([]error, len(workers))
		var wg sync.WaitGroup
		for i, w := range workers {
			wg.Add(1)
			go func(i int, w *Worker) {
				defer wg.Done()
				errs[i] = w.Close()
			}(i, w)
		}
		wg.Wait()
		p.watchers.Wait()
		p.closeErr = firstError(errs)
	})
	return p.closeErr
}

func (p *Pool) invoke(ctx context.Context, method, profile string, params map[string]any, out any,
	opts []CallOption) error {
	switch method {
	case "llm":
		return p.llm(ctx, params, out, opts)
	case "release":
		return p.release(ctx, params, out, opts)
	}
	return p.route(ctx, params, func(w *Worker, s *slot, params map[string]any) error {
		defer p.uncount(s)
		return w.invoke(ctx, method, profile, params, out, opts)
	})
}

func (p *Pool) invokeStream(ctx context.Context, method string, params map[string]any,
	opts []CallOption) (*Stream, error) {
	var stream *Stream
	err := p.route(ctx, params, func(w *Worker, s *slot, params map[string]any) error {
		var err error
		stream, err = w.startStream(ctx, method, params, opts, func() { p.uncount(s) })
		if err != nil {
			p.uncount(s)
		}
		return err
	})
	return stream, err
}

// route runs send on the least-loaded ready worker with the pool handles in params mapped to its refs, and on
// another worker while the failure proves the call was never admitted; each worker is tried once. send owns
// the call's count on the slot (it uncounts it when the call ends).
func (p *Pool) route(ctx context.Context, params map[string]any,
	send func(w *Worker, s *slot, params map[string]any) error) error {
	tried := map[*Worker]bool{}
	var lastErr error
	for {
		s, w, refs, err := p.pick(ctx, tried, lastErr)
		if err != nil {
			return err
		}
		tried[w] = true
		local, err := p.localize(ctx, w, refs, params)
		if err != nil {
			p.uncount(s)
			if w.ready() && !notAdmitted(err) { // a bad handle, or a load the worker refused
				return err
			}
			lastErr = err // the worker went away while loading the handle: the call was never sent
			continue
		}
		if err = send(w, s, local); err == nil || !notAdmitted(err) {
			return err
		}
		lastErr = err
	}
}

// pick takes the ready worker with the fewest calls in flight that this call has not tried, and counts the
// call on it; it waits while every untried worker is restarting, and fails with lastErr (or shutting_down)
// when none is left.
func (p *Pool) pick(ctx context.Context, tried map[*Worker]bool,
	lastErr error) (*slot, *Worker, map[string]*workerRef, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, nil, nil, &Error{Code: "shutting_down", Retryable: true, Message: "the pool is closed"}
		}
		var best *slot
		restarting := false
		for k := range p.slots {
			s := p.slots[(p.nextSlot+k)%len(p.slots)]
			if s.worker == nil || !s.worker.ready() {
				restarting = restarting || !p.opts.NoRestart
				continue
			}
			if !tried[s.worker] && (best == nil || s.inflight < best.inflight) {
				best = s
			}
		}
		if best != nil {
			best.inflight++
			p.nextSlot = (best.index + 1) % len(p.slots)
			w, refs := best.worker, best.refs
			p.mu.Unlock()
			return best, w, refs, nil
		}
		changed := p.changed
		p.mu.Unlock()
		if !restarting {
			if lastErr == nil {
				lastErr = &Error{Code: "shutting_down", Retryable: true, Message: "no worker of the pool is running"}
			}
			return nil, nil, nil, lastErr
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, nil, nil, contextError("pool", ctx.Err())
		}
	}
}

func (p *Pool) uncount(s *slot) {
	p.mu.Lock()
	s.inflight--
	p.mu.Unlock()
}

// localize copies params with every pool handle (a Handle value, or a pool ref string) replaced by w's ref for
// it, loading the model on w first if it has not yet. A Handle the pool did not make fails with not_found.
func (p *Pool) localize(ctx context.Context, w *Worker, refs map[string]*workerRef,
	params map[string]any) (map[string]any, error) {
	out := make(map[string]any, len(params))
	for key, value := range params {
		out[key] = value
		poolRef, isHandle := "", false
		switch v := value.(type) {
		case Handle:
			poolRef, isHandle = v.Ref(), true
		case string:
			poolRef = v
		}
		p.mu.Lock()
		handleParams, known := p.handles[poolRef]
		p.mu.Unlock()
		if !known {
			if isHandle {
				return nil, &Error{Code: "not_found", Details: map[string]any{"field": key},
					Message: fmt.Sprintf("%s: %q is not a handle of this pool (use Pool.LLM)", key, poolRef)}
			}
			continue
		}
		r := p.load(w, refs, poolRef, handleParams)
		select {
		case <-r.loaded:
		case <-ctx.Done():
			return nil, contextError("llm", ctx.Err())
		}
		if r.err != nil {
			return nil, r.err
		}
		out[key] = r.ref
	}
	return out, nil
}

// load starts (once per worker and handle) loading a pool handle's model on w. The load does not follow any
// one caller's context: callers share it. A failed load is forgotten, so a later call tries again.
func (p *Pool) load(w *Worker, refs map[string]*workerRef, poolRef string, params map[string]any) *workerRef {
	p.mu.Lock()
	defer p.mu.Unlock()
	if r := refs[poolRef]; r != nil {
		return r
	}
	r := &workerRef{loaded: make(chan struct{})}
	refs[poolRef] = r
	go func() {
		r.err = w.invoke(context.Background(), "llm", methodProfile("llm"), params, &r.handle, nil)
		r.ref = r.handle.Ref()
		if r.err != nil {
			p.mu.Lock()
			if refs[poolRef] == r {
				delete(refs, poolRef)
			}
			p.mu.Unlock()
		}
		close(r.loaded)
	}()
	return r
}

// llm loads the model on every running worker and answers the first worker's handle with the pool's ref.
func (p *Pool) llm(ctx context.Context, params map[string]any, out any, _ []CallOption) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return &Error{Code: "shutting_down", Retryable: true, Message: "the pool is closed"}
	}
	p.nextHandle++
	poolRef := fmt.Sprintf("pool-llm-%d", p.nextHandle)
	p.handles[poolRef] = params
	type running struct {
		w    *Worker
		refs map[string]*workerRef
	}
	var targets []running
	for _, s := range p.slots {
		if s.worker != nil && s.worker.ready() {
			targets = append(targets, running{s.worker, s.refs})
		}
	}
	p.mu.Unlock()
	loads := make([]*workerRef, len(targets))
	for i, t := range targets {
		loads[i] = p.load(t.w, t.refs, poolRef, params)
	}
	var errs []error
	for _, r := range loads {
		select {
		case <-r.loaded:
		case <-ctx.Done():
			return contextError("llm", ctx.Err())
		}
		if r.err != nil {
			errs = append(errs, r.err)
			continue
		}
		handle := Handle{}
		for k, v := range r.handle {
			handle[k] = v
		}
		handle["ref"] = poolRef
		return assign("llm", handle, out)
	}
	p.mu.Lock()
	delete(p.handles, poolRef)
	p.mu.Unlock()
	for _, err := range errs { // a worker that died mid-load says nothing about the parameters
		if !HasCode(err, "worker_exited") {
			return err
		}
	}
	if len(errs) > 0 {
		return errs[0]
	}
	return &Error{Code: "shutting_down", Retryable: true, Message: "no worker of the pool is running"}
}

// release frees a pool handle on every worker that loaded it: {ref, unloaded}.
func (p *Pool) release(ctx context.Context, params map[string]any, out any, opts []CallOption) error {
	poolRef := ""
	switch v := params["ref"].(type) {
	case Handle:
		poolRef = v.Ref()
	case string:
		poolRef = v
	}
	p.mu.Lock()
	_, known := p.handles[poolRef]
	delete(p.handles, poolRef)
	type loadedOn struct {
		w *Worker
		r *workerRef
	}
	var loaded []loadedOn
	for _, s := range p.slots {
		if r := s.refs[poolRef]; r != nil && s.worker != nil {
			loaded = append(loaded, loadedOn{s.worker, r})
			delete(s.refs, poolRef)
		}
	}
	p.mu.Unlock()
	if !known {
		return &Error{Code: "not_found", Details: map[string]any{"field": "ref"},
			Message: fmt.Sprintf("ref: %q is not a handle of this pool", poolRef)}
	}
	unloaded := false
	for _, l := range loaded {
		<-l.r.loaded
		var result map[string]any
		if l.r.err == nil && l.w.invoke(ctx, "release", "default", map[string]any{"ref": l.r.ref}, &result, opts) == nil {
			unloaded = unloaded || result["unloaded"] == true
		}
	}
	return assign("release", map[string]any{"ref": poolRef, "unloaded": unloaded}, out)
}

// assign stores a result the pool built into a caller's out, as if the worker had sent it.
func assign(method string, value any, out any) error {
	if out == nil {
		return nil
	}
	raw, err := msgpack.Marshal(value)
	if err != nil {
		return err
	}
	if e := decodeResult(method+" result", raw, out); e != nil { // a nil *Error must not become a non-nil error
		return e
	}
	return nil
}

// attach makes w the worker of s and watches it: an unexpected exit empties the place and restarts it. It fails
// (and closes w) once the pool is closed, so Close never misses a worker.
func (p *Pool) attach(s *slot, w *Worker) bool {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		_ = w.Close()
		return false
	}
	s.worker, s.refs = w, map[string]*workerRef{}
	p.broadcast()
	p.watchers.Add(1) // under p.mu, ordered before Close's Wait
	p.mu.Unlock()
	go func() {
		defer p.watchers.Done()
		select {
		case <-w.Done():
		case <-p.done:
			return
		}
		p.mu.Lock()
		s.worker, s.refs = nil, nil
		p.broadcast()
		p.mu.Unlock()
		if !p.opts.NoRestart {
			p.restart(s)
		}
	}()
	return true
}

// restart starts a new worker for s, retrying with a doubling delay until it starts or the pool closes.
func (p *Pool) restart(s *slot) {
	for delay := p.opts.RestartDelay; ; delay = minDuration(2*delay, maxRestartDelay) {
		select {
		case <-time.After(delay):
		case <-p.done:
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-p.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		w, err := Start(ctx, p.opts.Options)
		cancel()
		if err != nil {
			continue
		}
		if p.attach(s, w) {
			p.mu.Lock()
			p.restarts++
			p.mu.Unlock()
		}
		return
	}
}

// broadcast wakes every call waiting for a worker; p.mu is held.
func (p *Pool) broadcast() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// notAdmitted reports whether err proves the worker never started the call: it was not written (the worker was
// gone), or the answer was overloaded, or shutting_down without engine usage (a generation the shutdown aborted
// carries details.usage and counts as started).
func notAdmitted(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	_, hadUsage := e.Details["usage"]
	return e.notSent || e.Code == "overloaded" || (e.Code == "shutting_down" && !hadUsage)
}

// firstError is the first non-nil error of errs (go.mod targets Go 1.19, before errors.Join).
func firstError(errs []error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
