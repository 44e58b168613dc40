# The README's two commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 1

.PHONY: setup host browser demo serve bench test lint clean workflows docs

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

test: host browser
	$(BIN)/python -m pytest

# Debian chromium and npm playwright-core for the browser test and the workflow builder; without them
# (no root for apt-get, no npm) the browser test skips and says why.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium) \
				|| echo "browser: could not install chromium, tests/test_browser.py will skip"; \
		else echo "browser: chromium not found (apt-get install chromium), tests/test_browser.py will skip"; fi; \
	fi
	@if [ ! -d devtools/browser/node_modules/playwright-core ]; then \
		if command -v npm >/dev/null 2>&1; then npm ci --prefix devtools/browser \
			|| echo "browser: npm ci failed, tests/test_browser.py will skip"; \
		else echo "browser: npm not found, tests/test_browser.py will skip"; fi; \
	fi

# example_workflows/ (UI JSON, API twins, thumbnails) rebuilt in the real frontend from devtools/browser/workflow_specs.mjs.
workflows: host browser
	$(BIN)/python -m comfyui_lora2.devtools.build_workflows

# web/docs/<node id>.md, the nodes' help pages, rendered from their declarations.
docs: host
	$(BIN)/python -m comfyui_lora2.devtools.help_pages

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
