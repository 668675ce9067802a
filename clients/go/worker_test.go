package lmport

// Against the real worker (`python -m lmport.bridge.worker`) on the bundled model: one worker shared by most tests
// (TestMain), fresh ones where a test kills or closes its worker.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	sharedOnce sync.Once
	shared     *Worker
	sharedLLM  Handle
	sharedErr  error
)

// Small KV cache and context: tests stay light on a shared machine.
func engineOptions() *EngineOptions {
	return &EngineOptions{Dtype: Ptr("float32"), MaxModelLen: Ptr(512), KVCacheMemoryBytes: Ptr(64 << 20)}
}

func long() *GenerateOptions {
	return &GenerateOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(400), IgnoreEOS: Ptr(true),
		Temperature: Ptr(0.0)}}
}

func startWorker(ctx context.Context) (*Worker, error) {
	return Start(ctx, Options{Stderr: io.Discard, Env: append(os.Environ(), "OMP_NUM_THREADS=1")})
}

// useShared starts the worker the tests share (once, with the bundled model loaded).
func useShared(t *testing.T) {
	t.Helper()
	sharedOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if shared, sharedErr = startWorker(ctx); sharedErr == nil {
			sharedLLM, sharedErr = shared.LLM(ctx, "smollm2", engineOptions())
		}
	})
	if sharedErr != nil {
		t.Fatalf("cannot start the shared worker: %v", sharedErr)
	}
}

func TestMain(m *testing.M) {
	if os.Getenv("LMPORT_TEST_HOST") == "1" {
		runHost()
	}
	code := m.Run()
	if shared != nil {
		shared.Close()
	}
	os.Exit(code)
}

// runHost is the test binary acting as a host process for TestNoWorkerOutlivesAKilledHost: it starts a worker,
// prints the worker's pgid and waits to be killed.
func runHost() {
	w, err := startWorker(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(w.PGID())
	select {}
}

// groupAlive reports whether a live process is left in the group. Zombies do not count: an orphan whose new parent
// (a container's PID 1, say) never reaps it stays in the table, holding nothing. Reads Linux /proc.
func groupAlive(pgid int) bool {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited while we looked
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after its last ')'
		fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(fields) > 2 && fields[0] != "Z" && fields[2] == strconv.Itoa(pgid) {
			return true
		}
	}
	return false
}

func waitFor(t *testing.T, d time.Duration, check func() bool) bool {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if check() {
			return true
		}
	}
	return check()
}

func engineStat(t *testing.T, key string) int64 {
	t.Helper()
	stats, err := shared.Stats(context.Background(), &StatsOptions{LLM: sharedLLM})
	if err != nil {
		t.Fatal(err)
	}
	n, _ := stats[key].(int64)
	return n
}

func expectCode(t *testing.T, err error, code string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Code != code {
		t.Fatalf("want an *Error with code %s, got %v", code, err)
	}
	return e
}

func str(p *string) string {
	if p == nil {
		return "<nil>"
	}
	return *p
}

func TestHelloAndPing(t *testing.T) {
	useShared(t)
	if h := shared.Hello(); h.Protocol != 1 || h.PGID != shared.PGID() {
		t.Fatalf("hello %+v, pgid %d", h, shared.PGID())
	}
	pong, err := shared.Ping(context.Background(), &PingOptions{N: Ptr(7)})
	if err != nil || pong["n"] != int64(7) {
		t.Fatalf("ping: %v %v", pong, err)
	}
}

