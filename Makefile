# Each target does all the set-up it needs, from a fresh clone on a fresh machine:
#   make demo   builds fastamp in .venv and runs the main job
#   make test   builds fastamp in .venv and runs the whole test suite (slow cases included)
#   make docs   builds the documentation site (docs/_build/html), warnings as errors
#   make emu-test   the CUDA kernels executed by the CPU emulator (tests/emu), every op and block shape
#   make emu-sanitize   the emulated kernels under ASan, UBSan and TSan; emu-mutation: planted bugs caught
#   make gpu-check OUT=dir   on a GPU machine, with the torch already there: build, check, test, sanitize, bench
# Re-running is quick: nothing is reinstalled or rebuilt unless its inputs changed.
#
# TORCH_SPEC picks torch. The default is the CUDA 13.0 build (matches nvcc 13.0, runs on CPU too), so
# the CUDA kernels compile wherever nvcc is found; TORCH_SPEC=torch==2.13.0 gives a lean CPU-only set-up.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEPS_STAMP := $(VENV)/.deps-$(subst =,_,$(subst /,_,$(TORCH_SPEC)))
BUILD_STAMP := $(VENV)/.build-$(subst =,_,$(subst /,_,$(TORCH_SPEC)))
SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.inc' \)) setup.py pyproject.toml fastamp/_build.py

export MAX_JOBS

OUT ?= gpu-check-results

CXX_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))

.PHONY: demo test test-fast emu-test emu-sanitize emu-mutation bench info gpu-check lint docs clean

demo: $(BUILD_STAMP)
	$(VENV)/bin/fastamp info
	$(VENV)/bin/fastamp demo --out demo-results

info: $(BUILD_STAMP)
	$(VENV)/bin/fastamp info

test: $(BUILD_STAMP)
	FASTAMP_EXPECT_EXTENSION=1 FASTAMP_EXPECT_EMULATOR=1 FASTAMP_EXPECT_CUDA_KERNELS=$$($(PY) -c 'import setup; print(int(setup.cuda_build_expected()))') \
		$(PY) -m pytest tests

test-fast: $(BUILD_STAMP)
	FASTAMP_EXPECT_EXTENSION=1 $(PY) -m pytest tests -m "not slow"

# fastamp's CUDA kernels run on this CPU (tests/emu: a CUDA-semantics runtime, g++ against torch's c10).
emu-test: $(BUILD_STAMP)
	FASTAMP_EXPECT_EMULATOR=1 $(PY) -m pytest tests/emu -m "not slow" -q

emu-sanitize: $(BUILD_STAMP)
	FASTAMP_EXPECT_EMULATOR=1 $(PY) -m pytest tests/emu/test_sanitize.py -q

# Plants one bug of each class in a copy of csrc/cuda and shows the emulator suite catches each.
emu-mutation: $(BUILD_STAMP)
	$(PY) tools/emu_mutation.py --out benchmarks/results/emu-mutation.md

# For a GPU machine with torch installed and no network: no venv, no downloads; PYTHON's torch as it is.
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT) $(if $(PHASES),--only $(PHASES))

# House rules: ruff (pyproject.toml) for Python, clang-format (.clang-format) for csrc/.
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# The documentation site (Sphinx + MyST, API pages from the docstrings), warnings as errors.
docs: $(BUILD_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

bench: $(BUILD_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(PY) Makefile
	rm -f $(VENV)/.deps-* $(VENV)/.build-*
	$(PIP) install -q "$(TORCH_SPEC)" pytest pytest-benchmark hypothesis ninja setuptools wheel matplotlib tqdm "lightning>=2.2" \
		transformers==5.24.0 accelerate==1.15.0 ruff==0.17.6 clang-format==23.1.5 sphinx myst-parser furo
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build fastamp/_C*.so $(VENV)/.build-*
