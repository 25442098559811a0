# The two commands of the README: `make demo` and `make test`. Both set up what they need.
# SHARED (or $EDGE_AGENT_SHARED): the optional research data folder holding data/faces/, the
# labelled face crops some tests and `--scene` need; without it those tests are skipped.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?=
SHARED_ENV := $(if $(SHARED),EDGE_AGENT_SHARED=$(abspath $(SHARED)))
DEMO_ARGS ?=

.PHONY: demo test system-deps bench
system-deps:
	scripts/install-system-deps

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# setuptools reports each editable install as a warning; it is information only
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[test]'
	touch $@

demo: system-deps $(VENV)/.installed
	$(SHARED_ENV) $(PY) -m edge_agent demo $(DEMO_ARGS)

# The tiers that boot containers run in a pytest process of their own, after the rest.
SYSTEM_TESTS := tests/test_systemd.py tests/test_ansible.py
test: system-deps $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(SHARED_ENV) $(PY) -m pytest -q -ra $(addprefix --ignore=,$(SYSTEM_TESTS))
	$(SHARED_ENV) $(PY) -m pytest -q -ra $(SYSTEM_TESTS)

bench: $(VENV)/.installed
	$(SHARED_ENV) $(PY) -m edge_agent bench

# The arm64 tier: the agent installed into Debian arm64 under qemu-user-static, compared with this
# machine's run (tests/test_arm64.py; the root, wheels and venv are cached).
.PHONY: test-arm64
test-arm64: system-deps $(VENV)/.installed
	EDGE_AGENT_ARM64=1 $(SHARED_ENV) $(PY) -m pytest -q -ra -s tests/test_arm64.py