func TestGenerate(t *testing.T) {
	useShared(t)
	outs, err := shared.Generate(context.Background(), sharedLLM, []string{"The capital of France is", "1, 2, 3,"},
		&GenerateOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(6), Temperature: Ptr(0.0)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(outs) != 2 {
		t.Fatalf("%d outputs", len(outs))
	}
	for _, out := range outs {
		if len(out.Outputs) != 1 {
			t.Fatalf("%d completions", len(out.Outputs))
		}
		first := out.Outputs[0]
		if len(first.TokenIDs) != 6 || str(first.FinishReason) != "length" || first.Text == "" {
			t.Fatalf("output %+v", first)
		}
	}
	if str(outs[0].Prompt) != "The capital of France is" || str(outs[1].Prompt) != "1, 2, 3," {
		t.Fatalf("prompts %q %q", str(outs[0].Prompt), str(outs[1].Prompt))
	}
}

func TestChatAndTokenize(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	outs, err := shared.Chat(ctx, sharedLLM, []map[string]any{{"role": "user", "content": "Say hi."}},
		&ChatOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(4)}})
	if err != nil || len(outs) != 1 || len(outs[0].Outputs) != 1 || outs[0].Outputs[0].Text == "" {
		t.Fatalf("chat: %+v %v", outs, err)
	}
	if outs[0].Prompt != nil || len(outs[0].PromptTokenIDs) == 0 { // chat: no prompt text, the templated tokens
		t.Fatalf("chat prompt %q, %d prompt tokens", str(outs[0].Prompt), len(outs[0].PromptTokenIDs))
	}
	ids, err := shared.Tokenize(ctx, sharedLLM, "Hello world", &TokenizeOptions{AddSpecialTokens: Ptr(false)})
	if err != nil || len(ids) < 2 {
		t.Fatalf("tokenize: %v %v", ids, err)
	}
	if text, err := shared.Detokenize(ctx, sharedLLM, ids, nil); err != nil || text != "Hello world" {
		t.Fatalf("detokenize: %q %v", text, err)
	}
}

func TestEmbed(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	minilm, err := shared.LLM(ctx, "all-MiniLM-L6-v2", &EngineOptions{Device: Ptr("cpu")})
	if err != nil {
		t.Fatalf("llm: %v", err)
	}
	defer shared.Release(ctx, minilm)
	texts := []string{"A cat sits on the mat.", "Stocks fell sharply.", "The kitten rests on the rug."}
	result, err := shared.Embed(ctx, minilm, texts, nil)
	if err != nil || len(result.Data) != 3 {
		t.Fatalf("embed: %+v %v", result, err)
	}
	dot := func(a, b []float64) (sum float64) {
		for i := range a {
			sum += a[i] * b[i]
		}
		return sum
	}
	cat, stocks, kitten := result.Data[0].Embedding, result.Data[1].Embedding, result.Data[2].Embedding
	if len(cat) != 384 || dot(cat, cat) < 1-1e-5 || dot(cat, cat) > 1+1e-5 {
		t.Fatalf("vector of %d, norm^2 %f", len(cat), dot(cat, cat))
	}
	if dot(cat, kitten) <= dot(cat, stocks) { // the paraphrase is nearer
		t.Fatalf("similarities %f <= %f", dot(cat, kitten), dot(cat, stocks))
	}
	tokens := 0
	for i, d := range result.Data {
		if d.Index != i {
			t.Fatalf("index %d at %d", d.Index, i)
		}
		tokens += d.PromptTokens
	}
	if result.Usage.PromptTokens != tokens || result.Usage.TotalTokens != tokens {
		t.Fatalf("usage %+v, %d tokens", result.Usage, tokens)
	}
	short, err := shared.Embed(ctx, minilm, "x", &EmbedOptions{Pooling: Ptr("cls"), Dimensions: Ptr(8)})
	if err != nil || len(short.Data[0].Embedding) != 8 {
		t.Fatalf("dimensions: %+v %v", short, err)
	}
	for _, bad := range []struct {
		input any
		opts  *EmbedOptions
		field string
	}{
		{[]string{}, nil, "input"},
		{"x", &EmbedOptions{Pooling: Ptr("max")}, "pooling"},
		{"x", &EmbedOptions{Dimensions: Ptr(385)}, "dimensions"},
	} {
		_, err := shared.Embed(ctx, minilm, bad.input, bad.opts)
		if e := expectCode(t, err, "invalid_params"); e.Details["field"] != bad.field {
			t.Fatalf("field %v, want %s", e.Details, bad.field)
		}
	}
}

