# Set-up on a fresh machine: `make demo` or `make test` creates .venv on first use.
# Without a CUDA GPU, torch's CPU build is installed (pip takes it from this machine's disk).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: demo test test-fast venv clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch from PyPI"; $(PY) -m pip install -q torch; \
	else \
		echo "no CUDA GPU: installing torch's CPU build ($(TORCH_CPU))"; $(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/tunelab demo

# the report test renders HTML in headless Chromium (Debian's package; installed when run as root)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) ; } || \
		echo "chromium not installed: the report's browser test will be skipped"

test: $(VENV)/.installed chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
