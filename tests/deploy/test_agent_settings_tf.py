"""What every VM of a deployment shares lives in project metadata (issue 16): agent.tf renders it from the very
Terraform variables the functions' settings come from, and it must equal, byte for byte, what bootstrap renders
from those settings (the functions no longer write it per VM). Compared through the sandbox's Terraform
evaluator (what `sandbox up` applies) and through Terraform itself (`terraform console`)."""

from __future__ import annotations

import json

import pytest

from meshjoin import bootstrap, names
from meshjoin.settings import Settings
from meshjoin_sandbox.project_metadata import terraform_metadata_items
from meshjoin_sandbox.terraform import default_terraform_dir, load_terraform

from .test_terraform import console, console_module, needs_terraform  # noqa: F401 (console_module: a fixture)

PROJECT = "my-proj"
CLUSTER = "projects/other-proj/locations/us-central1/clusters/mesh"
BASE = {"project_id": PROJECT, "cluster": CLUSTER, "region": "us-central1"}
# Each a deployment's terraform.tfvars: the defaults, then every shared value set, with characters that need
# quoting in cluster.env or escaping in JSON.
CASES = {
    "defaults": {},
    "everything set": {
        "istiod_address": "istiod-asm-1-24.istio-system.svc:15012", "istiod_ip": "10.0.0.9",
        "mesh_id": "mesh-prod_1.eu", "network": "vpc-payments", "cluster_id": "gke-eu", "trust_domain": "acme.example",
        "key_algorithm": "rsa-2048", "sidecar_url": "https://storage.googleapis.com/b/istio-sidecar.deb",
        "sidecar_sha256": "ab" * 32, "pubsub_endpoint": "https://pubsub.p.googleapis.com",
        "vm_projects": ["my-proj-2"],
    },
    "sidecar hash without a URL": {"sidecar_sha256": "cd" * 32, "mesh_id": "", "network": ""},
}


def settings_of(variables: dict) -> Settings:
    """The functions' settings, from the env main.tf gives them (local.function_env) for these variables. The
    pubsub endpoint is the VMs' only (the functions are never given one): the setting equals the variable."""
    model = load_terraform(default_terraform_dir(), {**BASE, **variables})
    env = dict(model.local("function_env"))
    if "pubsub_endpoint" in variables:
        env["MESHJOIN_PUBSUB_ENDPOINT"] = variables["pubsub_endpoint"]
    return Settings.from_env(env)


def terraform_items(variables: dict) -> dict[str, dict[str, str]]:
    """{project: {key: value}} of agent.tf's shared items, as the sandbox applies them at `up`."""
    out: dict[str, dict[str, str]] = {}
    for item in terraform_metadata_items({**BASE, **variables}):
        if item["address"].startswith("google_compute_project_metadata_item.vm_settings["):
            out.setdefault(item["project"], {})[item["key"]] = item["value"]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_project_items_are_what_bootstrap_renders_from_the_functions_settings(case):
    variables = CASES[case]
    expected = bootstrap.deployment_items(settings_of(variables))
    items = terraform_items(variables)
    assert sorted(items) == sorted({PROJECT, *variables.get("vm_projects", [])})  # every VM project
    for project, values in items.items():
        assert values == expected, project
    assert set(expected) <= set(names.DEPLOYMENT_KEYS)
    # The worst case really writes every shared item; the defaults all but the optional ones.
    if case == "everything set":
        assert set(expected) == set(names.DEPLOYMENT_KEYS)
    if case == "defaults":
        assert set(expected) == set(names.DEPLOYMENT_KEYS) - {names.HOSTS_KEY, names.SIDECAR_URL_KEY,
                                                               names.SIDECAR_SHA256_KEY}


def test_the_shared_items_carry_nothing_of_one_vm():
    """Nothing rendered from a VM (its identity, its key) is among them: those stay in its instance metadata."""
    assert not set(names.DEPLOYMENT_KEYS) & {names.CLUSTER_ENV_KEY, names.ROOT_CERT_KEY, names.CERT_CHAIN_KEY,
                                             names.REKEY_KEY, names.STATUS_KEY}


@needs_terraform
@pytest.mark.parametrize("case", sorted(CASES))
def test_terraform_itself_renders_the_same(console_module, case):
    variables = {k: v for k, v in CASES[case].items() if k != "vm_projects"}
    expected = bootstrap.deployment_items(settings_of(variables))
    result = console(console_module, "jsonencode(local.vm_settings)\n", **variables)
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    # console prints the JSON text as an HCL string literal, whose escapes are JSON's (no ${ or %{ here).
    assert json.loads(json.loads(result.stdout)) == expected
