# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
# Each first makes a local virtualenv (.venv) and installs the package into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/pgpt-jax serve $(ARGS)

# pytest exits 5 when it collected no test: that must fail loudly, not pass.
test: install
	@$(BIN)/python -m pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/pgpt-jax bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
