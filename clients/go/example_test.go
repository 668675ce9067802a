package lmport_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"sync"
	"time"

	lmport "github.com/lmport/lmport/clients/go"
)

// The example of docs/clients/go.md (compiled by go test; run it as a main package).
func Example() {
	ctx := context.Background()
	w, err := lmport.Start(ctx, lmport.Options{}) // python -m lmport.bridge.worker, in its own process group
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close() // shutdown -> grace -> kill(-pgid)

	llm, err := w.LLM(ctx, "smollm2", &lmport.EngineOptions{MaxModelLen: lmport.Ptr(2048)})
	if err != nil {
		log.Fatal(err)
	}

	// one call, several prompts: one RequestOutput per prompt
	greedy := &lmport.SamplingParams{MaxTokens: lmport.Ptr(12), Temperature: lmport.Ptr(0.0)}
	outs, err := w.Generate(ctx, llm, []string{"The capital of France is", "Water boils at"},
		&lmport.GenerateOptions{SamplingParams: greedy})
	if err != nil {
		log.Fatal(err)
	}
	for _, out := range outs {
		first := out.Outputs[0]
		fmt.Printf("%q -> %q (%s, %d tokens)\n", *out.Prompt, first.Text, *first.FinishReason, len(first.TokenIDs))
	}

	// streaming: deltas as they are generated; Close (or cancelling ctx) cancels the request
	s, err := w.GenerateStream(ctx, llm, "Once upon a time",
		&lmport.GenerateOptions{SamplingParams: &lmport.SamplingParams{MaxTokens: lmport.Ptr(16)}})
	if err != nil {
		log.Fatal(err)
	}
	for s.Next() {
		for _, o := range s.Delta().Outputs {
			fmt.Print(o.Text)
		}
	}
	if err := s.Err(); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("\nusage: %+v\n", s.Summary().Usage)

	// deadlines (ctx or WithTimeout) reach the worker, which aborts the request and frees its KV cache
	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	_, err = w.Generate(tctx, llm, "Slow:", &lmport.GenerateOptions{SamplingParams: &lmport.SamplingParams{
		MaxTokens: lmport.Ptr(500), IgnoreEOS: lmport.Ptr(true)}})
	var e *lmport.Error
	if errors.As(err, &e) {
		fmt.Println("timeout ->", e.Code, errors.Is(err, context.DeadlineExceeded))
	}
}

// The Pool example of docs/clients/go.md: the same methods as a Worker, over several workers.
func ExamplePool() {
	ctx := context.Background()
	pool, err := lmport.StartPool(ctx, 2, lmport.PoolOptions{}) // two workers; crashed ones are restarted
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close() // a Pool is an io.Closer, like a Worker

	// one handle for the whole pool: every worker loads the model, the pool maps the handle to their refs
	llm, err := pool.LLM(ctx, "smollm2", &lmport.EngineOptions{MaxModelLen: lmport.Ptr(1024)})
	if err != nil {
		log.Fatal(err)
	}
	colours := []string{"red", "green", "blue", "white"}
	texts := make([]string, len(colours))
	var wg sync.WaitGroup
	for i, c := range colours { // concurrent calls go to the least-loaded worker
		wg.Add(1)
		go func(i int, c string) {
			defer wg.Done()
			outs, err := pool.Generate(ctx, llm, "A poem about "+c+":", &lmport.GenerateOptions{
				SamplingParams: &lmport.SamplingParams{MaxTokens: lmport.Ptr(12)}})
			if err != nil {
				log.Print(err) // worker_exited if its worker died mid-generation: never replayed
				return
			}
			texts[i] = outs[0].Outputs[0].Text
		}(i, c)
	}
	wg.Wait()
	fmt.Printf("%q\n", texts)

	// code written against lmport.API runs on a Worker or a Pool
	var api lmport.API = pool.API
	if _, err := api.Ping(ctx, nil); err != nil {
		log.Fatal(err)
	}
}
