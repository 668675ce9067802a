package lmport

// Protocol edge cases against a scripted stand-in for the worker: fast, no model.

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
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
