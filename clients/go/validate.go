package lmport

import (
	"fmt"
	"reflect"
	"strings"
)

// The generated Validate methods call these with the manifest's constraints, so a bad option fails before
// anything is sent, worded like the worker's invalid_params answer.

func checkMin(field string, v, min float64) error {
	if v < min {
		return invalidParam(field, "must be >= %v, got %v", min, v)
	}
	return nil
}

// checkMinExclusive is checkMin for an open lower bound (exclusive_min in the manifest): min itself fails.
func checkMinExclusive(field string, v, min float64) error {
	if v <= min {
		return invalidParam(field, "must be > %v, got %v", min, v)
	}
	return nil
}

func checkMax(field string, v, max float64) error {
	if v > max {
		return invalidParam(field, "must be <= %v, got %v", max, v)
	}
	return nil
}

func checkChoice[T comparable](field string, v T, choices ...T) error {
	for _, c := range choices {
		if v == c {
			return nil
		}
	}
	return invalidParam(field, "must be one of %v, got %v", choices, v)
}

// checkType validates a value of a union-typed field (held as any) against the manifest type string, and
// the fields of any generated struct inside it (a *SamplingParams or a []*SamplingParams, or the same by value).
func checkType(field string, v any, typ string) error {
	if v == nil {
		return nil
	}
	if !matchesType(reflect.ValueOf(v), typ) {
		return invalidParam(field, "expected %s, got %T", typ, v)
	}
	return validateNested(field, reflect.ValueOf(v))
}

// validator is implemented by (a pointer to) every generated option struct.
type validator interface{ validate(prefix string) error }

var validatorType = reflect.TypeOf((*validator)(nil)).Elem()

func validateNested(field string, v reflect.Value) error {
	if v.Kind() == reflect.Interface && !v.IsNil() {
		v = v.Elem()
	}
	if val, ok := v.Interface().(validator); ok {
		return val.validate(field + ".")
	}
	if v.Kind() != reflect.Pointer && reflect.PointerTo(v.Type()).Implements(validatorType) {
		// a struct passed by value (SamplingParams, not *SamplingParams): validate a copy through a pointer
		p := reflect.New(v.Type())
		p.Elem().Set(v)
		return p.Interface().(validator).validate(field + ".")
	}
	if v.Kind() == reflect.Slice {
		for i := 0; i < v.Len(); i++ {
			if err := validateNested(fmt.Sprintf("%s[%d]", field, i), v.Index(i)); err != nil {
				return err
			}
		}
	}
	return nil
}

func matchesType(v reflect.Value, typ string) bool {
	for _, alt := range splitUnion(typ) {
		if matchesOne(v, alt) {
			return true
		}
	}
	return false
}

func matchesOne(v reflect.Value, typ string) bool {
	for v.Kind() == reflect.Interface || v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return typ == "null" || typ == "any"
		}
		v = v.Elem()
	}
	if strings.HasPrefix(typ, "list[") && strings.HasSuffix(typ, "]") {
		if v.Kind() != reflect.Slice && v.Kind() != reflect.Array {
			return false
		}
		for i := 0; i < v.Len(); i++ {
			if !matchesType(v.Index(i), typ[len("list["):len(typ)-1]) {
				return false
			}
		}
		return true
	}
	switch typ {
	case "str":
		return v.Kind() == reflect.String
	case "int":
		return v.CanInt() || v.CanUint()
	case "float":
		return v.CanInt() || v.CanUint() || v.CanFloat()
	case "bool":
		return v.Kind() == reflect.Bool
	case "null":
		return false
	case "dict":
		return v.Kind() == reflect.Map || v.Kind() == reflect.Struct
	case "list":
		return v.Kind() == reflect.Slice || v.Kind() == reflect.Array
	case "handle":
		if v.Kind() == reflect.String {
			return true
		}
		if v.Kind() != reflect.Map || v.Type().Key().Kind() != reflect.String {
			return false
		}
		ref := v.MapIndex(reflect.ValueOf("ref"))
		return ref.IsValid() && matchesOne(ref, "str")
	}
	return true // "any" and unknown types accept anything
}

// splitUnion splits "a|list[b|c]" at top-level bars only.
func splitUnion(typ string) []string {
	var parts []string
	depth, start := 0, 0
	for i, c := range typ {
		switch c {
		case '[':
			depth++
		case ']':
			depth--
		case '|':
			if depth == 0 {
				parts = append(parts, strings.TrimSpace(typ[start:i]))
				start = i + 1
			}
		}
	}
	return append(parts, strings.TrimSpace(typ[start:]))
}