func TestStructuredOutputs(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	schema := map[string]any{
		"type": "object",
		"properties": map[string]any{
			"city":       map[string]any{"type": "string", "maxLength": 20},
			"population": map[string]any{"type": "integer", "minimum": 0},
		},
		"required": []string{"city", "population"},
	}
	outs, err := shared.Chat(ctx, sharedLLM, []map[string]any{{"role": "user", "content": "Describe a city as JSON."}},
		&ChatOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(60), Temperature: Ptr(0.0),
			StructuredOutputs: map[string]any{"json": schema}}})
	if err != nil || outs[0].Outputs[0].FinishReason == nil || *outs[0].Outputs[0].FinishReason != "stop" {
		t.Fatalf("chat: %+v %v", outs, err)
	}
	var city struct {
		City       string `json:"city"`
		Population *int   `json:"population"`
	}
	if err := json.Unmarshal([]byte(outs[0].Outputs[0].Text), &city); err != nil || city.Population == nil ||
		*city.Population < 0 {
		t.Fatalf("not the schema's object: %q %v", outs[0].Outputs[0].Text, err)
	}
	_, err = shared.Generate(ctx, sharedLLM, "x", &GenerateOptions{SamplingParams: &SamplingParams{
		StructuredOutputs: map[string]any{"regex": "[a-"}}})
	if e := expectCode(t, err, "invalid_params"); e.Details["field"] != "sampling_params.structured_outputs.regex" {
		t.Fatalf("field %v", e.Details)
	}
}

func TestToolCallLoop(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	weather := map[string]any{"type": "function", "function": map[string]any{
		"name": "get_weather", "description": "Current weather of a city",
		"parameters": map[string]any{"type": "object", "required": []string{"city"},
			"properties": map[string]any{"city": map[string]any{"type": "string", "maxLength": 30}}},
	}}
	question := []map[string]any{{"role": "user", "content": "What is the weather in Paris?"}}
	outs, err := shared.Chat(ctx, sharedLLM, question, &ChatOptions{
		SamplingParams: &SamplingParams{MaxTokens: Ptr(40), Temperature: Ptr(0.0)},
		Tools:          []map[string]any{weather},
		ToolChoice:     map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}},
	})
	if err != nil || len(outs[0].Outputs[0].ToolCalls) != 1 {
		t.Fatalf("chat: %+v %v", outs, err)
	}
	call := outs[0].Outputs[0].ToolCalls[0]
	var args struct {
		City *string `json:"city"`
	}
	if err := json.Unmarshal([]byte(call.Function.Arguments), &args); err != nil || args.City == nil ||
		call.Function.Name != "get_weather" || !strings.HasPrefix(call.ID, "call_") {
		t.Fatalf("not a get_weather call: %+v %v", call, err)
	}
	conversation := append(question,
		map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{
			"id": call.ID, "type": "function",
			"function": map[string]any{"name": call.Function.Name, "arguments": call.Function.Arguments}}}},
		map[string]any{"role": "tool", "tool_call_id": call.ID, "content": "18 C and sunny"})
	replies, err := shared.Chat(ctx, sharedLLM, conversation, &ChatOptions{
		SamplingParams: &SamplingParams{MaxTokens: Ptr(8), Temperature: Ptr(0.0)},
		Tools:          []map[string]any{weather}})
	if err != nil || replies[0].Outputs[0].Text == "" {
		t.Fatalf("reply: %+v %v", replies, err)
	}
	_, err = shared.Chat(ctx, sharedLLM, question, &ChatOptions{Tools: []map[string]any{weather},
		ToolChoice: map[string]any{"type": "function", "function": map[string]any{"name": "nope"}}})
	if e := expectCode(t, err, "invalid_params"); e.Details["field"] != "tool_choice" {
		t.Fatalf("field %v", e.Details)
	}
}

func TestValidationErrors(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	_, err := shared.Generate(ctx, sharedLLM, "x", &GenerateOptions{SamplingParams: &SamplingParams{TopP: Ptr(3.0)}})
	if e := expectCode(t, err, "invalid_params"); e.Details["field"] != "sampling_params.top_p" {
		t.Fatalf("field %v", e.Details)
	}
	_, err = shared.Generate(ctx, HandleRef("llm-404"), "x", nil)
	expectCode(t, err, "not_found") // the worker's answer
	_, err = shared.Ping(ctx, nil, WithTimeoutProfile("no_such_profile"))
	expectCode(t, err, "invalid_request")
}

