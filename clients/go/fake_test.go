package lmport

// Protocol edge cases against a scripted stand-in for the worker: fast, no model.

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeWorker writes an executable Python script that plays the worker: the scenario runs after the helpers of the
// repo's tests/fake_worker.py (hello, recv, send, send_raw, respond), shared by every client.
// Start runs it as `script -m lmport.bridge.worker`; it ignores its arguments.
func fakeWorker(t *testing.T, scenario string) string {
	t.Helper()
	python, _, err := findPython("")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "worker.py")
	shared, err := filepath.Abs(filepath.Join("..", "..", "tests"))
	if err != nil {
		t.Fatal(err)
	}
	script := "#!" + python + "\nimport sys\nsys.path.insert(0, " + strconv.Quote(shared) + ")\nfrom fake_worker import *\n" + scenario
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRawCallDeadlineFollowsTheMethodsProfile(t *testing.T) {
	// the worker gives generate its ml_inference deadline (10 s); "default" (100 ms) + grace would be too short
	fake := fakeWorker(t, `
hello(timeout_profiles={"default": 100, "streaming": 10000, "ml_inference": 10000, "batch_job": 10000})
request = recv()
time.sleep(0.6)
respond(request, {"method": request["method"], "timeout_profile": request.get("timeout_profile")})
recv()
`)
	ctx := context.Background()
	w, err := Start(ctx, Options{Python: fake, Stderr: io.Discard, Grace: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var out map[string]any
	if err := w.Call(ctx, "generate", map[string]any{}, &out); err != nil {
		t.Fatal(err)
	}
	// answered, and the worker was left to pick the profile (the request names none)
	if out["method"] != "generate" || out["timeout_profile"] != nil {
		t.Fatalf("got %v", out)
	}
	if methodProfile("generate") != "ml_inference" || methodProfile("no_such_method") != "default" {
		t.Fatal("method profiles not from the manifest")
	}
}

// poolWithARefuser starts a pool of two fakes: the first to start answers every request with errMap, the other
// with its pid. refused lists the methods the refuser answered.
func poolWithARefuser(t *testing.T, errMap map[string]any) (p *Pool, refused func() []string) {
	t.Helper()
	lock := filepath.Join(t.TempDir(), "lock")
	encoded, err := json.Marshal(errMap)
	if err != nil {
		t.Fatal(err)
	}
	fake := fakeWorker(t, "import json\nrefuse_if_first("+strconv.Quote(lock)+", json.loads("+
		strconv.Quote(string(encoded))+"))\n")
	p, err = StartPool(context.Background(), 2, PoolOptions{Options: Options{Python: fake, Stderr: io.Discard,
		Grace: 300 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, func() []string {
		data, err := os.ReadFile(lock)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Fields(string(data))
	}
}

// pingBoth sends one ping per worker at once (least-loaded routing gives each worker one).
func pingBoth(p *Pool) ([]map[string]any, []error) {
	outs, errs := make([]map[string]any, 2), make([]error, 2)
	var wg sync.WaitGroup
	for i := range outs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs[i], errs[i] = p.Ping(context.Background(), nil)
		}(i)
	}
	wg.Wait()
	return outs, errs
}

func TestPoolRetriesOverloaded(t *testing.T) {
	p, refused := poolWithARefuser(t, map[string]any{"code": "overloaded", "message": "full", "retryable": true})
	outs, errs := pingBoth(p)
	for _, err := range errs {
		if err != nil {
			t.Fatalf("an overloaded call was not retried: %v", err)
		}
	}
	// the refuser met at least one of them (two if a retry moved the rotation onto it again)
	if got := refused(); len(got) < 1 || got[0] != "ping" {
		t.Fatalf("refused %v, want a ping", got)
	}
	if outs[0]["pid"] != outs[1]["pid"] {
		t.Fatalf("answered by different workers: %v", outs)
	}
}

func TestPoolDoesNotRetryStartedWork(t *testing.T) {
	usage := map[string]any{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
	p, refused := poolWithARefuser(t, map[string]any{"code": "shutting_down", "message": "stopping",
		"retryable": true, "details": map[string]any{"usage": usage}})
	_, errs := pingBoth(p)
	failed := 0
	for _, err := range errs {
		if err != nil {
			expectCode(t, err, "shutting_down")
			failed++
		}
	}
	if failed != 1 || len(refused()) != 1 {
		t.Fatalf("%d failed, refused %v: want the one call that had engine work failed, not replayed", failed,
			refused())
	}
}
