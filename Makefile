# Two commands on a fresh machine with only Python 3.11:  `make demo`  and  `make test`.
# uv is bootstrapped from PyPI into .tools/ when it is not on PATH; dependencies come from uv.lock.
PYTHON ?= python3.11
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen --no-sync

.PHONY: setup demo test check lint browser postgres bench docs clean

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

# --compile-bytecode: every command imports Prefect, MLflow or GX; compiling their ~14k files once here
# halves each command's import CPU (where PYTHONDONTWRITEBYTECODE is set, Python never caches them itself).
.venv/.synced: $(if $(findstring .tools,$(UV)),.tools/bin/uv) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

setup: .venv/.synced  ## create .venv with the locked dependencies

demo: setup  ## the whole pipeline on data_samples/, then a live service scored over HTTP
	$(RUN) scfrisk demo --source data_samples/platform

browser:  ## Debian's chromium, for the test that renders the risk report in a real browser
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "warning: chromium could not be installed; the browser rendering test will be skipped"

postgres:  ## Debian's PostgreSQL server, for the tests that pull from a real database (each run starts its own cluster)
	@{ command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 ; } || \
	  { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) ; } || \
	  echo "warning: PostgreSQL could not be installed; the tests of the PostgreSQL source will be skipped"

lint: setup  ## ruff (pyflakes, pycodestyle, import order, bugbear) and import-linter (the floors), rules in pyproject.toml
	$(RUN) ruff check core features models explanation credit reporting serving pipelines simulator testkit benchmarks tests
	$(RUN) lint-imports

# pytest-xdist on 4 or more cores: half as many workers (a test starts servers, clusters and processes of its
# own), a module per worker at a time (tests/conftest.py); on fewer cores one process, as workers only add
# their own servers. `make test TEST_WORKERS=0` turns it off.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -ge 4 ] && echo $$((n / 2)) || echo 0)

test: setup browser postgres lint  ## the lint, then the whole test suite
	$(RUN) pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

check: setup browser postgres lint  ## the lint, then the tests not marked slow: the loop while working
	$(RUN) pytest -m "not slow" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

bench: setup  ## benchmarks; figures go to docs/benchmarks.md
	$(RUN) python -m benchmarks

docs: setup  ## regenerate docs/data.md and docs/features.md from the code
	$(RUN) python -m pipelines.docs

clean:  ## stop the workspace's Prefect server, then remove the workspace and the environments
	-[ -x .venv/bin/scfrisk ] && .venv/bin/scfrisk server stop
	rm -rf .scfrisk .venv .tools
