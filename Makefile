# Set-up on a fresh machine: `make demo` or `make test` creates .venv on first use.
# Without a CUDA GPU, torch's CPU build is installed (pip takes it from this machine's disk).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: demo test test-fast venv clean chromium gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch from PyPI"; $(PY) -m pip install -q torch; \
	else \
		echo "no CUDA GPU: installing torch's CPU build ($(TORCH_CPU))"; $(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q -e ".[test,bench,trackers,export]"
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

# What bench/gpu_check.py --wheels .whl installs on the GPU machine (Python 3.12, no network there): TRL, datasets
# and liger-kernel for the baselines, and what tunelab needs beyond that machine's image (the versions used here; datasets
# and its small dependencies are tunelab's own since the encoded-data cache).
GPU_WHEELS = trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 liger-kernel==0.8.5 peft==0.21.2 \
	bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 nltk==3.10.4 datasketch==2.0.0
gpu-wheels: $(VENV)/.installed
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2  # an sdist only: built here (pure Python)

clean:
	rm -rf $(VENV) .pytest_cache
