VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install system-deps test lint demo bench-quality bench-train-speed clean

install: $(VENV)/.installed

# torch goes in first and pinned: pip resolves 2.13.0 from the local CPU wheel, and the project's torch range is then
# already satisfied. An unpinned torch would pull a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $@

# redis-server backs the service tests; Debian's package, installed only when missing.
system-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
		else \
			echo "redis-server is missing: install it with 'sudo apt-get install redis-server'" >&2; exit 1; \
		fi; \
	fi

test: system-deps $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(VENV)/.installed
	$(VENV)/bin/quiver-train demo-data --out artifacts/demo-data
	$(VENV)/bin/quiver-train fit --config configs/dssm_demo.yaml
	$(VENV)/bin/quiver-train eval --bundle artifacts/models/dssm_demo

bench-quality: $(VENV)/.installed
	$(PY) bench/quality.py --config configs/dssm_ml1m.yaml

bench-train-speed: $(VENV)/.installed
	$(PY) bench/train_speed.py

clean:
	rm -rf artifacts/ reports/ build/ dist/ .pytest_cache/ .ruff_cache/ *.egg-info/
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
