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

# The tiers that boot containers run in a pytest process of their own, after the rest.
SYSTEM_TESTS := tests/test_systemd.py tests/test_ansible.py
test: system-deps $(VENV)/.installed
	$(PY) -m ruff check .
	EDGE_AGENT_SHARED=$(SHARED) $(PY) -m pytest -q -ra $(addprefix --ignore=,$(SYSTEM_TESTS))
	EDGE_AGENT_SHARED=$(SHARED) $(PY) -m pytest -q -ra $(SYSTEM_TESTS)

bench: $(VENV)/.installed
	$(PY) -m edge_agent bench --shared $(SHARED)

# The arm64 tier: the agent installed into Debian arm64 under qemu-user-static, compared with this
# machine's run (tests/test_arm64.py; the root, wheels and venv are cached).
.PHONY: test-arm64
test-arm64: system-deps $(VENV)/.installed
	EDGE_AGENT_ARM64=1 EDGE_AGENT_SHARED=$(SHARED) $(PY) -m pytest -q -ra -s tests/test_arm64.py
