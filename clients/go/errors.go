package lmport

import (
	"context"
	"errors"
	"fmt"
)

// Error is every failure a call reports. Code is one of the protocol's codes (invalid_request,
// method_not_found, invalid_params, unsupported, not_found, cancelled, deadline_exceeded, overloaded, out_of_memory,
// engine_error, shutting_down, internal) or one of the client's own: worker_exited (the worker process ended,
// or was killed for not answering, while the call was pending), protocol_mismatch (the hello announced another
// major version), protocol_error (an unreadable frame from the worker) and spawn_failed (no Python, no hello).
type Error struct {
	Code       string
	Message    string
	Retryable  bool
	Details    map[string]any
	PythonType string // Python exception class, when the worker reported one
	Traceback  string // only when the worker runs with --debug
	cause      error  // context.Canceled / context.DeadlineExceeded for context-driven failures
	notSent    bool   // the request was never written to the worker (a Pool may send it to another)
}

func (e *Error) Error() string { return fmt.Sprintf("lmport %s: %s", e.Code, e.Message) }

// Unwrap lets errors.Is(err, context.Canceled) and errors.Is(err, context.DeadlineExceeded) work for the
// cancelled and deadline_exceeded codes, whoever raised them.
func (e *Error) Unwrap() error { return e.cause }

// HasCode reports whether err is an *Error with the given code.
func HasCode(err error, code string) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}

// wireError is the `error` map of a response frame.
type wireError struct {
	Code       string         `msgpack:"code"`
	Message    string         `msgpack:"message"`
	Retryable  bool           `msgpack:"retryable"`
	Details    map[string]any `msgpack:"details"`
	PythonType string         `msgpack:"python_type"`
	Traceback  string         `msgpack:"traceback"`
}

func (w *wireError) toError() *Error {
	if w == nil {
		return &Error{Code: "internal", Message: "worker returned a failed response without an error"}
	}
	return &Error{Code: w.Code, Message: w.Message, Retryable: w.Retryable, Details: w.Details,
		PythonType: w.PythonType, Traceback: w.Traceback, cause: contextCause[w.Code]}
}

// contextCause makes the worker's cancelled / deadline_exceeded answers match errors.Is with the context
// errors too, like the client's own.
var contextCause = map[string]error{"cancelled": context.Canceled, "deadline_exceeded": context.DeadlineExceeded}

func contextError(method string, err error) *Error {
	if errors.Is(err, context.DeadlineExceeded) {
		return &Error{Code: "deadline_exceeded", Message: method + ": context deadline exceeded", cause: err}
	}
	return &Error{Code: "cancelled", Message: method + ": context cancelled", cause: err}
}

// notSent returns a copy of e marked as a request that never reached the worker (e may be shared, as the
// worker's exit error is).
func notSent(e *Error) *Error {
	c := *e
	c.notSent = true
	return &c
}

// invalidParam is the local twin of the worker's invalid_params answer.
func invalidParam(field, format string, args ...any) *Error {
	return &Error{Code: "invalid_params", Message: field + ": " + fmt.Sprintf(format, args...),
		Details: map[string]any{"field": field}}
}