func TestStreaming(t *testing.T) {
	useShared(t)
	s, err := shared.GenerateStream(context.Background(), sharedLLM, "Once upon a time",
		&GenerateOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(6), Temperature: Ptr(0.0)}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	n, finished := 0, false
	for s.Next() {
		d := s.Delta()
		if len(d.Outputs) != 1 || len(d.Outputs[0].TokenIDs) != 1 || d.RequestID == "" || finished {
			t.Fatalf("delta %+v", d)
		}
		finished = d.Finished
		n++
	}
	if err := s.Err(); err != nil || n != 6 || !finished {
		t.Fatalf("%d deltas, finished %v, err %v", n, finished, err)
	}
	sum := s.Summary()
	if sum.Usage.CompletionTokens != 6 || sum.Usage.TotalTokens != sum.Usage.PromptTokens+6 || len(sum.Requests) != 1 {
		t.Fatalf("summary %+v", sum)
	}
	if r := sum.Requests[0]; len(r.Outputs) != 1 || str(r.Outputs[0].FinishReason) != "length" ||
		r.Outputs[0].CompletionTokens != 6 || r.Metrics.NumGenerationTokens != 6 || r.Metrics.FinishedTime == nil {
		t.Fatalf("summary request %+v", r)
	}
}

// The typed results carry every field of the worker's records: metrics, finish and stop reasons, logprobs and
// prompt logprobs, in the unary result and in the stream's deltas and summary.
func TestTypedResults(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	params := &SamplingParams{MaxTokens: Ptr(4), Temperature: Ptr(0.0), IgnoreEOS: Ptr(true), Logprobs: Ptr(2),
		PromptLogprobs: Ptr(1)}
	outs, err := shared.Generate(ctx, sharedLLM, "The capital of France is", &GenerateOptions{SamplingParams: params})
	if err != nil || len(outs) != 1 || len(outs[0].Outputs) != 1 {
		t.Fatalf("generate: %+v %v", outs, err)
	}
	out, first := outs[0], outs[0].Outputs[0]
	checkEntries := func(what string, entries []LogprobEntry, token int, most int) {
		t.Helper()
		found := false
		for _, e := range entries {
			if e.Rank == nil || *e.Rank < 1 || e.DecodedToken == nil || e.Logprob > 0 {
				t.Fatalf("%s: entry %+v", what, e)
			}
			found = found || e.TokenID == token
		}
		if !found || len(entries) < 1 || len(entries) > most {
			t.Fatalf("%s: %d entries %+v without token %d", what, len(entries), entries, token)
		}
	}

	// the completion: 4 tokens, each with the sampled token and the top 2
	if !out.Finished || out.RequestID == "" || len(first.TokenIDs) != 4 || str(first.FinishReason) != "length" ||
		first.StopReason != nil || first.Index != 0 {
		t.Fatalf("output %+v", first)
	}
	if len(first.Logprobs) != 4 || first.CumulativeLogprob == nil {
		t.Fatalf("logprobs %+v, cumulative %v", first.Logprobs, first.CumulativeLogprob)
	}
	sum := 0.0
	for i, position := range first.Logprobs {
		checkEntries(fmt.Sprintf("logprobs[%d]", i), position, first.TokenIDs[i], 3)
		for _, e := range position {
			if e.TokenID == first.TokenIDs[i] {
				sum += e.Logprob
			}
		}
	}
	if diff := sum - *first.CumulativeLogprob; diff > 1e-3 || diff < -1e-3 {
		t.Fatalf("cumulative_logprob %v, the sampled tokens' sum %v", *first.CumulativeLogprob, sum)
	}

	// the prompt: the first position null, then each prompt token among its candidates (top 1)
	if n := len(out.PromptTokenIDs); n < 2 || len(out.PromptLogprobs) != n || out.PromptLogprobs[0] != nil {
		t.Fatalf("prompt_logprobs %+v for %d prompt tokens", out.PromptLogprobs, len(out.PromptTokenIDs))
	}
	for i := 1; i < len(out.PromptLogprobs); i++ {
		checkEntries(fmt.Sprintf("prompt_logprobs[%d]", i), out.PromptLogprobs[i], out.PromptTokenIDs[i], 2)
	}

	// metrics
	m := out.Metrics
	if m.ArrivalTime <= 0 || m.FirstScheduledTime == nil || m.FirstTokenTime == nil || m.LastTokenTime == nil ||
		m.FinishedTime == nil || m.TimeInQueue == nil || *m.FinishedTime < m.ArrivalTime ||
		*m.LastTokenTime < *m.FirstTokenTime || m.NumPromptTokens != len(out.PromptTokenIDs) ||
		m.NumGenerationTokens != 4 || m.NumCachedTokens != out.NumCachedTokens {
		t.Fatalf("metrics %+v", m)
	}

	// a stop string: finish_reason "stop" and the string as stop_reason (an `any` holding a string)
	outs, err = shared.Generate(ctx, sharedLLM, "The capital of France is", &GenerateOptions{SamplingParams: &SamplingParams{
		MaxTokens: Ptr(16), Temperature: Ptr(0.0), Stop: []string{"."}}})
	if err != nil {
		t.Fatal(err)
	}
	if o := outs[0].Outputs[0]; str(o.FinishReason) != "stop" || o.StopReason != "." || o.Logprobs != nil ||
		o.CumulativeLogprob != nil || outs[0].PromptLogprobs != nil {
		t.Fatalf("stopped output %+v (stop_reason %T %v)", o, o.StopReason, o.StopReason)
	}

	// streaming: prompt logprobs in the first delta, each delta's logprobs, then the summary
	s, err := shared.GenerateStream(ctx, sharedLLM, "The capital of France is", &GenerateOptions{SamplingParams: params})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var streamed []int
	for n := 0; s.Next(); n++ {
		d := s.Delta()
		if (n == 0) != (d.PromptLogprobs != nil) || len(d.Outputs) != 1 {
			t.Fatalf("delta %d: %+v", n, d)
		}
		o := d.Outputs[0]
		if len(o.Logprobs) != len(o.TokenIDs) {
			t.Fatalf("delta %d: %d logprobs for %d tokens", n, len(o.Logprobs), len(o.TokenIDs))
		}
		for i, position := range o.Logprobs {
			checkEntries(fmt.Sprintf("delta %d logprobs[%d]", n, i), position, o.TokenIDs[i], 3)
		}
		streamed = append(streamed, o.TokenIDs...)
	}
	if err := s.Err(); err != nil || fmt.Sprint(streamed) != fmt.Sprint(first.TokenIDs) {
		t.Fatalf("streamed %v, generated %v, err %v", streamed, first.TokenIDs, err)
	}
	summary := s.Summary()
	if len(summary.Requests) != 1 || summary.Usage.CompletionTokens != 4 ||
		summary.Usage.PromptTokens != len(out.PromptTokenIDs) {
		t.Fatalf("summary %+v", summary)
	}
	r := summary.Requests[0]
	if r.PromptTokens != len(out.PromptTokenIDs) || r.Metrics.NumGenerationTokens != 4 || len(r.Outputs) != 1 ||
		str(r.Outputs[0].FinishReason) != "length" || r.Outputs[0].CompletionTokens != 4 ||
		r.Outputs[0].CumulativeLogprob == nil || r.Outputs[0].StopReason != nil {
		t.Fatalf("summary request %+v", r)
	}
}

