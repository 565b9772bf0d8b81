# The two commands of the README: `make demo` (end-to-end run on the embedded COCO-proxy) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.butd-installed

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --output demo_output

test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo_output
