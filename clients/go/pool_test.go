package lmport

// A Pool of 3 real workers on the bundled model, one pool for the subtests in order: the pool-wide handle on every
// worker, then one worker killed under load and restarted.

import (
	"context"
	"io"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

func short() *GenerateOptions {
	return &GenerateOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(4), Temperature: Ptr(0.0)}}
}

// requestsPerWorker is each worker's service request counter, by place.
func requestsPerWorker(t *testing.T, ctx context.Context, p *Pool) []int64 {
	t.Helper()
	var out []int64
	for i, w := range p.Workers() {
		stats, err := w.Stats(ctx, nil)
		if err != nil {
			t.Fatalf("stats of worker %d: %v", i, err)
		}
		n, _ := stats["service"].(map[string]any)["requests_total"].(int64)
		out = append(out, n)
	}
	return out
}

// onePerWorker runs one greedy generation per worker at once (least-loaded routing gives each worker one) and
// returns the texts.
func onePerWorker(t *testing.T, ctx context.Context, p *Pool, llm Handle) []string {
	t.Helper()
	texts := make([]string, p.Size())
	errs := make([]error, p.Size())
	var wg sync.WaitGroup
	for i := range texts {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs, err := p.Generate(ctx, llm, "The capital of France is", short())
			if errs[i] = err; err == nil {
				texts[i] = outs[0].Outputs[0].Text
			}
		}(i)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return texts
}

func allEqual(xs []string) bool {
	for _, x := range xs {
		if x != xs[0] {
			return false
		}
	}
	return true
}

func TestPool(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p, err := StartPool(ctx, 3, PoolOptions{RestartDelay: 100 * time.Millisecond,
		Options: Options{Stderr: io.Discard, Env: append(os.Environ(), "OMP_NUM_THREADS=1")}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var _ io.Closer = p
	llm, err := p.LLM(ctx, "smollm2", &EngineOptions{Dtype: Ptr("float32"), MaxModelLen: Ptr(256),
		KVCacheMemoryBytes: Ptr(32 << 20)})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("HandleWorksOnEveryWorker", func(t *testing.T) {
		before := requestsPerWorker(t, ctx, p)
		texts := onePerWorker(t, ctx, p, llm)
		after := requestsPerWorker(t, ctx, p)
		for i := range after { // the generate and the first stats call
			if after[i]-before[i] != 2 {
				t.Fatalf("worker %d answered %d requests, want 2 (before %v, after %v)", i, after[i]-before[i],
					before, after)
			}
		}
		if !allEqual(texts) {
			t.Fatalf("greedy outputs differ across workers: %q", texts)
		}
		if ids, err := p.Tokenize(ctx, llm, "Paris", nil); err != nil || len(ids) == 0 {
			t.Fatalf("tokenize through the pool: %v %v", ids, err)
		}
	})

	t.Run("ForeignRefIsRefused", func(t *testing.T) {
		_, err := p.Generate(ctx, HandleRef("llm-1"), "Hi", nil)
		e := expectCode(t, err, "not_found")
		if e.Details["field"] != "llm" {
			t.Fatalf("details %v", e.Details)
		}
	})

	t.Run("KillOneOfThreeUnderLoad", func(t *testing.T) {
		victim := p.Workers()[1]
		busy := &GenerateOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(48), IgnoreEOS: Ptr(true),
			Temperature: Ptr(0.0)}}
		streams := make([]*Stream, 6) // two per worker
		for i := range streams {
			if streams[i], err = p.GenerateStream(ctx, llm, "The capital of France is", busy); err != nil {
				t.Fatal(err)
			}
			defer streams[i].Close()
		}
		for i, s := range streams { // every one has started: it produced a chunk
			if !s.Next() {
				t.Fatalf("stream %d ended early: %v", i, s.Err())
			}
		}
		if err := syscall.Kill(-victim.PGID(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-victim.Done()
		// calls made while the worker is down (dead, then restarting) had not started: none may be lost
		later := make([]error, 6)
		var wg sync.WaitGroup
		for i := range later {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				_, later[i] = p.Generate(ctx, llm, "The capital of France is", short())
			}(i)
		}
		failed := 0
		for _, s := range streams {
			for s.Next() {
			}
			if err := s.Err(); err != nil {
				expectCode(t, err, "worker_exited")
				failed++
			}
		}
		if failed != 2 {
			t.Fatalf("%d streams failed, want the victim's 2", failed)
		}
		wg.Wait()
		for i, err := range later {
			if err != nil {
				t.Fatalf("call %d made while a worker was down failed: %v", i, err)
			}
		}
	})

	t.Run("CrashedWorkerIsRestarted", func(t *testing.T) {
		if !waitFor(t, 2*time.Minute, func() bool {
			for _, w := range p.Workers() {
				if w == nil || !w.ready() {
					return false
				}
			}
			return true
		}) {
			t.Fatal("worker 1 was not restarted")
		}
		if p.Restarts() != 1 {
			t.Fatalf("restarts = %d", p.Restarts())
		}
		before := requestsPerWorker(t, ctx, p)
		texts := onePerWorker(t, ctx, p, llm) // the new worker loads the handle's model lazily
		after := requestsPerWorker(t, ctx, p)
		if after[1]-before[1] < 2 {
			t.Fatalf("the restarted worker served no call (before %v, after %v)", before, after)
		}
		if !allEqual(texts) {
			t.Fatalf("greedy outputs differ: %q", texts)
		}
	})

	t.Run("KilledWhileLoadingTheHandle", func(t *testing.T) {
		idle := p.Workers()[2]
		if err := syscall.Kill(-idle.PGID(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if !waitFor(t, 2*time.Minute, func() bool {
			ws := p.Workers()
			return ws[2] != nil && ws[2] != idle && ws[0].ready() && ws[1].ready() && ws[2].ready()
		}) {
			t.Fatal("worker 2 was not restarted")
		}
		fresh := p.Workers()[2] // has not loaded the handle's model yet
		errs := make(chan error, p.Size())
		for i := 0; i < p.Size(); i++ { // one per worker: one waits for the fresh worker's load
			go func() {
				_, err := p.Generate(ctx, llm, "The capital of France is", short())
				errs <- err
			}()
		}
		time.Sleep(200 * time.Millisecond)
	drain:
		for {
			select {
			case ev := <-fresh.Events():
				if ev.Name == "model_loaded" {
					t.Fatal("the load finished before the kill: the test proves nothing")
				}
			default:
				break drain
			}
		}
		if err := syscall.Kill(-fresh.PGID(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < p.Size(); i++ {
			if err := <-errs; err != nil {
				t.Fatalf("a call waiting for a load on the killed worker was lost: %v", err)
			}
		}
	})

	t.Run("ReleaseOnEveryWorker", func(t *testing.T) {
		extra, err := p.LLM(ctx, "smollm2", &EngineOptions{Dtype: Ptr("float32"), MaxModelLen: Ptr(256),
			KVCacheMemoryBytes: Ptr(32 << 20)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Release(ctx, extra); err != nil {
			t.Fatal(err)
		}
		_, err = p.Generate(ctx, extra, "Hi", short())
		expectCode(t, err, "not_found")
	})

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = p.Ping(ctx, nil)
	expectCode(t, err, "shutting_down")
}
