# The two Quickstart commands: `make demo` (whole pipeline on the ELPV demo data) and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q
DEMO ?= demo

.PHONY: install demo test

install:
	$(PIP) -e ".[train,demo,dev]"

demo: install
	edge-tl build --data demo --target cpu --out $(DEMO)

test: install
	$(PYTHON) -m pytest -q
