# cratelm: `make demo` runs the main job, `make test` runs the tests. Each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (the CI machines hold it on disk). On a GPU machine set
# TORCH_SPEC to the CUDA build you want, e.g. `make demo TORCH_SPEC=torch==2.11.0`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-gpu demo compare bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,hf]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) -m pytest -q -m cuda

demo: setup
	$(PY) -m cratelm.demo $(DEMO_ARGS)

# CRATE-GPT, CRATE-alpha, CRATE-LM and GPT-2 under one recipe on the stdlib corpus (~10 min on 2 idle cores)
compare: setup
	$(PY) -m cratelm compare --preset cpu --out compare $(COMPARE_ARGS)

bench: setup
	$(PY) -m cratelm bench --config configs/model/crate-gpt2-base.yaml

# One GPU, <= 8 minutes, one report (OUT/report.json + report.md; OUT defaults to gpu-check).
# Runs with the machine's own python3 and torch (no venv, nothing downloaded); PY=... picks
# another interpreter, WHEELS=dir installs deepspeed from local wheels first, DRY_RUN=1 only
# checks on a CPU that every command parses.
gpu-check: PY := python3
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) scripts/gpu_check.py --python $(PY) \
		--out $(or $(OUT),gpu-check) $(if $(WHEELS),--wheels $(WHEELS)) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf $(VENV) demo compare
