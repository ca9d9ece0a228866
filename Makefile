# The two commands of the README. Both work on a fresh Debian machine (as root or with sudo).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	bash infra/install-postgres.sh
	bash infra/install-ha.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# main job on the embedded default: a local 4-node cluster, a 30 s load run (1,000
# tenants, 3-step workflows) with a live dashboard, a report in results/ (summary.json,
# report.md, .hgrm, PNG plots) and the summary printed
demo: setup
	$(VENV)/bin/shardflow cluster up --nodes 4
	$(VENV)/bin/shardflow bench --rate 100 --duration 30 --tenants 1000 --steps 3 --json results/demo-summary.json

# a smaller in-process demo: 2,000 workflows and an audit
demo-small: setup
	$(VENV)/bin/shardflow demo

# the whole test suite on real Postgres processes (a 3-node cluster per test process)
test: setup
	$(VENV)/bin/ruff check shardflow tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n 2 -q

lint: setup
	$(VENV)/bin/ruff check shardflow tests
	$(VENV)/bin/mypy

clean:
	-$(VENV)/bin/shardflow cluster down --purge
	rm -rf $(VENV)