func TestStreamCloseCancels(t *testing.T) {
	useShared(t)
	before := engineStat(t, "requests_aborted")
	s, err := shared.GenerateStream(context.Background(), sharedLLM, "Count:", long())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2 && s.Next(); i++ {
	}
	s.Close()
	if s.Next() {
		t.Fatal("Next after Close")
	}
	expectCode(t, s.Err(), "cancelled")
	if !waitFor(t, 10*time.Second, func() bool { return engineStat(t, "requests_aborted") > before }) {
		t.Fatal("the worker did not abort the request")
	}
}

func TestConcurrentCallsAreBatched(t *testing.T) {
	useShared(t)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs, err := shared.Generate(context.Background(), sharedLLM, fmt.Sprintf("Story %d:", i),
				&GenerateOptions{SamplingParams: &SamplingParams{MaxTokens: Ptr(8), IgnoreEOS: Ptr(true)}})
			if err == nil && len(outs) != 1 {
				err = fmt.Errorf("%d outputs", len(outs))
			}
			errs <- err
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if peak := engineStat(t, "max_num_running"); peak <= 1 {
		t.Fatalf("max_num_running %d: calls were not batched", peak)
	}
}

func TestContextCancel(t *testing.T) {
	useShared(t)
	before := engineStat(t, "requests_aborted")
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	_, err := shared.Generate(ctx, sharedLLM, "Abort me:", long())
	expectCode(t, err, "cancelled")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("%v does not wrap context.Canceled", err)
	}
	if !waitFor(t, 10*time.Second, func() bool { return engineStat(t, "requests_aborted") > before }) {
		t.Fatal("the worker did not abort the request")
	}
}

