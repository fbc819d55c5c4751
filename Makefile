# mobile-sd: the entry points users know. `make setup` then `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
OUT     ?= artifacts
SPEC    ?= snapfusion

.PHONY: setup test test-slow export-ios export-android parity bench benchmarks clean

# torch first, pinned: `pip install torch==2.13.0` takes the CPU build on this machine's disk
# (a bare `torch` requirement could pull a multi-GB CUDA build). clip-anytorch only ships the
# CLIP BPE vocabulary file; --no-deps because it would drag in torchvision, which cannot import
# beside this torch. We never import it.
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps clip-anytorch==2.6.0

# The import-graph check first (seconds): data flows one way through the packages.
test:
	$(BIN)/python tools/check_imports.py
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q --runslow

export-ios:
	$(BIN)/mobile-sd export --recipe export_recipes/ios-snapfusion-fast.yaml --spec $(SPEC) --out $(OUT)/ios --force

export-android:
	$(BIN)/mobile-sd export --recipe export_recipes/android-snapfusion-xnnpack-fp32.yaml --spec $(SPEC) --out $(OUT)/android --force

# Every export folder that exists (make export-android / export-ios) is checked; none is an
# error. Core ML packages run here too (the MIL runtime off macOS): the iOS check is real.
parity:
	@found=; for d in $(OUT)/android $(OUT)/ios; do \
	  [ -f $$d/manifest.json ] || continue; found=1; \
	  echo "$(BIN)/mobile-sd parity $$d --spec $(SPEC) --fail-on-skip"; \
	  $(BIN)/mobile-sd parity $$d --spec $(SPEC) --fail-on-skip || exit $$?; \
	done; [ -n "$$found" ] || { echo "make parity: no export in $(OUT)/android or $(OUT)/ios;" \
	  "run make export-ios or make export-android first" >&2; exit 2; }

bench:
	$(BIN)/mobile-sd bench $(OUT)/android --target host

clean:
	rm -rf $(OUT) .pytest_cache
