"""agent.tf publishes the packaged agent under the very key the functions compute (issue 16, decision 4):
Terraform's own expression, evaluated by Terraform itself, against bootstrap.agent_metadata_key()."""

from __future__ import annotations

import re
from pathlib import Path

from meshjoin import bootstrap

from .conftest import TF_DIR
from .test_terraform import console, needs_terraform

AGENT_TF = (TF_DIR / "agent.tf").read_text()


def resource_argument(name: str) -> str:
    body = AGENT_TF[AGENT_TF.index('resource "google_compute_project_metadata_item" "agent"'):]
    body = body[:body.index("\n}\n")]  # this resource's block only
    (expression,) = re.findall(rf"^\s*{name}\s*=\s*(.+)$", body, re.MULTILINE)
    return expression.strip()


def test_agent_tf_reads_the_file_the_package_ships():
    (relative,) = re.findall(r'agent_file\s*=\s*"\$\{local\.checkout\}/(.+)"', AGENT_TF)
    checkout = (TF_DIR / "../..").resolve()
    assert (checkout / relative).read_bytes() == bootstrap.agent_bytes()
    assert resource_argument("value") == "file(local.agent_file)"
    assert resource_argument("project") == "each.value"


@needs_terraform
def test_terraform_computes_the_key_and_value_the_functions_compute(tmp_path):
    agent = Path(bootstrap.__file__).parent / bootstrap.AGENT_FILE
    # console() passes project_id and cluster: declared here, unused.
    (tmp_path / "main.tf").write_text(f'variable "project_id" {{}}\nvariable "cluster" {{}}\n'
                                      f'locals {{\n  agent_file = "{agent}"\n}}\n')
    result = console(tmp_path, f'{resource_argument("key")}\n')
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    assert result.stdout.strip() == f'"{bootstrap.agent_metadata_key()}"'
    sha = console(tmp_path, "filesha256(local.agent_file)\n")
    assert sha.stdout.strip() == f'"{bootstrap.agent_sha256()}"'