func TestTimeout(t *testing.T) {
	useShared(t)
	started := time.Now()
	_, err := shared.Generate(context.Background(), sharedLLM, "Slow:", long(), WithTimeout(300*time.Millisecond))
	e := expectCode(t, err, "deadline_exceeded")
	if e.Details["client_side"] == true || time.Since(started) > 5*time.Second {
		t.Fatalf("not answered by the worker's deadline: %v after %s", e, time.Since(started))
	}
	// a context deadline travels to the worker as timeout_ms too
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = shared.Generate(ctx, sharedLLM, "Slow:", long())
	expectCode(t, err, "deadline_exceeded")
	if _, err := shared.Ping(context.Background(), nil); err != nil {
		t.Fatalf("worker no longer serving: %v", err)
	}
}

func TestWorkerCrashFailsPendingCalls(t *testing.T) {
	ctx := context.Background()
	w, err := startWorker(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	llm, err := w.LLM(ctx, "smollm2", engineOptions())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-w.Events():
		if ev.Name != "model_loaded" {
			t.Fatalf("event %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no model_loaded event")
	}
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func() {
			_, err := w.Generate(ctx, llm, "Crash:", long())
			errs <- err
		}()
	}
	time.Sleep(300 * time.Millisecond)
	if err := syscall.Kill(w.Hello().PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		expectCode(t, <-errs, "worker_exited")
	}
	_, err = w.Ping(ctx, nil)
	expectCode(t, err, "worker_exited")
}

