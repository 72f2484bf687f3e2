# Two commands on a fresh machine:  `make demo`  and  `make test`  (each does its own set-up).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on this machine's disk; pinning it keeps pip from a multi-GB CUDA download.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,tvm,bench,quant]" "$(TORCH_PIN)"
	touch $@

demo: setup
	$(VENV)/bin/kiln compile examples/models/resnet.py:make_model -o out/resnet18
	$(VENV)/bin/kiln run out/resnet18 --check

test: setup
	$(PY) -m pytest -m "not slow"

# Slow suites (big sweeps); exit code 5 means "nothing selected", which is not a failure here.
test-slow: setup
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

lint: setup
	$(VENV)/bin/ruff check kiln examples tests scripts benchmarks

clean:
	rm -rf out .kiln-debug
