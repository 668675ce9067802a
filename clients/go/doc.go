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
//
// StartPool runs several workers behind the same methods (Worker and Pool both embed API): calls go to the
// least-loaded worker, handles from Pool.LLM work on every worker, and a crashed worker is restarted:
//
//	pool, err := lmport.StartPool(ctx, 2, lmport.PoolOptions{})
//	if err != nil { ... }
//	defer pool.Close()
//	llm, err := pool.LLM(ctx, "smollm2", nil)
//	outs, err := pool.Generate(ctx, llm, "Hello", nil)
package lmport
