# The two commands a fresh machine needs: `make run` and `make test`. Both create .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?=
STAMP  := $(VENV)/.installed

.PHONY: run test test-slow venv browser clean

venv: $(STAMP)

$(STAMP): requirements.txt $(wildcard requirements/*.txt) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Serve the bundled default model, or MODEL=... (a diffusers folder, a cached Hugging Face repo id ORG/NAME or a
# single-file .safetensors checkpoint: README "Where models come from").
run: $(STAMP)
	$(VENV)/bin/nitrofusion serve $(if $(MODEL),--model $(MODEL)) --host $(HOST) --port $(PORT)

# The web page test drives Debian's chromium; as root with apt, install it, else that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian) for the web page test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and not root: the web page test will be skipped"; fi; }

# The suite without the tests marked slow (real training runs, DDP, full exports, the schemathesis fuzz): under
# five minutes on a 2-core machine. `make test-slow` runs those; CI (.ci/run) runs both.
test: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
