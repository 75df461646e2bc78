# Two commands: `make run` starts the box on the dev ports with its data in ./data; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint unit peers bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	@mkdir -p data
	$(BIN)/letterbox --data ./data serve --listen 127.0.0.1 --port-offset 10000

peers:
	@bash .ci/install-peers

lint: $(STAMP)
	$(BIN)/ruff check appliance web tests bench
	$(BIN)/mypy

# Four workers on two cores: most tests wait on sockets and peers, not the CPU; one file per worker keeps
# its module fixtures together (tests/conftest.py gives each worker its own ports).
test: $(STAMP) peers lint
	$(BIN)/pytest -n 4 --dist loadfile

# Pure and fast: no Debian peers, no subprocesses.
unit: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	@for script in $(basename $(notdir $(filter-out bench/__init__.py bench/benchbox.py,$(wildcard bench/*.py)))); do \
		echo "== bench.$$script"; $(BIN)/python -m bench.$$script || exit 1; done

# Refresh docs/screenshots/ (the README's images): the end-to-end wizard test, writing there.
.PHONY: screenshots
screenshots: $(STAMP) peers
	UPDATE_SCREENSHOTS=1 $(BIN)/pytest -p no:cacheprovider tests/e2e/test_web_wizard.py tests/e2e/test_web_certificate.py \
		tests/e2e/test_backup_web.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
