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

# The whole pipeline without Docker, from a fresh clone: demo catalog -> DSSM retriever -> TDM reranker -> HNSW index
# -> the API on :$(DEMO_PORT). Every step runs every time (retraining the demo takes about two minutes on one core); the
# index step is a no-op when the published index already matches the newest DSSM bundle.
# `make demo QUIVER_MODEL=sasrec_demo` serves the SASRec retriever (configs/sasrec_demo.yaml) instead of the DSSM;
# the DSSM is trained either way, since the TDM reranker learns from its candidates.
DEMO_PORT ?= 8000
DEMO_MODEL := $(or $(QUIVER_MODEL),dssm_demo)
DEMO_ENV := QUIVER_ARTIFACTS=$(CURDIR)/artifacts QUIVER_MODEL=$(DEMO_MODEL) QUIVER_RANKER=tdm_demo QUIVER_PORT=$(DEMO_PORT)

# Prints curl examples with ids read from the generated catalog (a real user, real items).
define DEMO_CURL
import json, sys
import pyarrow.parquet as pq

data, port = "artifacts/demo-data", sys.argv[1]
user = pq.read_table(f"{data}/users.parquet", columns=["user_id"])["user_id"][0].as_py()
items = pq.read_table(f"{data}/items.parquet", columns=["item_id"])["item_id"].to_pylist()[:5]
for path, body in (
    ("recall", {"user_id": user, "k": 10, "rerank": True}),
    ("rank", {"user_id": user, "candidates": items, "k": 3}),
):
    print(f"  curl -s -X POST http://127.0.0.1:{port}/{path} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
endef
export DEMO_CURL

demo: $(VENV)/.installed
	@echo "== demo 1/6: synthetic catalog -> artifacts/demo-data"
	$(VENV)/bin/quiver-train demo-data --out artifacts/demo-data
	@echo "== demo 2/6: retriever $(DEMO_MODEL) -> artifacts/models/$(DEMO_MODEL)"
	$(VENV)/bin/quiver-train fit --config configs/dssm_demo.yaml
	$(if $(filter-out dssm_demo,$(DEMO_MODEL)),$(VENV)/bin/quiver-train fit --config configs/$(DEMO_MODEL).yaml)
	@echo "== demo 3/6: offline evaluation of $(DEMO_MODEL) (vs popularity)"
	$(VENV)/bin/quiver-train eval --bundle artifacts/models/$(DEMO_MODEL)
	@echo "== demo 4/6: TDM reranker over dssm_demo -> artifacts/models/tdm_demo"
	$(VENV)/bin/quiver-train fit --config configs/tdm_demo.yaml
	@echo "== demo 5/6: HNSW index of $(DEMO_MODEL) -> artifacts/indexes/$(DEMO_MODEL)"
	$(DEMO_ENV) $(VENV)/bin/quiver-index rebuild --model $(DEMO_MODEL) --index auto --no-progress
	@echo "== demo 6/6: quiver-serve on http://127.0.0.1:$(DEMO_PORT) (Ctrl-C stops it). Once /readyz answers, try:"
	@$(PY) -c "$$DEMO_CURL" $(DEMO_PORT)
	@echo "  curl -s http://127.0.0.1:$(DEMO_PORT)/readyz"
	@echo "  curl -s http://127.0.0.1:$(DEMO_PORT)/metrics | grep -E '^quiver_(model_info|index_items)'"
	exec env $(DEMO_ENV) $(VENV)/bin/quiver-serve

bench-quality: $(VENV)/.installed
	$(PY) bench/quality.py --config configs/dssm_ml1m.yaml

bench-train-speed: $(VENV)/.installed
	$(PY) bench/train_speed.py

clean:
	rm -rf artifacts/ reports/ build/ dist/ .pytest_cache/ .ruff_cache/ *.egg-info/
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
