# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-all data clean

# The planner's libtpu (the `plan` extra) makes JAX look for an attached TPU at start-up, which
# prints warnings on a machine without one: these targets use the CPU unless told otherwise
# (`make demo JAX_PLATFORMS=cuda` on a GPU machine, `JAX_PLATFORMS=` for JAX's own choice).
JAX_PLATFORMS ?= cpu
export JAX_PLATFORMS

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,torch,hf,plan,notebook,export]'
	touch $(STAMP)

# Debian's dataset-fashion-mnist when apt is there; otherwise the demo falls back to TFDS.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: $(STAMP) data
	$(PY) -m vit_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/demo

# Quick suite (CI): everything but tests marked slow, on one pytest worker per core (at most 4:
# each holds jax, TensorFlow and torch in memory). A quick test still running after 15 minutes (the
# longest take about 4 with a cold compilation cache) fails with every thread's stack, rather than
# holding CI until its own limit.
XDIST := -n auto --maxprocesses=4 --dist worksteal --timeout=900
test: $(STAMP) data
	$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=15 tests

# The slow tests one at a time: the kill drills time how fast a run exits.
test-all: $(STAMP) data
	$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=15 tests
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) workdirs *.egg-info
