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
	$(PY) -m pip install -q -e ".[test,bench,trackers]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/tunelab demo

# the report test renders HTML in headless Chromium (Debian's package; installed when run as root)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) ; } || \
		echo "chromium not installed: the report's browser test will be skipped"

# Two pytest-xdist workers, one compute thread each (tests/conftest.py): stories260K's small matrices do not
# gain from a second intra-op thread, and two workers keep both cores busy through the many process start-ups.
# --dist loadfile keeps a file's tests (and its module fixtures) on one worker; --no-loadscope-reorder hands the
# files out in tests/conftest.py's order (longest first) instead of by their number of tests.
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: $(VENV)/.installed chromium
	$(PYTEST) --durations=15

test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
