# Two commands: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 are the pair that import together on this kind of machine.
	$(VPY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m demo $(DEMO_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
