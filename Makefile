# The two Quickstart commands: `make demo` (whole pipeline on the ELPV demo data) and `make test`.
PYTHON ?= python3
DEMO ?= demo

# A Python whose packages the OS manages (PEP 668: Debian's and Ubuntu's /usr/bin/python3, Homebrew's)
# refuses pip installs outside a virtual environment: edge-tl then goes into .venv, made here, and
# every command below runs from it (activate it, `. .venv/bin/activate`, to call edge-tl yourself).
EXTERNALLY_MANAGED := $(shell $(PYTHON) -c "import os, sys, sysconfig; print(int(sys.prefix == sys.base_prefix and \
  os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))))" 2>/dev/null)
ifeq ($(EXTERNALLY_MANAGED),1)
SYSTEM_PYTHON := $(PYTHON)
override PYTHON := .venv/bin/python
$(PYTHON):
	$(SYSTEM_PYTHON) -m venv .venv
else
$(PYTHON):
endif
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test openvino-env

install: | $(PYTHON)
	$(PIP) -e ".[train,demo,dev]"

demo: install
	$(PYTHON) -m edge_tl build --data demo --target cpu --out $(DEMO)

test: install openvino-env
	$(PYTHON) -m pytest -q

# ONNX Runtime with the OpenVINO execution provider, in its own environment (it provides the
# same `onnxruntime` module as onnxruntime): the torch-free runtime only, about 490 MB.
# .complete marks a finished install; an interrupted one is made again. Tests that use it
# skip, saying so, where its wheels don't exist (they do for x86-64 Linux and Windows).
OPENVINO_ENV ?= .venv-openvino
openvino-env:
	@[ -f $(OPENVINO_ENV)/.complete ] || { rm -rf $(OPENVINO_ENV) && $(PYTHON) -m venv $(OPENVINO_ENV) \
	  && $(OPENVINO_ENV)/bin/python -m pip install --disable-pip-version-check -q onnxruntime-openvino numpy pillow typer \
	  && $(OPENVINO_ENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e . \
	  && touch $(OPENVINO_ENV)/.complete ; } \
	  || { echo "openvino-env: onnxruntime-openvino did not install here; the OpenVINO tests will skip"; rm -rf $(OPENVINO_ENV); }
