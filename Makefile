# Every target creates the virtual environment it needs, so a fresh clone
# only ever runs `make run` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := protos/headway/v1/progress.proto
GEN_DIR := client

.PHONY: venv chromium run test demo bench bench-quick proto proto-check lint format typecheck check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The dashboard and HTTP/JSON API too, on loopback: http://127.0.0.1:8080/
HTTP_LISTEN ?= 127.0.0.1:8080

run: $(STAMP)
	$(PY) -m headway_server serve --http-listen $(HTTP_LISTEN) $(ARGS)

# A server, a simulated multi-stage job, and `headway watch` following it live.
demo: $(STAMP)
	$(PY) examples/demo.py

# Headway against bare grpc.aio baselines, side by side; writes bench/results/ (<= 10 min).
bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

# The dashboard's browser tests drive Debian's Chromium. As root (CI is), this
# installs the package when it is missing; elsewhere those tests skip and say
# how to install it.
CHROMIUM ?= /usr/bin/chromium

chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: $(STAMP) chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# The one codegen command: python, grpc and typed (.pyi) stubs from protos/.
proto: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos \
		--python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
		--mypy_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO_SRC)

# Fails when the committed generated code differs from what protos/ gives.
proto-check: $(STAMP)
	$(PY) -m pytest -q tests/test_generated_code.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info server/*.egg-info client/*.egg-info
