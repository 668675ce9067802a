package lmport

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

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
// []any, int64 (uint64 above the int64 range), float64, string, []byte (msgpack bin), bool and nil.
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
	return dec.Decode(out) // typed targets: structs, []int, string, ...
}

func asMap(v any) (map[string]any, error) {
	m, ok := v.(map[string]any)
	if !ok && v != nil {
		return nil, fmt.Errorf("expected a map, got %T", v)
	}
	return m, nil
}

// decodeAny is the library's loose decoding, except that bin stays []byte (the library makes it a string).
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
	return d.DecodeInterfaceLoose()
}
