# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv from uv.lock first if it is missing or out of date.
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: demo test test-slow lint

$(STAMP): pyproject.toml uv.lock tools/setup_env.sh
	bash tools/setup_env.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megatron-eaft demo

# The environment has megatron.bridge: its adapter tests must run, not skip.
# `make test` is the default suite (under 10 minutes on 2 cores); tests marked `slow` (whole
# third-party training runs) run with `make test-slow`, and CI runs both.
test: $(STAMP)
	MEGATRON_EAFT_REQUIRE_BRIDGE=1 $(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	MEGATRON_EAFT_REQUIRE_BRIDGE=1 $(VENV)/bin/python -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
