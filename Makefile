VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test serve bench-plan bench-serve clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: the local CPU build; an unpinned torch would pull GBs of CUDA wheels
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The demo: trains the demo model on first use (~2.5 min), starts a simulated heterogeneous Ray cluster on this
# machine (logical GPUs typed T4 and V100), plans it and serves the 2-stage pipeline on port 8000. Ctrl-C stops it all.
serve: $(STAMP)
	$(VENV)/bin/llmpq demo-model --arch llama
	@echo
	@echo "Starting llmpq-serve on http://localhost:8000 (ready when /healthz answers). Then, from another shell:"
	@echo "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"model\": \"demo-llama\", \"prompt\": \"def main():\", \"max_tokens\": 32, \"temperature\": 0}'"
	@echo "  curl -N localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"import os\"}], \"max_tokens\": 32, \"stream\": true}'"
	@echo "  curl localhost:8000/v1/plan"
	@echo "The router also serves the same API on its own port, 30000, without Serve's proxy hop (faster)."
	@echo
	$(PY) -m deployments.simulated_cluster deployments/demo.yaml --gpus T4 V100

bench-plan: $(STAMP)
	$(VENV)/bin/llmpq bench plan --clusters ../shared/paper_clusters.yaml

bench-serve: $(STAMP)
	$(PY) benchmarks/serve_throughput.py --json

clean:
	rm -rf $(VENV)
