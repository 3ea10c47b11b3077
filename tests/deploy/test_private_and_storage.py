"""Private clusters (DNS endpoint, VPC connector) and the CA secrets' storage policy: variable
validation by the real `terraform console`, and the wiring read from the HCL."""

from __future__ import annotations

import pytest

from .test_terraform import console, console_module, needs_terraform, unref  # noqa: F401 (fixture)


@needs_terraform
@pytest.mark.parametrize("variable, value", [
    ("cluster_endpoint", "private"),
    ("vpc_connector", "meshjoin-connector"),
    ("vpc_connector_egress", "SOME_TRAFFIC"),
    ("secret_kms_keys", '{global="my-key"}'),
    ("events_concurrency", "0"),
    ("events_max_delivery_attempts", "3"),
    ("cert_expiry_alert_hours", "0"),
    ("join_failure_ratio", "1"),
])
def test_new_variables_refuse_bad_values(console_module, variable, value):
    result = console(console_module, "1", **{variable: value})
    assert "Invalid value for variable" in result.stderr and f"var.{variable} is" in result.stderr, result.stderr


@needs_terraform
def test_new_variables_accept_good_values(console_module):
    result = console(console_module, "1", cluster_endpoint="dns",
                     vpc_connector="projects/p/locations/us-central1/connectors/meshjoin",
                     vpc_connector_egress="ALL_TRAFFIC", secret_locations='["europe-west1"]',
                     secret_kms_keys='{"europe-west1"="projects/p/locations/europe-west1/keyRings/r/cryptoKeys/k"}')
    assert "Error" not in result.stderr, result.stderr


@needs_terraform
def test_dns_endpoint_reaches_the_functions_and_the_provider(console_module):
    from .test_terraform import evaluate

    assert evaluate(console_module, "local.function_env", cluster_endpoint="dns")["MESHJOIN_CLUSTER_ENDPOINT"] == "dns"
    # "ip" is the product default: not deployed at all.
    assert "MESHJOIN_CLUSTER_ENDPOINT" not in evaluate(console_module, "local.function_env")


def test_kubernetes_provider_follows_the_endpoint_choice(terraform):
    host = terraform.locals["kube_host"]
    assert "var.cluster_endpoint == \"dns\"" in host.replace('\\"', '"') and "local.cluster_dns_endpoint" in host
    assert "dns_endpoint_config[0].endpoint" in terraform.locals["cluster_dns_endpoint"]
    text = (terraform.files[0].parent / "versions.tf").read_text()
    # The DNS endpoint's certificate is publicly trusted: the cluster CA must not be pinned there.
    assert 'cluster_ca_certificate = var.cluster_endpoint == "dns" ? null :' in text


def test_functions_use_the_vpc_connector_when_given(terraform):
    service = terraform.resource("google_cloudfunctions2_function", "fn")["service_config"][0]
    assert unref(service["vpc_connector"]) == "var.vpc_connector"
    assert unref(service["vpc_connector_egress_settings"]) == "var.vpc_connector == null ? null : var.vpc_connector_egress"


def test_ca_secrets_are_protected_and_follow_the_storage_policy(terraform):
    secret = terraform.resource("google_secret_manager_secret", "ca")
    lifecycle = secret["lifecycle"][0]
    assert lifecycle["prevent_destroy"] is True
    assert "ignore_changes" not in lifecycle, "a replication change must be refused loudly, not skipped"
    replication = secret["replication"][0]["dynamic"]
    kinds = {name for block in replication for name in block}
    assert kinds == {"auto", "user_managed"}
    assert "var.secret_kms_keys" in lifecycle["precondition"][0]["condition"]


def test_pubsub_agent_exists_before_it_is_granted(terraform):
    identity = terraform.resource("google_project_service_identity", "pubsub")
    assert identity["service"] == "pubsub.googleapis.com"
    assert unref(identity["provider"]) == "google-beta"
    assert "google_project_service_identity.pubsub.email" in terraform.locals["pubsub_agent"]


def test_act_as_works_for_accounts_of_other_projects(terraform):
    grant = terraform.resource("google_service_account_iam_member", "act_as_vm")
    assert grant["service_account_id"] == "projects/-/serviceAccounts/${each.value}"


def test_bootstrap_apis_are_listed(terraform):
    apis = terraform.resource("google_project_service", "apis")["for_each"]
    for api in ("cloudresourcemanager.googleapis.com", "serviceusage.googleapis.com", "monitoring.googleapis.com"):
        assert api in apis
