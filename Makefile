# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv from uv.lock first if it is missing or out of date.
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: demo test test-slow test-nemo2 lint

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

# NeMo 2 (nemo-toolkit 2.6 and 2.7, both on Megatron-Core 0.15), each in its own environment,
# envs/nemo-2.x/.venv; megatron_eaft from this checkout. --confcutdir keeps tests/conftest.py
# (the main environment's) out.
NEMO2_ENVS := envs/nemo-2.6 envs/nemo-2.7

envs/%/.venv/.synced: envs/%/pyproject.toml envs/%/uv.lock tools/setup_env.sh
	bash tools/setup_env.sh envs/$*
	touch $@

test-nemo2: $(NEMO2_ENVS:%=%/.venv/.synced)
	for env in $(NEMO2_ENVS); do \
		echo "== tests/nemo2 in $$env"; \
		PYTHONPATH=$(CURDIR) $$env/.venv/bin/python -m pytest -q -p no:cacheprovider \
			--confcutdir=tests/nemo2 tests/nemo2 || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