func TestWedgedWorkerIsKilled(t *testing.T) {
	w, err := Start(context.Background(), Options{Stderr: io.Discard, Grace: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := syscall.Kill(w.Hello().PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	_, err = w.Ping(context.Background(), nil, WithTimeout(200*time.Millisecond))
	if e := expectCode(t, err, "deadline_exceeded"); e.Details["client_side"] != true {
		t.Fatalf("not the client's deadline: %v", e)
	}
	select { // the ping probe goes unanswered: the group is killed
	case <-w.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the wedged worker was not killed")
	}
	if groupAlive(w.PGID()) {
		t.Fatal("the group survived")
	}
	_, err = w.Ping(context.Background(), nil)
	expectCode(t, err, "worker_exited")
}

// A worker that dies while a process it started still holds its stderr (a pipe: Options.Stderr is not an
// *os.File) fails its pending calls all the same, and the group sweep ends that process.
func TestWorkerDeathWithChildHoldingStderr(t *testing.T) {
	python, root, err := findPython("")
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(t.TempDir(), "python")
	// the "interpreter" leaves a child in the group that keeps stderr open, then becomes the real one
	body := "#!/bin/sh\nsleep 300 </dev/null >/dev/null &\nexec \"$LMPORT_TEST_REAL_PYTHON\" \"$@\"\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "OMP_NUM_THREADS=1", "LMPORT_TEST_REAL_PYTHON="+python)
	if root != "" {
		env = append(env, "PYTHONPATH="+root)
	}
	w, err := Start(context.Background(), Options{Python: script, Env: env, Stderr: io.Discard,
		Grace: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := syscall.Kill(w.Hello().PID, syscall.SIGSTOP); err != nil { // the ping below stays pending
		t.Fatal(err)
	}
	errCh := make(chan error, 1)
	go func() {
		_, err := w.Ping(context.Background(), nil, WithTimeout(time.Minute))
		errCh <- err
	}()
	time.Sleep(200 * time.Millisecond)
	if err := syscall.Kill(w.Hello().PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errCh:
		expectCode(t, err, "worker_exited")
	case <-time.After(10 * time.Second):
		syscall.Kill(-w.PGID(), syscall.SIGKILL)
		t.Fatal("the pending call hangs while a child holds the worker's stderr")
	}
	select {
	case <-w.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done is not closed")
	}
	if !waitFor(t, 5*time.Second, func() bool { return !groupRunning(w.PGID()) }) {
		t.Fatal("the child survived the sweep")
	}
}

// groupRunning reports whether a process of the group is alive and not a zombie (an orphan's zombie lingers until
// its new parent reaps it, which a container's init may never do). Linux: it reads /proc.
func groupRunning(pgid int) bool {
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range paths {
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		// "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
		fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
		if len(fields) >= 3 && fields[0] != "Z" && fields[2] == strconv.Itoa(pgid) {
			return true
		}
	}
	return false
}

// A worker that stops reading its stdin with more than a pipe's worth of frame queued: the blocked write gives up
// after the grace and kills the group, instead of blocking the caller (and every other writer) forever.
func TestStalledWriteKillsAWedgedWorker(t *testing.T) {
	w, err := Start(context.Background(), Options{Stderr: io.Discard, Grace: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := syscall.Kill(w.Hello().PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	errCh := make(chan error, 2)
	big := map[string]any{"padding": strings.Repeat("x", 1<<20)} // far more than the pipe buffer holds
	go func() { errCh <- w.Call(context.Background(), "ping", big, nil) }()
	go func() { // queued behind the blocked write
		time.Sleep(100 * time.Millisecond)
		_, err := w.Ping(context.Background(), nil)
		errCh <- err
	}()
	for i := 0; i < 2; i++ {
		select {
		case err := <-errCh:
			expectCode(t, err, "worker_exited")
		case <-time.After(10 * time.Second):
			syscall.Kill(-w.PGID(), syscall.SIGKILL)
			t.Fatal("a write to the stopped worker blocks")
		}
	}
	select {
	case <-w.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the wedged worker was not killed")
	}
	if e := expectCode(t, func() error { _, err := w.Ping(context.Background(), nil); return err }(),
		"worker_exited"); !strings.Contains(e.Message, "stopped reading") {
		t.Fatalf("exit error %v", e)
	}
}

// Close on a worker that stopped reading while a write to it is blocked still signals and kills the group.
func TestCloseWithABlockedWrite(t *testing.T) {
	w, err := Start(context.Background(), Options{Stderr: io.Discard, Grace: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	pgid := w.PGID()
	if err := syscall.Kill(w.Hello().PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	errCh := make(chan error, 1)
	go func() {
		errCh <- w.Call(context.Background(), "ping", map[string]any{"padding": strings.Repeat("x", 1<<20)}, nil)
	}()
	time.Sleep(200 * time.Millisecond) // the write holds the write lock, blocked on the full pipe
	closed := make(chan struct{})
	go func() {
		w.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(15 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL)
		t.Fatal("Close blocks on a wedged worker")
	}
	if err := <-errCh; err == nil {
		t.Fatal("the blocked call succeeded")
	}
	if !waitFor(t, 5*time.Second, func() bool { return !groupRunning(pgid) }) {
		t.Fatal("the group survived Close")
	}
}

func TestCloseLeavesNoProcess(t *testing.T) {
	w, err := startWorker(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pgid := w.PGID()
	if !groupAlive(pgid) {
		t.Fatal("no group before Close")
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if groupAlive(pgid) {
		t.Fatal("the worker's process group survived Close")
	}
	_, err = w.Ping(context.Background(), nil)
	expectCode(t, err, "shutting_down")
	w.Close() // idempotent
	drained := make(chan struct{})
	go func() {
		for range w.Events() { // ends: the channel is closed once the worker has exited
		}
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(5 * time.Second):
		t.Fatal("Events() is still open after Close")
	}
}

// A call that passed the state check when Close ran, and writes after Close closed stdin, fails with
// shutting_down, not with the write's "file already closed" as worker_exited.
func TestCallRacingCloseIsShuttingDown(t *testing.T) {
	w, err := startWorker(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.writeMu.Lock() // the call registers, then waits to write
	errCh := make(chan error, 1)
	go func() {
		_, err := w.Ping(context.Background(), nil)
		errCh <- err
	}()
	registered := waitFor(t, 5*time.Second, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.pending) == 1
	})
	w.mu.Lock() // what Close does meanwhile: stop taking calls, close stdin
	w.state = stateClosing
	w.mu.Unlock()
	_ = w.stdin.Close()
	w.writeMu.Unlock()
	if !registered {
		t.Fatal("the call did not register")
	}
	expectCode(t, <-errCh, "shutting_down")
}

func TestNoWorkerOutlivesAKilledHost(t *testing.T) {
	host := exec.Command(os.Args[0])
	host.Env = append(os.Environ(), "LMPORT_TEST_HOST=1")
	stdout, err := host.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	var pgid int
	if _, err := fmt.Fscan(stdout, &pgid); err != nil {
		t.Fatalf("no pgid from the host: %v", err)
	}
	if !groupAlive(pgid) {
		t.Fatal("the worker is not running")
	}
	_ = host.Process.Kill() // SIGKILL: no chance to clean up
	_ = host.Wait()
	if !waitFor(t, 10*time.Second, func() bool { return !groupAlive(pgid) }) {
		syscall.Kill(-pgid, syscall.SIGKILL)
		t.Fatal("the worker outlived its host")
	}
}

func TestLoRARequest(t *testing.T) {
	useShared(t)
	ctx := context.Background()
	python, root, err := findPython("")
	if err != nil {
		t.Fatal(err)
	}
	if root == "" { // LMPORT_PYTHON given: the repository is two levels up from this package
		root, _ = filepath.Abs(filepath.Join("..", ".."))
	}
	dir := filepath.Join(t.TempDir(), "adapter")
	if out, err := exec.Command(python, filepath.Join(root, "tests", "make_lora_adapter.py"), dir).CombinedOutput(); err != nil {
		t.Fatalf("make_lora_adapter: %v\n%s", err, out)
	}
	adapter := map[string]any{"lora_name": "smol-test", "lora_int_id": 1, "lora_path": dir}
	options := engineOptions()
	options.EnableLora, options.MaxLoraRank = Ptr(true), Ptr(8)
	lora, err := shared.LLM(ctx, "smollm2", options)
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Release(ctx, lora)
	greedy := &SamplingParams{MaxTokens: Ptr(10), Temperature: Ptr(0.0)}
	outs, err := shared.Generate(ctx, lora, []string{"The capital of France is", "The capital of France is"},
		&GenerateOptions{SamplingParams: greedy, LoraRequest: []any{nil, adapter}})
	if err != nil || outs[0].Outputs[0].Text == outs[1].Outputs[0].Text {
		t.Fatalf("the adapter changed nothing: %+v %v", outs, err)
	}
	_, err = shared.Generate(ctx, sharedLLM, "x", &GenerateOptions{SamplingParams: greedy, LoraRequest: adapter})
	var lerr *Error
	if !errors.As(err, &lerr) || lerr.Code != "invalid_params" || lerr.Details["field"] != "lora_request" {
		t.Fatalf("an engine without enable_lora: %v", err)
	}
}
