# The two commands of the README:  `make demo` (the main job) and `make test` (the suite without the
# tests marked slow). `make test-all` adds the slow ones (CI runs it); `make lint` is ruff's lint and format check.
# Both create .venv on first use. TORCH pins a torch build with a matching torchvision; on this
# project's machines both wheels lie on disk, elsewhere pip takes your platform's normal wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: demo test test-all lint install clean docs-figures

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/tightfit train

test: $(BIN)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider -m "not slow"

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

docs-figures: $(BIN)/.installed  # rewrite the command output quoted in docs/ (benchmarks/docs_figures.py)
	$(BIN)/python benchmarks/docs_figures.py

clean:
	rm -rf $(VENV) runs
