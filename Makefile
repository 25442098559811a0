# The two commands of the README: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: demo test system-deps bench
system-deps:
	scripts/install-system-deps

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: system-deps $(VENV)/.installed
	$(PY) -m edge_agent demo --shared $(SHARED)

test: system-deps $(VENV)/.installed
	$(PY) -m ruff check .
	EDGE_AGENT_SHARED=$(SHARED) $(PY) -m pytest -q -ra

bench: $(VENV)/.installed
	$(PY) -m edge_agent bench --shared $(SHARED)
