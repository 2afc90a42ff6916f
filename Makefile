# The two commands a fresh machine needs: `make run` and `make test`. Both create .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?=
STAMP  := $(VENV)/.installed

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt $(wildcard requirements/*.txt) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Serve the bundled default model, or MODEL=DIR (a local diffusers folder).
run: $(STAMP)
	$(VENV)/bin/nitrofusion serve $(if $(MODEL),--model $(MODEL)) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
