# medge — two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test engines bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medge demo

test: $(STAMP)
	$(PY) -m pytest -q

# Rebuild the bundled engines from scratch (train, export, quantize); see docs/models/.
engines: $(STAMP)
	$(PY) -m trainer.reproduce --out engines

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .medge build *.egg-info
