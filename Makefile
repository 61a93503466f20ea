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

.PHONY: install demo test openvino-env py38-env

install: | $(PYTHON)
	$(PIP) -e ".[train,demo,dev]"

demo: install
	$(PYTHON) -m edge_tl build --data demo --target cpu --out $(DEMO)

test: install openvino-env py38-env
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

# Python 3.8, the oldest the device-side runtime supports (JetPack 5, Ubuntu 20.04), with the runtime's
# dependencies only; tests/test_oldest_python.py installs a wheel of this checkout into a folder of its
# own and runs the device commands there. Where no Python 3.8 is found (pyenv install 3.8 adds one), the
# test skips and says so.
PY38_ENV ?= .venv-py38
PY38 ?= $(firstword $(foreach p,python3.8 $(wildcard $(HOME)/.pyenv/versions/3.8*/bin/python3.8),\
  $(shell $(p) -c "import sys; assert sys.version_info[:2] == (3, 8)" 2>/dev/null && echo $(p))))
py38-env:
	@[ -f $(PY38_ENV)/.complete ] || { [ -n "$(PY38)" ] || { echo "py38-env: no Python 3.8 here; the oldest-Python test will skip"; exit 0; }; \
	  rm -rf $(PY38_ENV) && $(PY38) -m venv $(PY38_ENV) \
	  && $(PY38_ENV)/bin/python -m pip install --disable-pip-version-check -q numpy pillow onnxruntime typer \
	  && touch $(PY38_ENV)/.complete ; } \
	  || { echo "py38-env: the runtime's dependencies did not install for Python 3.8; the oldest-Python test will skip"; rm -rf $(PY38_ENV); }
