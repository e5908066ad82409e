# Two commands on a fresh machine: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so a fresh machine without a GPU installs the CPU wheel instead of a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv train test test-fast lint ladder speedrun wheelhouse clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,all]"
	touch $@

# The main job: a small GPT-2 on the embedded Shakespeare corpus, on whatever device is there.
train: venv
	$(VENV)/bin/gpt2x-train $(ARGS)

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests marked slow (subprocesses, worker processes, torch.compile): about a minute on 2 CPU cores.
test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check gpt2x tests experiments

# The optimization ladder as a Hydra multirun (see experiments/ladder/README.md).
ladder: venv
	$(VENV)/bin/gpt2x-train -m +experiment=ladder $(ARGS)

# Wheels of every core dependency except torch, for an offline GPU node with its own torch (experiments/gpu/README.md).
# WHEEL_PYTHON=3.11 WHEEL_PLATFORM=manylinux_2_28_x86_64 WHEEL_EXTRAS=wandb,hf select another target or add extras.
wheelhouse: venv
	experiments/gpu/wheelhouse.sh wheelhouse

# Time to target of the final ladder rung over 3 seeds (see experiments/speedrun/README.md).
speedrun: venv
	$(VENV)/bin/gpt2x-train -m +experiment=speedrun_baseline seed=1,2,3 $(ARGS)

clean:
	rm -rf $(VENV) outputs
