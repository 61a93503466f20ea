# The two Quickstart commands: `make demo` (whole pipeline on the ELPV demo data) and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q
DEMO ?= demo

.PHONY: install demo test

install:
	$(PIP) -e ".[demo,dev]"

demo: install
	@test -d $(DEMO)/elpv || edge-tl data elpv --out $(DEMO)/elpv
	edge-tl finetune --data $(DEMO)/elpv --out $(DEMO)/run $(if $(wildcard $(DEMO)/run/last.pt),--resume)

test: install
	$(PYTHON) -m pytest -q
