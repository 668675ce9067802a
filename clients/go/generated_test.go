package lmport

import (
	"bytes"
	"go/format"
	"os"
	"testing"
)

// The generator (lmport/bridge/codegen/go.py) must emit gofmt-clean code; its staleness is checked on the Python side.
func TestGeneratedCodeIsGofmtClean(t *testing.T) {
	for _, name := range []string{"generated_api.go", "generated_types.go"} {
		src, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		formatted, err := format.Source(src)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(src, formatted) {
			t.Errorf("%s is not gofmt-clean: fix lmport/bridge/codegen/go.py", name)
		}
	}
}
