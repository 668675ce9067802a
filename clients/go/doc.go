// Package lmport runs local LLM inference in a Python lmport worker process and calls it from Go.
//
// Start a worker with Start, call its methods (generated from the worker's manifest: LLM, Generate, Chat,
// GenerateStream, ...) from any number of goroutines, and stop it with Close:
//
//	w, err := lmport.Start(ctx, lmport.Options{})
//	if err != nil { ... }
//	defer w.Close()
//	llm, err := w.LLM(ctx, "smollm2", nil)
//	outs, err := w.Generate(ctx, llm, "Hello", &lmport.GenerateOptions{
//		SamplingParams: &lmport.SamplingParams{MaxTokens: lmport.Ptr(16)},
//	})
//	fmt.Println(outs[0].Outputs[0].Text) // typed results: RequestOutput, CompletionOutput, RequestMetrics, ...
//
// Every call takes a context.Context: cancelling it cancels the request in the worker, and its deadline is
// sent to the worker, which aborts the request when it passes. Requests from all goroutines are multiplexed
// over one pipe and batched together by the worker's engine.
package lmport
