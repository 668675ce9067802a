package lmport

import (
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

// The generated result structs decode the worker's maps: nulls to nil pointers and slices, nested nullable
// lists, int-or-string unions to int64 or string, keys the worker leaves out to zero values.
func TestResultStructsDecode(t *testing.T) {
	entry := map[string]any{"token_id": 5, "logprob": -0.5, "rank": 1, "decoded_token": " a"}
	output := map[string]any{"index": 0, "text": " a", "token_ids": []int{5}, "cumulative_logprob": -0.5,
		"logprobs": []any{[]any{entry}}, "finish_reason": "stop", "stop_reason": 7}
	metrics := map[string]any{"arrival_time": 1.5, "first_scheduled_time": nil, "first_token_time": 2.0,
		"last_token_time": 2.0, "finished_time": 2.5, "time_in_queue": nil, "num_prompt_tokens": 2,
		"num_generation_tokens": 1, "num_cached_tokens": 0}
	result := []any{map[string]any{"request_id": "r1", "prompt": nil, "prompt_token_ids": []int{1, 2},
		"prompt_logprobs": []any{nil, []any{entry}}, "outputs": []any{output}, "finished": true,
		"metrics": metrics, "num_cached_tokens": 0, "added_later": "ignored"}}
	body, err := msgpack.Marshal(result)
	if err != nil {
		t.Fatal(err)
	}
	var outs []RequestOutput
	if err := Decode(body, &outs); err != nil {
		t.Fatal(err)
	}
	out := outs[0]
	o := out.Outputs[0]
	if out.RequestID != "r1" || out.Prompt != nil || len(out.PromptTokenIDs) != 2 || !out.Finished ||
		len(out.PromptLogprobs) != 2 || out.PromptLogprobs[0] != nil || out.PromptLogprobs[1][0].TokenID != 5 {
		t.Fatalf("request output %+v", out)
	}
	if o.StopReason != int64(7) || *o.FinishReason != "stop" || *o.CumulativeLogprob != -0.5 ||
		*o.Logprobs[0][0].Rank != 1 || *o.Logprobs[0][0].DecodedToken != " a" {
		t.Fatalf("completion %+v", o)
	}
	if m := out.Metrics; m.ArrivalTime != 1.5 || m.FirstScheduledTime != nil || *m.FinishedTime != 2.5 ||
		m.NumPromptTokens != 2 {
		t.Fatalf("metrics %+v", m)
	}

	// a chunk without its optional keys, and one with a string stop reason
	body, _ = msgpack.Marshal(map[string]any{"index": 1, "request_id": "r2", "finished": false, "outputs": []any{
		map[string]any{"index": 0, "text": "x", "token_ids": []int{9}, "finish_reason": nil, "stop_reason": "\n"}}})
	var chunk Chunk
	if err := Decode(body, &chunk); err != nil {
		t.Fatal(err)
	}
	if chunk.Index != 1 || chunk.PromptLogprobs != nil || chunk.Outputs[0].Logprobs != nil ||
		chunk.Outputs[0].FinishReason != nil || chunk.Outputs[0].StopReason != "\n" {
		t.Fatalf("chunk %+v", chunk)
	}

	// a value of the wrong type is an error, not a silent zero
	body, _ = msgpack.Marshal(map[string]any{"usage": "none", "requests": []any{}})
	var summary Summary
	if err := Decode(body, &summary); err == nil {
		t.Fatalf("decoded %+v", summary)
	}
	// ... whose protocol_error names the target type and the field
	de := decodeResult("generate stream summary", body, &summary)
	if de == nil || de.Code != "protocol_error" ||
		!strings.HasPrefix(de.Message, "cannot decode generate stream summary into lmport.Summary at usage: ") {
		t.Fatalf("got %v", de)
	}
	output["token_ids"] = "not a list"
	body, _ = msgpack.Marshal(result)
	var fresh []RequestOutput
	de = decodeResult("generate result", body, &fresh)
	if de == nil || de.Code != "protocol_error" || !strings.HasPrefix(de.Message,
		"cannot decode generate result into []lmport.RequestOutput at [0].outputs[0].token_ids: ") {
		t.Fatalf("got %v", de)
	}
	body, _ = msgpack.Marshal("not a map")
	if de = decodeResult("x", body, &chunk); de == nil || !strings.HasPrefix(de.Message, "cannot decode x into lmport.Chunk: ") {
		t.Fatalf("got %v", de)
	}
}

// Python's msgpack writes every int above 127 as an unsigned type (300 as uint16 cd 01 2c): such integers still
// decode as int64, in untyped results and in the any / map[string]any parts of typed ones; only a value above
// the int64 range stays uint64.
func TestUnsignedIntegersDecodeAsInt64(t *testing.T) {
	body, _ := msgpack.Marshal(map[string]any{"n": uint16(300), "small": uint8(7), "big": uint64(math.MaxUint64),
		"list": []any{uint32(70000), map[string]any{"k": uint64(1 << 40)}}, "neg": int16(-300)})
	var got map[string]any
	if err := Decode(body, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"n": int64(300), "small": int64(7), "big": uint64(math.MaxUint64),
		"list": []any{int64(70000), map[string]any{"k": int64(1 << 40)}}, "neg": int64(-300)}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decoded %#v, want %#v", got, want)
	}
	var anyv any
	if err := Decode(body, &anyv); err != nil || !reflect.DeepEqual(anyv, want) {
		t.Fatalf("decoded %#v (%v)", anyv, err)
	}

	// a stop token id in a typed result, and the details of an error
	body, _ = msgpack.Marshal([]any{map[string]any{"request_id": "r", "finished": true, "outputs": []any{
		map[string]any{"index": 0, "text": "", "token_ids": []uint16{50256}, "stop_reason": uint16(50256)}}}})
	var outs []RequestOutput
	if err := Decode(body, &outs); err != nil {
		t.Fatal(err)
	}
	if o := outs[0].Outputs[0]; o.StopReason != int64(50256) || o.TokenIDs[0] != 50256 {
		t.Fatalf("stop reason %#v (%T), token ids %v", o.StopReason, o.StopReason, o.TokenIDs)
	}
	body, _ = msgpack.Marshal(map[string]any{"type": "response", "id": uint8(200), "ok": false, "error": map[string]any{
		"code": "invalid_params", "message": "too long", "details": map[string]any{"limit": uint16(4096),
			"seen": []any{uint8(200)}}}})
	var msg message
	if err := Decode(body, &msg); err != nil {
		t.Fatal(err)
	}
	if d := msg.Error.toError().Details; d["limit"] != int64(4096) || d["seen"].([]any)[0] != int64(200) ||
		idOf(msg.ID) != 200 {
		t.Fatalf("details %#v, id %#v", d, msg.ID)
	}
}
