package lmport

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// Stream is one streaming request: an iterator over its deltas with an explicit error.
//
//	s, err := w.GenerateStream(ctx, llm, "Hello", nil)
//	if err != nil { ... }
//	defer s.Close()
//	for s.Next() {
//		fmt.Print(s.Delta())
//	}
//	if err := s.Err(); err != nil { ... }
//
// Cancelling ctx or calling Close before the end cancels the request in the worker. Deltas are buffered
// without bound, so a slow consumer never stalls the worker's other requests.
type Stream struct {
	w      *Worker
	ctx    context.Context
	method string
	id     uint64 // set by Worker.send before the request is visible to the reader

	mu      sync.Mutex
	queue   []msgpack.RawMessage
	nextSeq int64
	ended   bool
	err     error
	summary map[string]any
	wake    chan struct{} // capacity 1: "something changed"
	endCh   chan struct{} // closed by finish: releases the goroutine waiting for the response
	current map[string]any
	timer   *time.Timer
}

func newStream(w *Worker, ctx context.Context, method string) *Stream {
	return &Stream{w: w, ctx: ctx, method: method, wake: make(chan struct{}, 1), endCh: make(chan struct{})}
}

// start wires the response channel and the client-side deadline once the request is sent.
func (s *Stream) start(done <-chan *message, limit time.Duration) {
	id := s.id
	s.mu.Lock()
	if !s.ended {
		s.timer = time.AfterFunc(limit, func() {
			s.w.cancel(id)
			go s.w.probe()
			s.finish(nil, &Error{Code: "deadline_exceeded", Details: map[string]any{"client_side": true},
				Message: fmt.Sprintf("%s stream got no answer within its deadline + %s grace", s.method, s.w.grace)})
		})
	}
	s.mu.Unlock()
	go func() {
		select {
		case msg := <-done:
			if !msg.OK {
				s.finish(nil, msg.Error.toError())
				return
			}
			var summary map[string]any
			if len(msg.Result) > 0 {
				if err := Decode(msg.Result, &summary); err != nil {
					s.finish(nil, &Error{Code: "protocol_error", Message: "cannot decode stream summary: " + err.Error()})
					return
				}
			}
			s.finish(summary, nil)
		case <-s.ctx.Done():
			s.w.cancel(id)
			s.finish(nil, contextError(s.method, s.ctx.Err()))
		case <-s.endCh: // ended locally (Close, client deadline, bad chunk)
		}
	}()
}

// push is called by the worker's reader for each chunk, in order.
func (s *Stream) push(seq int64, data msgpack.RawMessage) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	if seq != s.nextSeq {
		s.mu.Unlock()
		s.w.cancel(s.id)
		s.finish(nil, &Error{Code: "protocol_error",
			Message: fmt.Sprintf("stream chunk seq %d, expected %d", seq, s.nextSeq)})
		return
	}
	s.nextSeq++
	s.queue = append(s.queue, data)
	s.mu.Unlock()
	s.signal()
}

func (s *Stream) finish(summary map[string]any, err error) {
	s.mu.Lock()
	if !s.ended {
		s.ended, s.summary, s.err = true, summary, err
		if s.timer != nil {
			s.timer.Stop()
		}
		close(s.endCh)
	}
	s.mu.Unlock()
	s.signal()
}

func (s *Stream) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Next waits for the next delta; false once the stream has ended (then see Err).
func (s *Stream) Next() bool {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			raw := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			s.current = nil
			if err := Decode(raw, &s.current); err != nil {
				s.Close()
				s.finish(nil, &Error{Code: "protocol_error", Message: "cannot decode stream chunk: " + err.Error()})
				return false
			}
			return true
		}
		ended := s.ended
		s.mu.Unlock()
		if ended {
			return false
		}
		<-s.wake
	}
}

// Delta is the chunk Next just returned: {index, request_id, outputs: [{index, text, token_ids, ...}], finished}.
func (s *Stream) Delta() map[string]any { return s.current }

// Err is the stream's error once Next has returned false (nil after a normal end).
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Summary is the final response (usage, finish reasons, metrics) once the stream has ended normally.
func (s *Stream) Summary() map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.summary
}

// Close cancels the request if it is still running and drops buffered deltas. Safe to call at any time.
func (s *Stream) Close() {
	s.mu.Lock()
	ended := s.ended
	s.queue = nil
	s.mu.Unlock()
	if !ended {
		s.w.cancel(s.id)
		s.finish(nil, &Error{Code: "cancelled", Message: s.method + " stream closed by the consumer"})
	}
}
