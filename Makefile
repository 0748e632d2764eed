# One entry point for a fresh machine: `make demo` sets everything up and runs the main job,
# `make test` runs the whole test suite. Both create ./.venv on first use.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# The MONAI Deploy App SDK's pins cannot share the main environment (numpy 1.26): it gets a venv of its own.
DEPLOY_VENV  ?= .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
# The CPU-usable pair that imports together here (lpips needs torchvision); see docs/install.md.
TORCH    := torch==2.14.1 torchvision==0.29.1
# jemalloc makes CPU training/inference 1.4-2.5x faster on these VMs (../shared/spec/performance.md).
JEMALLOC  = $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2))
# jemalloc hands freed pages back to the OS after ~10 s by default; with activations of 10^8 bytes allocated and freed
# every layer, each reuse then page-faults again (one thread, 2.5D bundle, 256³ output: 23.6 s of system time in a
# 65.5 s command; 1.9 s in 42.8 s without the decay).
# Never decaying keeps them mapped, for 0.3-0.5 GiB more peak memory (docs/performance.md); the environment's own
# MALLOC_CONF wins.
MALLOC_CONF ?= dirty_decay_ms:-1,muzzy_decay_ms:-1
RUN       = LD_PRELOAD=$(JEMALLOC) MALLOC_CONF=$(MALLOC_CONF) $(BIN)/python
DEMO_BUNDLE ?= brain_mri_edm25d_super_resolution
DEMO_OUT    ?= outputs/demo

# bash with pipefail, so filtering pip's noise below keeps pip's exit status
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip repeats a warning per package for each configured index folder that lacks it: not our concern, not shown
QUIET_PIP   := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install deploy-install demo test bench jemalloc clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory jemalloc
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) 2>&1 | { $(QUIET_PIP); }
	$(BIN)/pip install -q -e '.[test]' 2>&1 | { $(QUIET_PIP); }
	@touch $(STAMP)

# `python -m common.deploy` runs here: $(DEPLOY_VENV)/bin/python -m common.deploy --bundle ... (docs/deploy.md)
deploy-install: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q $(TORCH) 2>&1 | { $(QUIET_PIP); }
	$(DEPLOY_VENV)/bin/pip install -q -e '.[deploy]' 2>&1 | { $(QUIET_PIP); }
	@touch $(DEPLOY_STAMP)

# Best effort: installs Debian's libjemalloc2 when we are root and apt works; says so when it cannot.
jemalloc:
	@if [ -n "$(JEMALLOC)" ]; then echo "jemalloc: $(JEMALLOC)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq libjemalloc2) >/dev/null 2>&1 \
	  && echo "jemalloc: installed libjemalloc2" || echo "jemalloc: could not install libjemalloc2; running without it (slower)"; \
	else echo "jemalloc: not found and not root; running without it (slower)"; fi

demo: install
	$(RUN) -m monai.bundle run --config_file bundles/$(DEMO_BUNDLE)/configs/inference.json \
	    --bundle_root bundles/$(DEMO_BUNDLE) --output_dir $(DEMO_OUT)
	@echo "Results (SR volume, PNG preview, metrics JSON): $(abspath $(DEMO_OUT))"

# DEPLOY_PYTHON: tests/deploy/test_app.py runs the Deploy application with it (and fails, not skips, if it is broken).
# TEST_WORKERS pytest-xdist processes of one thread each (tests/conftest.py): one per core of the 2-core machines.
TEST_WORKERS ?= 2
test: install deploy-install
	DEPLOY_PYTHON=$(abspath $(DEPLOY_VENV))/bin/python $(RUN) -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: install
	$(RUN) -m common.evaluation.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
