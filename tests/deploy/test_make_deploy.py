"""`make deploy` deploys where PROJECT/REGION/CLUSTER say, whatever terraform.tfvars holds.

Terraform ranks -var on the command line above terraform.tfvars, which ranks above TF_VAR_
environment variables (https://developer.hashicorp.com/terraform/language/values/variables,
"Variable definition precedence"). The Makefile's command line (`make -n`) is checked for -var,
then its exact arguments are handed to the real `terraform console` in a module whose
terraform.tfvars names another project: the Makefile's values must win.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from .conftest import REPO, TF_DIR

MAKE = shutil.which("make")
TERRAFORM = shutil.which("terraform")
PROJECT, REGION, CLUSTER = "right-proj", "europe-west1", "projects/right-proj/locations/europe-west1/clusters/mesh"


@pytest.fixture(scope="module")
def deploy_commands() -> list[list[str]]:
    if MAKE is None:
        pytest.skip("make is not installed")
    result = subprocess.run([MAKE, "-n", "--no-print-directory", "deploy", f"PROJECT={PROJECT}", f"REGION={REGION}",
                             f"CLUSTER={CLUSTER}", "TF_STATE_BUCKET=state-bucket"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("terraform ")]


def terraform_step(commands, verb: str) -> list[str]:
    matches = [c for c in commands if verb in c]
    assert len(matches) == 1, commands
    return matches[0]


def test_plan_gets_project_region_and_cluster_as_var(deploy_commands):
    plan = terraform_step(deploy_commands, "plan")
    assert f"-var=project_id={PROJECT}" in plan
    assert f"-var=region={REGION}" in plan
    assert f"-var=cluster={CLUSTER}" in plan


def test_state_is_kept_under_the_same_project(deploy_commands):
    init = terraform_step(deploy_commands, "init")
    assert f"-backend-config=prefix=meshjoin/{PROJECT}" in init
    assert "-backend-config=bucket=state-bucket" in init


def test_apply_applies_the_saved_plan(deploy_commands):
    assert terraform_step(deploy_commands, "apply")[-1] == "tfplan"
    assert "-out=tfplan" in terraform_step(deploy_commands, "plan")


def test_usage_error_without_project():
    if MAKE is None:
        pytest.skip("make is not installed")
    result = subprocess.run([MAKE, "-n", "deploy", "CLUSTER=x", "TF_STATE_BUCKET=b"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "usage: make deploy PROJECT=" in result.stderr


@pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed")
def test_the_makefile_values_beat_terraform_tfvars(deploy_commands, tmp_path):
    module = tmp_path / "module"
    module.mkdir()
    shutil.copy(TF_DIR / "variables.tf", module / "variables.tf")
    # What the README's example tfvars, copied and left unedited, would hold.
    (module / "terraform.tfvars").write_text(
        'project_id = "wrong-proj"\nregion = "us-central1"\n'
        'cluster = "projects/wrong-proj/locations/us-central1/clusters/mesh"\n')
    var_args = [a for a in terraform_step(deploy_commands, "plan") if a.startswith("-var=")]
    result = subprocess.run([TERRAFORM, "console", "-no-color", *var_args],
                            input='jsonencode([var.project_id, var.region, var.cluster])',
                            cwd=module, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "TF_IN_AUTOMATION": "1", "TF_CLI_CONFIG_FILE": "/dev/null",
                                 "TF_VAR_project_id": "env-proj"})
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    assert result.stdout.strip() == '"[\\"right-proj\\",\\"europe-west1\\",\\"projects/right-proj/locations/europe-west1/clusters/mesh\\"]"'
    # Without the -var arguments the tfvars file wins over the environment: the defect.
    result = subprocess.run([TERRAFORM, "console", "-no-color"], input="var.project_id", cwd=module,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "TF_IN_AUTOMATION": "1", "TF_CLI_CONFIG_FILE": "/dev/null",
                                 "TF_VAR_project_id": PROJECT})
    assert result.stdout.strip() == '"wrong-proj"', result.stderr
