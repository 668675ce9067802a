package lmport

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"reflect"
	"strings"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// Wire protocol v1 on the host side. A frame is a 4-byte unsigned big-endian length N, then N bytes holding
// one msgpack map. Map keys are written sorted (struct fields are declared in that order), as in tests/vectors.
const headerSize = 4

// EncodeFrame encodes one message as a frame (header + msgpack body).
func EncodeFrame(message any) ([]byte, error) {
	var buf bytes.Buffer
	buf.Write(make([]byte, headerSize))
	enc := msgpack.NewEncoder(&buf)
	enc.UseCompactInts(true)
	enc.SetSortMapKeys(true)
	if err := enc.Encode(message); err != nil {
		return nil, err
	}
	frame := buf.Bytes()
	size := len(frame) - headerSize
	if uint64(size) > 0xffffffff {
		return nil, fmt.Errorf("frame of %d bytes is too long", size)
	}
	binary.BigEndian.PutUint32(frame, uint32(size))
	return frame, nil
}

// ReadFrame reads one frame's body; io.EOF only at a frame boundary, io.ErrUnexpectedEOF mid-frame.
func ReadFrame(r io.Reader, maxBytes uint32) ([]byte, error) {
	var header [headerSize]byte
	if _, err := io.ReadFull(r, header[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(header[:])
	if size > maxBytes {
		return nil, &Error{Code: "protocol_error", Message: fmt.Sprintf("frame of %d bytes (limit %d)", size, maxBytes)}
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return body, nil
}

// Decode decodes a msgpack body into out. Dynamic values (any, maps, lists) come out as map[string]any,
// []any, int64 (uint64 above the int64 range), float64, string, []byte (msgpack bin), bool and nil. Integers are
// int64 whichever msgpack type carries them: Python's msgpack writes every int above 127 as an unsigned type.
func Decode(body []byte, out any) error {
	dec := msgpack.NewDecoder(bytes.NewReader(body))
	dec.UseLooseInterfaceDecoding(true)
	switch o := out.(type) {
	case *any:
		v, err := decodeAny(dec)
		*o = v
		return err
	case *map[string]any:
		v, err := decodeAny(dec)
		if err == nil {
			*o, err = asMap(v)
		}
		return err
	case *Handle:
		v, err := decodeAny(dec)
		if err == nil {
			*(*map[string]any)(o), err = asMap(v)
		}
		return err
	case *[]map[string]any:
		v, err := decodeAny(dec)
		if err != nil || v == nil {
			return err
		}
		list, ok := v.([]any)
		if !ok {
			return fmt.Errorf("expected a list of maps, got %T", v)
		}
		*o = make([]map[string]any, len(list))
		for i, item := range list {
			if (*o)[i], err = asMap(item); err != nil {
				return err
			}
		}
		return nil
	}
	// typed targets: structs, []int, string, ...; their any and map[string]any parts hold what the library's loose
	// decoding made, so its uint64s are made int64 afterwards
	if err := dec.Decode(out); err != nil {
		return err
	}
	if v := reflect.ValueOf(out); v.IsValid() && holdsAny(v.Type()) {
		fixInts(v)
	}
	return nil
}

// signedInt is x with an unsigned integer that fits int64 (what the library's loose decoding makes of msgpack's
// unsigned types) made int64, and the maps and lists x holds fixed in place the same way.
func signedInt(x any) any {
	switch v := x.(type) {
	case uint64:
		if v <= math.MaxInt64 {
			return int64(v)
		}
	case map[string]any:
		for k, item := range v {
			v[k] = signedInt(item)
		}
	case map[any]any:
		for k, item := range v {
			v[k] = signedInt(item)
		}
	case []any:
		for i, item := range v {
			v[i] = signedInt(item)
		}
	}
	return x
}

// fixInts applies signedInt to every empty-interface value inside v (a decoded typed target), skipping the parts
// whose type holds none (token id lists, strings, ...).
func fixInts(v reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() && holdsAny(v.Type().Elem()) {
			fixInts(v.Elem())
		}
	case reflect.Interface:
		if !v.IsNil() && v.CanSet() {
			if n, ok := v.Elem().Interface().(uint64); ok && n <= math.MaxInt64 {
				v.Set(reflect.ValueOf(int64(n)))
			} else {
				signedInt(v.Elem().Interface()) // maps and lists: in place
			}
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if f := v.Field(i); f.CanSet() && holdsAny(f.Type()) {
				fixInts(f)
			}
		}
	case reflect.Slice, reflect.Array:
		for i := 0; i < v.Len(); i++ {
			fixInts(v.Index(i))
		}
	case reflect.Map:
		if m, ok := v.Interface().(map[string]any); ok {
			signedInt(m)
			return
		}
		iter := v.MapRange()
		for iter.Next() {
			item := reflect.New(v.Type().Elem()).Elem()
			item.Set(iter.Value())
			fixInts(item)
			v.SetMapIndex(iter.Key(), item)
		}
	}
}

var holdsAnyCache sync.Map // reflect.Type -> bool

// holdsAny reports whether a value of type t may hold an empty interface value (through its pointers, exported
// fields, elements or map values).
func holdsAny(t reflect.Type) bool {
	if cached, ok := holdsAnyCache.Load(t); ok {
		return cached.(bool)
	}
	holds := holdsAnyIn(t, map[reflect.Type]bool{})
	holdsAnyCache.Store(t, holds)
	return holds
}

func holdsAnyIn(t reflect.Type, seen map[reflect.Type]bool) bool {
	if seen[t] { // a recursive type: whatever it holds is found where it first appeared
		return false
	}
	seen[t] = true
	switch t.Kind() {
	case reflect.Interface:
		return t.NumMethod() == 0
	case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Map:
		return holdsAnyIn(t.Elem(), seen)
	case reflect.Struct:
		for i := 0; i < t.NumField(); i++ {
			if f := t.Field(i); f.IsExported() && holdsAnyIn(f.Type, seen) {
				return true
			}
		}
	}
	return false
}

func asMap(v any) (map[string]any, error) {
	m, ok := v.(map[string]any)
	if !ok && v != nil {
		return nil, fmt.Errorf("expected a map, got %T", v)
	}
	return m, nil
}

// decodeAny is the library's loose decoding, except that bin stays []byte (the library makes it a string) and
// unsigned integers that fit int64 are int64.
func decodeAny(d *msgpack.Decoder) (any, error) {
	c, err := d.PeekCode()
	if err != nil {
		return nil, err
	}
	switch {
	case msgpcode.IsBin(c):
		return d.DecodeBytes()
	case msgpcode.IsFixedMap(c) || c == msgpcode.Map16 || c == msgpcode.Map32:
		n, err := d.DecodeMapLen()
		if err != nil {
			return nil, err
		}
		m := make(map[string]any, n)
		for i := 0; i < n; i++ {
			key, err := d.DecodeString()
			if err != nil {
				return nil, fmt.Errorf("map key: %w", err)
			}
			if m[key], err = decodeAny(d); err != nil {
				return nil, err
			}
		}
		return m, nil
	case msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32:
		n, err := d.DecodeArrayLen()
		if err != nil {
			return nil, err
		}
		list := make([]any, n)
		for i := range list {
			if list[i], err = decodeAny(d); err != nil {
				return nil, err
			}
		}
		return list, nil
	}
	v, err := d.DecodeInterfaceLoose()
	return signedInt(v), err
}

// decodeResult decodes a result, a stream delta or a stream summary into out (a pointer); its protocol_error names
// what was decoded, the target type and, where it can be found, the field that does not decode, e.g. "cannot
// decode generate result into []lmport.RequestOutput at [0].outputs[0].token_ids: msgpack: ...".
func decodeResult(what string, body []byte, out any) *Error {
	err := Decode(body, out)
	if err == nil {
		return nil
	}
	target, at := fmt.Sprintf("%T", out), ""
	if t := reflect.TypeOf(out); t != nil && t.Kind() == reflect.Pointer {
		target = t.Elem().String()
		if path := strings.TrimPrefix(decodePath(body, t.Elem()), "."); path != "" {
			at = " at " + path
		}
	}
	return &Error{Code: "protocol_error", Message: fmt.Sprintf("cannot decode %s into %s%s: %v", what, target, at, err)}
}

// decodePath finds the innermost struct field or list element of body that does not decode into its part of t:
// ".field[2].other" (msgpack names), or "" when the failure is not inside a struct or list.
func decodePath(body []byte, t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	fails := func(raw []byte, t reflect.Type) bool { // a msgpack nil comes out of RawMessage empty: it decodes
		return len(raw) > 0 && Decode(raw, reflect.New(t).Interface()) != nil
	}
	switch t.Kind() {
	case reflect.Struct:
		var fields map[string]msgpack.RawMessage
		if msgpack.Unmarshal(body, &fields) != nil {
			return ""
		}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("msgpack"), ",")
			if name == "" {
				name = f.Name
			}
			if raw, ok := fields[name]; ok && f.IsExported() && name != "-" && fails(raw, f.Type) {
				return "." + name + decodePath(raw, f.Type)
			}
		}
	case reflect.Slice, reflect.Array:
		var items []msgpack.RawMessage
		if msgpack.Unmarshal(body, &items) != nil {
			return ""
		}
		for i, raw := range items {
			if fails(raw, t.Elem()) {
				return fmt.Sprintf("[%d]", i) + decodePath(raw, t.Elem())
			}
		}
	}
	return ""
}
