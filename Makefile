# Two commands: `make demo` runs the whole pipeline on the embedded default, `make test` runs the tests.
# Both create the virtualenv (.venv) and install requirements.txt first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	@start=$$(date +%s); \
	PATH="$(BIN):$$PATH" snakemake --profile profiles/local && \
	echo "DAG wall time: $$(( $$(date +%s) - start )) s" && \
	column -s, -t results/leaderboard.csv | cut -c1-200

test: install
	PATH="$(BIN):$$PATH" python -m pytest

lint: install
	PATH="$(BIN):$$PATH" snakemake --lint && PATH="$(BIN):$$PATH" ruff check . && \
	PATH="$(BIN):$$PATH" snakefmt --check Snakefile rules

clean:
	rm -rf results logs .snakemake
