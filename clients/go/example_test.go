package lmport_test

import (
	"context"
	"errors"
	"fmt"
	"log"
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
