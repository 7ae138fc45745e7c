# Every target that runs project code depends on `setup`, which installs only when the lock file or
# pyproject.toml changed since the last install.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: k8s-schemas setup lock lock-oip-clients oip-clients pipeline test test-unit mlflow-ui serve worker loadtest soak bench bench-jobs drift labelstudio loop-demo clean

# The CRD schemas tests/unit/test_k8s.py validates deploy/k8s against (npm, pinned by package-lock.json).
K8S_SCHEMAS := deploy/k8s/validate/node_modules/.installed

# The real Label Studio server the feedback loop pushes to (its own venv: it wants pandas 3) and its
# migrated template database: installed for the tests and the loop demo, not for the pipeline.
LABEL_STUDIO := .venv-labelstudio/.installed

# Open Inference Protocol clients nobody here wrote (tritonclient[http], kserve), in a venv of their own:
# their protobuf, psutil, ml-dtypes and greenlet pins conflict with requirements.lock. The service's
# tests run them as subprocesses (tests/oip_clients.py). Re-pin: make lock-oip-clients. --no-compile: CI
# pays for this install; byte-compiling its ~500 MB (kubernetes' generated models mostly) took longer than
# downloading and unpacking it, and the clients import a small part of it.
OIP_CLIENTS := .venv-oip-clients/.installed

setup: $(STAMP) $(K8S_SCHEMAS)

k8s-schemas: $(K8S_SCHEMAS)

$(K8S_SCHEMAS): deploy/k8s/validate/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: the Kubernetes manifest test needs node 20 + npm"; exit 1; }
	npm ci --prefix deploy/k8s/validate --no-audit --no-fund --loglevel=error
	@touch $@

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
		echo "note: nginx is not installed; detops deploy needs it: sudo apt-get install -y nginx"
	@touch $@

# Re-resolve the direct dependencies of pyproject.toml into a fresh venv and pin the result.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade "pip>=24"
	.venv-lock/bin/pip install --quiet -e ".[dev]"
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
	rm -rf .venv-lock

oip-clients: $(OIP_CLIENTS)

$(OIP_CLIENTS): requirements-oip-clients.lock
	rm -rf .venv-oip-clients && python3.11 -m venv .venv-oip-clients
	.venv-oip-clients/bin/pip install --quiet --no-deps --no-compile -r requirements-oip-clients.lock
	@touch $@

lock-oip-clients:
	rm -rf .venv-lock-oip && python3.11 -m venv .venv-lock-oip
	.venv-lock-oip/bin/pip install --quiet --upgrade "pip>=24"
	.venv-lock-oip/bin/pip install --quiet "tritonclient[http]==2.73.0" "kserve==0.21.0"
	.venv-lock-oip/bin/pip freeze > requirements-oip-clients.lock
	rm -rf .venv-lock-oip

# dvc.yaml calls `detops ...`: put the venv's console scripts first on PATH.
pipeline: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup $(LABEL_STUDIO) $(OIP_CLIENTS)
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

mlflow-ui: setup
	$(BIN)/detops mlflow-ui --host $(HOST)

# `detops build` imports @champion into BentoML's own store (~/bentoml, or $BENTOML_HOME), where the
# plain `bentoml serve` below finds it, as it does when run by hand. One `detops worker` runs beside it
# for /jobs (embedded job store and broker under ./jobs_store unless DETOPS_*_URL say otherwise); it
# stops with the service (Ctrl-C). `make worker` (or `detops worker`) starts more.
# Keys (docs/access.md): a local pepper and one development key, made once under .cache/ and printed
# at each start; set DETOPS_KEY_PEPPER yourself for anything but local development.
DEV_PEPPER := .cache/dev-key-pepper
DEV_KEY := .cache/dev-api-key
serve: setup
	$(BIN)/detops build
	@mkdir -p .cache; test -s $(DEV_PEPPER) || $(PY) -c 'import secrets; print(secrets.token_hex(32))' > $(DEV_PEPPER)
	@export DETOPS_KEY_PEPPER="$${DETOPS_KEY_PEPPER:-$$(cat $(DEV_PEPPER))}"; \
	test -s $(DEV_KEY) || $(BIN)/detops keys create --tenant local-dev --scopes detect,jobs:write,jobs:read \
		--name "make serve" | tail -n 1 > $(DEV_KEY); \
	echo "development key (tenant local-dev): export DETOPS_API_KEY=$$(cat $(DEV_KEY))"; \
	$(BIN)/detops worker & worker=$$!; trap 'kill $$worker 2>/dev/null; wait $$worker' EXIT; \
	$(BIN)/bentoml serve serving.service:Detector --host $(HOST) --port $(PORT)

worker: setup
	$(BIN)/detops worker

loadtest: setup
	$(PY) -m tests.load.run

# Not a test: 10 minutes of detect + jobs by two tenants with their own keys; errors, p95, RSS growth
# of every process, failing itself on an error, > 5 % growth after a 5-minute warm-up or a restarted process
# (docs/access.md). SOAK_TIME=30m for the full check, 30s for a quick look.
SOAK_TIME ?= 10m
soak: setup
	$(PY) -m tests.load.soak --run-time $(SOAK_TIME)

bench: setup
	$(PY) -m tests.bench.serving_bench

# A 1,000-image job through the queue and `detops batch run` vs the raw engine (docs/jobs.md).
bench-jobs: setup
	$(PY) -m tests.bench.jobs_bench --production

# The monitoring pipeline (pipelines/monitoring/dvc.yaml): exit 3 means drift was found.
drift: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro pipelines/monitoring/dvc.yaml

# A local Label Studio server in its own venv (it needs pandas 3; the project pins pandas<3).
labelstudio: $(LABEL_STUDIO)

$(LABEL_STUDIO): $(STAMP) requirements-labelstudio.lock
	$(PY) -c "from monitoring.labelstudio_server import ensure_installed; ensure_installed()"
	@touch $@

loop-demo: labelstudio
	$(PY) -m monitoring.loop

clean:
	rm -rf $(VENV) .venv-labelstudio .venv-oip-clients .cache deploy/k8s/validate/node_modules
