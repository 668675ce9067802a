package lmport

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// Stream is one streaming request: an iterator over its deltas (Chunk) with an explicit error, and its final
// Summary.
//
//	s, err := w.GenerateStream(ctx, llm, "Hello", nil)
//	if err != nil { ... }
//	defer s.Close()
//	for s.Next() {
//		for _, o := range s.Delta().Outputs {
//			fmt.Print(o.Text)
//		}
//	}
//	if err := s.Err(); err != nil { ... }
//	usage := s.Summary().Usage
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
	summary Summary
	wake    chan struct{} // capacity 1: "something changed"
	endCh   chan struct{} // closed by finish: releases the goroutine waiting for the response
	current Chunk
	timer   *time.Timer
	onEnd   func() // run once by finish (a Pool uncounts the call); nil for none
}

func newStream(w *Worker, ctx context.Context, method string, onEnd func()) *Stream {
	return &Stream{w: w, ctx: ctx, method: method, wake: make(chan struct{}, 1), endCh: make(chan struct{}),
		onEnd: onEnd}
}

// start wires the response channel and the client-side deadline once the request is sent.
func (s *Stream) start(done <-chan *message, limit time.Duration) {
	id := s.id
	s.mu.Lock()
	if !s.ended {
		s.timer = time.AfterFunc(limit, func() {
			s.w.cancel(id)
			go s.w.probe()
			s.finish(Summary{}, &Error{Code: "deadline_exceeded", Details: map[string]any{"client_side": true},
				Message: fmt.Sprintf("%s stream got no answer within its deadline + %s grace", s.method, s.w.grace)})
		})
	}
	s.mu.Unlock()
	go func() {
		select {
		case msg := <-done:
			if !msg.OK {
				s.finish(Summary{}, msg.Error.toError())
				return
			}
			var summary Summary
			if len(msg.Result) > 0 {
				if err := decodeResult(s.method+" stream summary", msg.Result, &summary); err != nil {
					s.finish(Summary{}, err)
					return
				}
			}
			s.finish(summary, nil)
		case <-s.ctx.Done():
			s.w.cancel(id)
			s.finish(Summary{}, contextError(s.method, s.ctx.Err()))
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
		s.finish(Summary{}, &Error{Code: "protocol_error",
			Message: fmt.Sprintf("stream chunk seq %d, expected %d", seq, s.nextSeq)})
		return
	}
	s.nextSeq++
	s.queue = append(s.queue, data)
	s.mu.Unlock()
	s.signal()
}

func (s *Stream) finish(summary Summary, err error) {
	s.mu.Lock()
	first := !s.ended
	if first {
		s.ended, s.summary, s.err = true, summary, err
		if s.timer != nil {
			s.timer.Stop()
		}
		close(s.endCh)
	}
	s.mu.Unlock()
	s.signal()
	if first && s.onEnd != nil {
		s.onEnd()
	}
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
			var chunk Chunk
			if err := decodeResult(s.method+" stream chunk", raw, &chunk); err != nil {
				// end with the decode error (then Close only drops what is buffered), and cancel the request
				s.w.cancel(s.id)
				s.finish(Summary{}, err)
				s.Close()
				s.current = Chunk{}
				return false
			}
			s.current = chunk
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

// Delta is the chunk Next just moved to: the request (Index, RequestID) and the completions that advanced
// (Outputs: their new Text and TokenIDs, FinishReason in a completion's last chunk), Finished in its last chunk.
func (s *Stream) Delta() Chunk { return s.current }

// Err is the stream's error once Next has returned false (nil after a normal end).
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Summary is the final response (Usage, and per request its finish reasons and Metrics) once the stream has
// ended normally; the zero Summary before that or after an error.
func (s *Stream) Summary() Summary {
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
		s.finish(Summary{}, &Error{Code: "cancelled", Message: s.method + " stream closed by the consumer"})
	}
}
