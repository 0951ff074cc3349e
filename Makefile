# make demo  — set up .venv and run the whole daily pipeline on generated data (through Airflow)
# make test  — set up .venv (with the redis extra, for the Redis online-store test) and run the test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
export FMPIPE_HOME ?= $(CURDIR)/var
export GX_ANALYTICS_ENABLED = false
export AIRFLOW__CORE__LOAD_EXAMPLES = False

.PHONY: setup demo test bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,redis]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fmpipe demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf var
