# The README's two commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 1

.PHONY: setup host demo serve bench test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The README's first command: the tiny default model, a generated subject, workflow 1 through the real server.
demo: host
	$(BIN)/python demo/run_demo.py

serve: host
	$(BIN)/python demo/serve.py

bench: setup
	$(BIN)/python -m comfyui_lora2.bench.rank_recovery --true-ranks 1,2,4,8,16,32 --dim 256 --seed 0

# The pinned ComfyUI host (.host/) for the tests; the script keeps its own stamp and returns at once when current.
host: setup
	bash scripts/install_host.sh

test: host
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
