package lmport

// The shared protocol vectors (tests/vectors, written by `python -m lmport.bridge.vectors`): this client must decode
// every frame to its meaning and encode every host message to the same bytes.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

type valueVector struct {
	Name    string `json:"name"`
	Msgpack string `json:"msgpack"`
	Value   any    `json:"value"`
	Encode  *bool  `json:"encode"`
}

type messageVector struct {
	Name      string `json:"name"`
	Direction string `json:"direction"`
	Frame     string `json:"frame"`
	Message   any    `json:"message"`
}

func loadVectors[T any](t *testing.T, name string) []T {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "tests", "vectors", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Vectors []T `json:"vectors"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber() // integers are exact up to 2^53
	if err := dec.Decode(&file); err != nil {
		t.Fatal(err)
	}
	return file.Vectors
}

// untag turns a tagged JSON meaning into the Go value ({"$float": x} -> float64, {"$bin": hex} -> []byte).
func untag(t *testing.T, meaning any) any {
	switch m := meaning.(type) {
	case json.Number:
		if n, err := m.Int64(); err == nil {
			return n
		}
		t.Fatalf("non-integer plain number %s", m)
	case []any:
		out := make([]any, len(m))
		for i, v := range m {
			out[i] = untag(t, v)
		}
		return out
	case map[string]any:
		if f, ok := m["$float"]; ok && len(m) == 1 {
			x, err := f.(json.Number).Float64()
			if err != nil {
				t.Fatal(err)
			}
			return x
		}
		if b, ok := m["$bin"]; ok && len(m) == 1 {
			data, err := hex.DecodeString(b.(string))
			if err != nil {
				t.Fatal(err)
			}
			return data
		}
		out := make(map[string]any, len(m))
		for k, v := range m {
			out[k] = untag(t, v)
		}
		return out
	}
	return meaning
}

// canon makes decoded values comparable: an int64 becomes "int:N" (any other integer type "TYPE:N", so a
// decoder handing out uint64 for msgpack's unsigned types fails), every float "float:BITS" (so -0.0 differs
// from 0.0), bin stays []byte.
func canon(v any) any {
	rv := reflect.ValueOf(v)
	switch {
	case v == nil:
		return nil
	case rv.Kind() == reflect.Int64:
		return fmt.Sprintf("int:%d", rv.Int())
	case rv.CanInt():
		return fmt.Sprintf("%T:%d", v, rv.Int())
	case rv.CanUint():
		return fmt.Sprintf("%T:%d", v, rv.Uint())
	case rv.CanFloat():
		return fmt.Sprintf("float:%x", math.Float64bits(rv.Float()))
	}
	switch m := v.(type) {
	case []any:
		out := make([]any, len(m))
		for i, x := range m {
			out[i] = canon(x)
		}
		return out
	case map[string]any:
		out := make(map[string]any, len(m))
		for k, x := range m {
			out[k] = canon(x)
		}
		return out
	}
	return v
}

func mustHex(t *testing.T, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestValueVectorsDecode(t *testing.T) {
	vectors := loadVectors[valueVector](t, "values")
	if len(vectors) < 40 {
		t.Fatalf("only %d value vectors", len(vectors))
	}
	for _, v := range vectors {
		var got any
		if err := Decode(mustHex(t, v.Msgpack), &got); err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if want := canon(untag(t, v.Value)); !reflect.DeepEqual(canon(got), want) {
			t.Errorf("%s: decoded %#v, want %#v", v.Name, canon(got), want)
		}
	}
}

func TestValueVectorsEncode(t *testing.T) {
	for _, v := range loadVectors[valueVector](t, "values") {
		if v.Encode != nil && !*v.Encode {
			continue
		}
		frame, err := EncodeFrame(untag(t, v.Value))
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if got := hex.EncodeToString(frame[headerSize:]); got != v.Msgpack {
			t.Errorf("%s: encoded %s, want %s", v.Name, got, v.Msgpack)
		}
	}
}

func TestMessageVectorsDecode(t *testing.T) {
	for _, v := range loadVectors[messageVector](t, "messages") {
		frame := mustHex(t, v.Frame)
		body, err := ReadFrame(bytes.NewReader(frame), 1<<20)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		var got any
		if err := Decode(body, &got); err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if want := canon(untag(t, v.Message)); !reflect.DeepEqual(canon(got), want) {
			t.Errorf("%s: decoded %#v, want %#v", v.Name, canon(got), want)
		}
		if v.Direction == "worker_to_host" { // and the typed envelope this client reads
			var msg message
			if err := Decode(body, &msg); err != nil || msg.Type == "" {
				t.Errorf("%s: envelope %+v, %v", v.Name, msg, err)
			}
		}
	}
}

// Host messages built with this client's own request struct must be byte-identical to the vectors.
func TestMessageVectorsEncode(t *testing.T) {
	checked := 0
	for _, v := range loadVectors[messageVector](t, "messages") {
		if v.Direction != "host_to_worker" {
			continue
		}
		m := untag(t, v.Message).(map[string]any)
		var msg any = m
		if id, ok := m["id"].(int64); ok { // the client's own struct (it only sends integer ids)
			req := request{ID: uint64(id), Type: m["type"].(string)}
			req.Method, _ = m["method"].(string)
			req.Params, _ = m["params"].(map[string]any)
			req.Stream, _ = m["stream"].(bool)
			req.TimeoutMS, _ = m["timeout_ms"].(int64)
			req.TimeoutProfile, _ = m["timeout_profile"].(string)
			msg = &req
		}
		frame, err := EncodeFrame(msg)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if got := hex.EncodeToString(frame); got != v.Frame {
			t.Errorf("%s: encoded\n %s, want\n %s", v.Name, got, v.Frame)
		}
		checked++
	}
	if checked < 5 {
		t.Fatalf("only %d host messages", checked)
	}
}

func TestReadFrameRefusesOversize(t *testing.T) {
	if _, err := ReadFrame(bytes.NewReader(mustHex(t, "00000100")), 16); !HasCode(err, "protocol_error") {
		t.Fatalf("got %v", err)
	}
}

func TestLocalValidation(t *testing.T) {
	err := (&SamplingParams{Temperature: Ptr(-1.0)}).Validate()
	if !HasCode(err, "invalid_params") || err.(*Error).Details["field"] != "temperature" {
		t.Fatalf("got %v", err)
	}
	opts := &GenerateOptions{SamplingParams: []*SamplingParams{{}, {TopP: Ptr(2.0)}}}
	if err := opts.Validate(); err == nil || err.(*Error).Details["field"] != "sampling_params[1].top_p" {
		t.Fatalf("got %v", err)
	}
	// by value too: the fields of a SamplingParams (or []SamplingParams) in an `any` field are checked
	byValue := &GenerateOptions{SamplingParams: SamplingParams{TopP: Ptr(3.0)}}
	if err := byValue.Validate(); err == nil || err.(*Error).Details["field"] != "sampling_params.top_p" {
		t.Fatalf("got %v", err)
	}
	byValue = &GenerateOptions{SamplingParams: []SamplingParams{{}, {Temperature: Ptr(-1.0)}}}
	if err := byValue.Validate(); err == nil || err.(*Error).Details["field"] != "sampling_params[1].temperature" {
		t.Fatalf("got %v", err)
	}
	if err := (&GenerateOptions{SamplingParams: SamplingParams{TopP: Ptr(0.5)}}).Validate(); err != nil {
		t.Fatal(err)
	}
	// an open lower bound (exclusive_min): top_p=0 fails here, as the worker would fail it; top_p=1 passes
	err = (&SamplingParams{TopP: Ptr(0.0)}).Validate()
	if !HasCode(err, "invalid_params") || err.(*Error).Details["field"] != "top_p" ||
		err.(*Error).Message != "top_p: must be > 0, got 0" {
		t.Fatalf("got %v", err)
	}
	if err := (&SamplingParams{TopP: Ptr(1.0), RepetitionPenalty: Ptr(0.5)}).Validate(); err != nil {
		t.Fatal(err)
	}
	if err := (&GenerateOptions{SamplingParams: 3}).Validate(); !HasCode(err, "invalid_params") {
		t.Fatalf("got %v", err)
	}
	if err := (&EngineOptions{Dtype: Ptr("float64")}).Validate(); !HasCode(err, "invalid_params") {
		t.Fatalf("got %v", err)
	}
}
