package lmport

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// findPython picks the worker's interpreter: the option, then LMPORT_PYTHON, then the nearest project
// .venv/bin/python above the working directory or above this package's source (a checkout of lmport). root is
// that project (put on PYTHONPATH so that `-m lmport.bridge.worker` imports from a source checkout), empty otherwise.
func findPython(option string) (python, root string, err error) {
	if option != "" {
		return option, "", nil
	}
	if env := os.Getenv("LMPORT_PYTHON"); env != "" {
		return env, "", nil
	}
	var starts []string
	if cwd, err := os.Getwd(); err == nil {
		starts = append(starts, cwd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, start := range starts {
		for dir := start; ; dir = filepath.Dir(dir) {
			candidate := filepath.Join(dir, ".venv", "bin", "python")
			if info, err := os.Stat(candidate); err == nil && info.Mode()&0o111 != 0 {
				return candidate, dir, nil
			}
			if filepath.Dir(dir) == dir {
				break
			}
		}
	}
	return "", "", &Error{Code: "spawn_failed", Message: "no Python found for the lmport worker: set " +
		"Options.Python or LMPORT_PYTHON, or create a .venv in the project (searched upwards from " +
		strings.Join(starts, " and ") + ")"}
}
