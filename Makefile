# Two entry points for a fresh machine (see README): `make chat` and `make test`.
# Both create .venv and install into it; pip's wheel cache keeps llama-cpp-python's one
# llama.cpp build (about 12 minutes on 2 cores) for every later install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CAA := $(VENV)/bin/caa-local
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
# llama.cpp's RPC backend (caa-local rpc-worker, --rpc) is built into the one cached llama-cpp-python wheel.
export CMAKE_ARGS ?= -DGGML_RPC=ON
# llama.cpp builds for the CPU it is built on; some VMs advertise AMX in CPUID without enabling
# it, and the first prompt batch then dies with SIGILL (tilezero): build without AMX.
ifeq ($(shell uname -m),x86_64)
export CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CXXFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif

.PHONY: install dev chat test test-fast vectors report bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install -e .

dev: $(PY)
	$(PIP) install -c constraints-dev.txt -e '.[extract,serve,dev]'

chat: install
	$(CAA) chat --vector sentiment

test: dev
	$(PY) -m pytest

# The tests that need no model, server or subprocess (under a minute).
test-fast: dev
	$(PY) -m pytest -m "not slow"

vectors: dev
	$(PY) scripts/make_vectors.py

report: dev
	$(CAA) eval report --out report --force

bench: dev
	$(CAA) bench --threads 0 --json bench.json --markdown perf.md --force

clean:
	rm -rf build .pytest_cache
