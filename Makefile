# `make` creates .venv with everything; `make demo` runs the join story on the local sandbox;
# `make test` runs the suite (unit + sandbox end-to-end).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv demo test unit agent faults bench bench-sweep fleet48h clean sandbox-up sandbox-down

all: venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-cli.txt requirements-dev.txt pyproject.toml sandbox/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e . -e ./sandbox
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m meshjoin_sandbox.demo

# Test files run on 4 workers (pytest-xdist, one file per worker at a time): the end-to-end files each
# start their own sandbox and mostly wait on it, so 4 fit on 2 cores. `pytest -q` alone runs them serially.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 4 --dist loadfile

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The VM agent's own tests (tests/agent: the script in bash, a throwaway root, stub commands; as root, no network).
# `make test` runs them too (pyproject's testpaths = tests).
agent: $(STAMP)
	$(BIN)/python -m pytest -q tests/agent

# The fault suite at full size (RELIABILITY.md); `make test` runs it bounded. Figures: .faults-report.json
faults: $(STAMP)
	MESHJOIN_FAULTS=full MESHJOIN_HYPOTHESIS_PROFILE=full MESHJOIN_FAULTS_REPORT=$(CURDIR)/.faults-report.json \
		MESHJOIN_TENANT_REPORT=$(CURDIR)/.tenant-report.json \
		$(BIN)/python -m pytest -q -m faults tests/unit/test_hostile_input.py tests/unit/test_hostile_tenant.py \
		tests/sandbox/test_faults.py \
		tests/e2e/test_faults.py

# Benchmarks against the sandbox (not part of `make test`): bench/results.json and BENCHMARKS.md.
# BENCH_QUICK=1 for small sizes; BENCH_ONLY=keys,join,cold_start,burst,sweep,sweep_scale for some sections.
bench: $(STAMP)
	$(BIN)/python -m bench

# A simulated 48 hours of a 100,000-VM fleet, on paper (the sweep's planner + the quota model; a few minutes).
fleet48h: $(STAMP)
	$(BIN)/python -m bench.fleet48h --json bench/fleet48h.json

# The sweep at scale alone (BENCHMARKS.md "Sweep at 100,000 VMs"): e.g. `make bench-sweep SIZES=10000,30000`;
# PUBLISH=1 adds a real tick to third-due (the time to publish its work). Merged into bench/results.json.
SIZES ?= 10000,30000,100000
SCENARIOS ?= nothing-due,third-due
bench-sweep: $(STAMP)
	$(BIN)/python -m bench.sweep --sizes $(SIZES) --scenarios $(SCENARIOS) $(if $(PUBLISH),--publish)

sandbox-up: $(STAMP)
	$(BIN)/meshjoin sandbox up

sandbox-down: $(STAMP)
	$(BIN)/meshjoin sandbox down

clean:
	-$(BIN)/meshjoin sandbox down 2>/dev/null
	rm -rf $(VENV) .sandbox .pytest_cache

# --- deployment (deploy/, README "Deploy to your project") ------------------------------------
# `make package` stages each function's source (main.py, requirements.txt, meshjoin/) in
# build/functions. `make deploy PROJECT=p CLUSTER=projects/p/locations/l/clusters/c
# TF_STATE_BUCKET=b [REGION=r]` runs the tests, packages, and applies deploy/terraform with the
# caller's credentials: the steps cloudbuild.yaml (verify) and cloudbuild-release.yaml (release)
# split between an unprivileged and a privileged build. PROJECT, REGION and CLUSTER go to
# Terraform as -var, the highest precedence, so a terraform.tfvars cannot redirect the deploy
# while the state is kept under meshjoin/$(PROJECT). More variables: deploy/terraform/terraform.tfvars
# or TF_VAR_<name>=... `make lock` writes deploy/terraform/.terraform.lock.hcl (online, once).
.PHONY: package deploy lock
REGION ?= us-central1
TF := terraform -chdir=deploy/terraform
TF_WHERE = -var='project_id=$(PROJECT)' -var='region=$(REGION)' -var='cluster=$(CLUSTER)' $(TF_VM_PROJECTS)
# VM_PROJECTS=a,b (optional): further projects whose VMs join, as the list var.vm_projects.
comma := ,
TF_VM_PROJECTS = $(if $(VM_PROJECTS),-var='vm_projects=["$(subst $(comma),"$(comma)",$(VM_PROJECTS))"]')
# With the lock file committed, init refuses providers whose hashes it does not list.
TF_LOCK = $(if $(wildcard deploy/terraform/.terraform.lock.hcl),-lockfile=readonly)

# Checked when make reads the file, so a missing argument fails before the test suite runs.
ifneq ($(filter deploy,$(MAKECMDGOALS)),)
  $(if $(and $(PROJECT),$(CLUSTER),$(TF_STATE_BUCKET)),,$(error usage: make deploy PROJECT=... CLUSTER=projects/P/locations/L/clusters/C TF_STATE_BUCKET=... [REGION=us-central1]))
endif

package:
	$(PY) deploy/package.py --out build/functions

deploy: test package
	$(TF) fmt -check -recursive
	$(TF) init -input=false -reconfigure $(TF_LOCK) -backend-config=bucket=$(TF_STATE_BUCKET) -backend-config=prefix=meshjoin/$(PROJECT)
	$(TF) plan -input=false $(TF_WHERE) -out=tfplan
	$(TF) apply -input=false tfplan

# The one online step of a reproducible build: hashes of the pinned providers for every platform
# that runs Terraform (Cloud Build's linux_amd64, developers' machines). Commit the result.
lock:
	$(TF) providers lock -platform=linux_amd64 -platform=linux_arm64 -platform=darwin_amd64 -platform=darwin_arm64
