# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: install system-deps serve test fuzz lint bench bench-quick gpu-check loadtest docker-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Torch is pinned here (a local CPU wheel); pyproject keeps the range open for CUDA builds.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/s4serve serve --host $(HOST) --port $(PORT)

# Debian packages the suite uses for real: installed when root, else the exact command to run.
system-deps:
	bash tests/system-deps.sh

test: system-deps install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The fuzz tests with a long budget (make test runs them with 60 examples per property).
FUZZ_EXAMPLES ?= 2000
fuzz: install
	S4SERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q \
		tests/server/test_fuzz_parsers.py tests/server/test_fuzz_sockets.py

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/s4serve bench --out BENCHMARKS.md

bench-quick: install
	$(BIN)/s4serve bench --quick --out /tmp/s4serve-bench-quick.md

# On a machine with a CUDA GPU (and a CUDA build of torch: TORCH_SPEC=torch make install):
# correctness vs float64, the B=64 x L=16000 timing, a real server on --device cuda.
GPU_DEVICE ?= cuda
gpu-check: install
	$(BIN)/python -m loadtest.bench.gpu_check --device $(GPU_DEVICE)

loadtest: install
	$(BIN)/s4serve loadtest stream --url http://$(HOST):$(PORT) --model motion --sessions 100 --rate 100 --hold 10 --png-out loadtest.png

docker-smoke: install
	bash deploy/docker/smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
