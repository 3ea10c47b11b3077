"""deploy/terraform, checked without providers: formatting, references, the sink filter, every
IAM grant against a reviewed table, the functions' settings against the product's, and the RBAC.

`terraform validate` needs the providers and runs in Cloud Build (cloudbuild.yaml, tf-init). Here
the HCL is parsed with python-hcl2, and the locals and variable validations are evaluated by the
real `terraform console`, which needs no providers once resource references are stubbed out.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meshjoin import events, names
from meshjoin.adapters import kube
from meshjoin.model import VmKey
from meshjoin.settings import RETIRED_SETTINGS, Settings

from .conftest import REPO, TF_DIR, load_deploy_script

TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed (Cloud Build checks it in tf-init)")

# --- the reviewed IAM table ------------------------------------------------------------------
# Every grant the module makes: (resource type, role, member) → why. A grant not listed here, or
# listed but gone, fails the test: changing who may do what must change this table in review.
FUNCTIONS_SA = "${local.functions_member}"
PUBSUB_AGENT = "${local.pubsub_agent}"
GRANTS = {
    ("google_project_iam_member", "${google_project_iam_custom_role.compute.id}", FUNCTIONS_SA):
        "read VMs, write their metadata (custom role, below)",
    ("google_project_iam_member", "${google_project_iam_custom_role.secret_inventory.id}", FUNCTIONS_SA):
        "list secrets by label (the sweep's inventory of legacy per-VM secrets); no payloads",
    ("google_project_iam_member", "${google_project_iam_custom_role.vm_secrets.id}", FUNCTIONS_SA):
        "get + delete legacy per-VM secrets (pruning), conditioned on the secret-name prefix",
    ("google_project_iam_member", "roles/container.clusterViewer", FUNCTIONS_SA):
        "clusters.get: endpoint + CA, and GKE's admission of the identity; RBAC does the rest",
    ("google_secret_manager_secret_iam_member", "${google_project_iam_custom_role.ca_reader.id}", FUNCTIONS_SA):
        "read the four CA secrets (access + list enabled versions), on those secrets only",
    ("google_pubsub_topic_iam_member", "roles/pubsub.publisher", "${google_logging_project_sink.vm_events.writer_identity}"):
        "the sink publishes audit entries to the events topic",
    ("google_pubsub_topic_iam_member", "roles/pubsub.publisher", PUBSUB_AGENT):
        "Pub/Sub forwards failed messages to the dead-letter topic",
    ("google_pubsub_subscription_iam_member", "roles/pubsub.subscriber", PUBSUB_AGENT):
        "Pub/Sub acks a dead-lettered message on its source subscription",
    ("google_service_account_iam_member", "roles/iam.serviceAccountTokenCreator", PUBSUB_AGENT):
        "Pub/Sub signs push OIDC tokens as the push identity (projects before 2021-04)",
    ("google_service_account_iam_member", "roles/iam.serviceAccountUser", FUNCTIONS_SA):
        "act as the bound VM identities only (var.identity_bindings): Compute Engine requires it to set their metadata",
    ("google_pubsub_topic_iam_member", "roles/pubsub.publisher", FUNCTIONS_SA):
        "the sweep publishes each VM's work (join, renew, re-issue, prune) to the events topic (issue 16)",
    ("google_pubsub_topic_iam_member", "roles/pubsub.publisher", "serviceAccount:${each.value}"):
        "each bound VM identity nudges meshjoin on the events topic after its agent confirmed",
    ("google_cloud_run_v2_service_iam_member", "roles/run.invoker", "serviceAccount:${google_service_account.push.email}"):
        "only the push identity may invoke the functions",
    # Several VM projects (vm_projects.tf): per further VM project, the same Compute role in that project,
    # and its sink's writer publishing to the host's events topic.
    ("google_project_iam_member", "${google_project_iam_custom_role.compute_vm_projects[each.key].id}", FUNCTIONS_SA):
        "read VMs, write their metadata, in each further VM project (a copy of the host's custom role there)",
    ("google_pubsub_topic_iam_member", "roles/pubsub.publisher",
     "${google_logging_project_sink.vm_events_vm_projects[each.key].writer_identity}"):
        "each further VM project's sink publishes its audit entries to the host's events topic",
}

# Exactly these permissions per custom role (each one is named by the code, see below).
CUSTOM_ROLES = {
    "compute": {"compute.instances.get", "compute.instances.getGuestAttributes", "compute.instances.list",
                "compute.instances.setMetadata", "compute.projects.get", "compute.zoneOperations.get"},
    # Keys stay on the VMs (issue 14): Secret Manager holds the plug-in CA; per-VM secrets are only
    # ever listed and pruned (made by earlier versions).
    "secret_inventory": {"secretmanager.secrets.list"},
    "vm_secrets": {"secretmanager.secrets.delete"},
    "ca_reader": {"secretmanager.versions.access", "secretmanager.versions.list"},
}
# Permissions of the predefined roles granted above that the code relies on.
PREDEFINED = {"roles/container.clusterViewer": {"container.clusters.get", "container.clusters.list"},
              "roles/iam.serviceAccountUser": {"iam.serviceAccounts.actAs"},
              "roles/pubsub.publisher": {"pubsub.topics.publish"}}

# Settings the functions read that a deployment never sets: the sandbox's endpoint overrides.
SANDBOX_ONLY_SETTINGS = {"MESHJOIN_COMPUTE_ENDPOINT", "MESHJOIN_SECRETMANAGER_ENDPOINT",
                         "MESHJOIN_CONTAINER_ENDPOINT", "MESHJOIN_PUBSUB_ENDPOINT"}


def unref(value: str) -> str:
    """`${var.x}` → `var.x` (hcl2 keeps expressions wrapped)."""
    return value[2:-1] if isinstance(value, str) and value.startswith("${") and value.endswith("}") else value


# --- syntax and references -------------------------------------------------------------------


@needs_terraform
def test_terraform_fmt_is_clean():
    result = subprocess.run([TERRAFORM, "fmt", "-check", "-recursive", "-diff", str(TF_DIR)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}{result.stderr}"


def test_every_variable_used_is_declared_and_every_declared_one_is_used(terraform):
    used = set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_-]*)", terraform.text))
    declared = set(terraform.variables)
    assert used - declared == set(), "used but not declared"
    assert declared - used == set(), "declared but never used"


def test_variables_and_outputs_are_documented(terraform):
    for name, body in terraform.variables.items():
        assert body.get("description"), f"variable {name} has no description"
        assert body.get("type"), f"variable {name} has no type"
    for name, body in terraform.outputs.items():
        assert body.get("description"), f"output {name} has no description"


def test_every_local_resource_and_data_reference_resolves(terraform):
    text = re.sub(r"#.*", "", terraform.text)  # comments may mention names freely
    assert set(re.findall(r"\blocal\.([A-Za-z_][A-Za-z0-9_]*)", text)) <= set(terraform.locals)
    resources = set(terraform.resources)
    referenced = set(re.findall(r"(?<![.\w])((?:google|kubernetes)_[a-z0-9_]+)\.([a-z0-9_]+)\b", text))
    assert referenced - resources == set(), "references to resources that do not exist"
    data = {(dtype, name) for block in terraform.blocks["data"] for dtype, named in block.items() for name in named}
    assert set(re.findall(r"\bdata\.([a-z0-9_]+)\.([a-z0-9_]+)", text)) <= data


def test_product_defaults_that_terraform_repeats_agree(terraform):
    """The few variables that need a concrete value (IAM and RBAC depend on them) mirror the product."""
    fields = Settings.__dataclass_fields__
    defaults = {name: body.get("default") for name, body in terraform.variables.items()}
    assert defaults["ca_cert_secret"] == fields["ca_cert_secret"].default
    assert defaults["ca_key_secret"] == fields["ca_key_secret"].default
    assert defaults["ca_chain_secret"] == fields["ca_chain_secret"].default
    assert defaults["ca_root_secret"] == fields["ca_root_secret"].default
    assert defaults["secret_prefix"] == fields["secret_prefix"].default
    assert tuple(defaults["identity_bindings"]) == fields["identity_bindings"].default == ()  # default-deny


# --- the event route -------------------------------------------------------------------------


def test_sink_filter_names_admin_activity_and_both_method_prefixes(terraform):
    sink = terraform.resource("google_logging_project_sink", "vm_events")
    text = sink["filter"].replace('\\"', '"')  # hcl2 renders the heredoc as an escaped string
    assert 'logName="projects/${var.project_id}/logs/cloudaudit.googleapis.com%2Factivity"' in text
    assert 'protoPayload.serviceName="compute.googleapis.com"' in text
    # What the event function accepts is what the sink must send (shared/meshjoin/events.py).
    for method in sorted(events.AUDIT_METHODS):
        for prefix in events.METHOD_PREFIXES:
            assert f'"{prefix}{method}"' in text, f"{prefix}{method} missing from the sink filter"
    assert set(re.findall(r'"((?:v1|beta)\.[\w.]+)"', text)) == {
        p + m for p in events.METHOD_PREFIXES for m in events.AUDIT_METHODS}
    # meshjoin's own metadata writes must never wake it.
    assert "setMetadata" not in text
    assert sink["unique_writer_identity"] is True
    assert "google_pubsub_topic.events" in sink["destination"]


def test_push_subscriptions_retry_and_dead_letter_events(terraform):
    push = terraform.resource("google_pubsub_subscription", "push")
    assert unref(push["for_each"]) == "local.functions"
    assert push["retry_policy"][0]["minimum_backoff"] and push["retry_policy"][0]["maximum_backoff"]
    # Events are parked after their sized number of attempts; ticks never (tests/deploy/test_sizing.py).
    dynamic = push["dynamic"][0]["dead_letter_policy"]
    assert unref(dynamic["for_each"]) == "each.value.max_delivery_attempts == null ? [] : [each.value.max_delivery_attempts]"
    dead_letter = dynamic["content"][0]
    assert unref(dead_letter["max_delivery_attempts"]) == "dead_letter_policy.value"
    assert unref(dead_letter["dead_letter_topic"]) == "google_pubsub_topic.dead_letter.id"
    assert push["expiration_policy"][0]["ttl"] == "", "a subscription must not expire after 31 quiet days"
    oidc = push["push_config"][0]["oidc_token"][0]
    assert unref(oidc["service_account_email"]) == "google_service_account.push.email"
    # Dead letters are kept somewhere: a topic without a subscription drops them.
    kept = terraform.resource("google_pubsub_subscription", "dead_letter")
    assert unref(kept["topic"]) == "google_pubsub_topic.dead_letter.id"


def test_scheduler_ticks_the_schedule_topic_like_the_sandbox(terraform):
    job = terraform.resource("google_cloud_scheduler_job", "sweep")
    assert "var.sweep_interval_minutes" in job["schedule"]
    target = job["pubsub_target"][0]
    assert unref(target["topic_name"]) == "google_pubsub_topic.schedule.id"
    # The payload `meshjoin sandbox tick` publishes.
    assert 'source = "cloud-scheduler"' in target["data"]


# --- the functions ---------------------------------------------------------------------------


def test_functions_are_the_packaged_entry_points(terraform):
    FUNCTIONS = load_deploy_script("package").FUNCTIONS
    functions = terraform.locals["functions"]
    assert {name: body["entry_point"] for name, body in functions.items()} == FUNCTIONS
    for name, entry_point in FUNCTIONS.items():
        main = (REPO / "functions" / name / "main.py").read_text()
        assert re.search(rf"@functions_framework\.cloud_event\s+def {entry_point}\(", main)
    fn = terraform.resource("google_cloudfunctions2_function", "fn")
    build = fn["build_config"][0]
    assert build["runtime"] == "python311"
    assert 'requires-python = ">=3.11"' in (REPO / "pyproject.toml").read_text()
    assert "event_trigger" not in fn, "delivery is our push subscription (dead-lettering), not Eventarc"
    service = fn["service_config"][0]
    assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY"
    assert unref(service["service_account_email"]) == "google_service_account.functions.email"
    # The product's settings, plus functions-framework's thread count matching the concurrency, and the
    # events function's quota share (issue 16: derived so that its instances keep the reserve).
    assert unref(service["environment_variables"]) == \
        "merge(local.function_env, {THREADS = tostring(each.value.concurrency)}, each.key == \"events\" ? " \
        "{MESHJOIN_QUOTA_SHARE = tostring(local.events_quota_share)} : {})"
    assert functions["maintenance"]["max_instances"] == 1, "sweeps must not overlap"


def test_function_settings_are_exactly_the_products(terraform):
    """Every MESHJOIN_ name settings.py reads can be deployed, and Terraform sets no name it ignores."""
    settings_py = (REPO / "shared" / "meshjoin" / "settings.py").read_text()
    product = set(re.findall(r'"(MESHJOIN_[A-Z0-9_]+)"', settings_py)) - set(RETIRED_SETTINGS)
    deployed = set(terraform.locals["function_settings"])
    assert deployed - product == set(), "Terraform sets variables the functions never read"
    assert product - SANDBOX_ONLY_SETTINGS - deployed == set(), "settings a deployment cannot set"
    assert deployed & SANDBOX_ONLY_SETTINGS == set()


# --- IAM -------------------------------------------------------------------------------------


def iam_grants(terraform) -> dict[tuple[str, str, str], str]:
    grants = {}
    for (rtype, name), body in terraform.resources.items():
        if rtype.endswith("_iam_member"):
            grants[(rtype, body["role"], body["member"])] = f"{rtype}.{name}"
    return grants


def test_only_additive_iam_resources_are_used(terraform):
    """*_iam_binding and *_iam_policy are authoritative: applying them removes others' access."""
    authoritative = [f"{t}.{n}" for t, n in terraform.resources if re.search(r"_iam_(binding|policy)$", t)]
    assert authoritative == []


def test_every_iam_grant_is_on_the_reviewed_list(terraform):
    grants = iam_grants(terraform)
    unreviewed = {key: where for key, where in grants.items() if key not in GRANTS}
    assert unreviewed == {}, "grants not on the reviewed list (GRANTS in this test)"
    assert set(GRANTS) - set(grants) == set(), "reviewed grants that no longer exist"


def test_no_primitive_or_admin_roles(terraform):
    code = re.sub(r"#.*", "", terraform.text)  # comments may explain why a role is NOT used
    assert not re.search(r"roles/(owner|editor|viewer)\b", code)
    assert not re.search(r"roles/[a-z.]*admin\b", code, re.IGNORECASE)


def test_custom_roles_hold_exactly_the_reviewed_permissions(terraform):
    roles = {name: set(body["permissions"]) for (rtype, name), body in terraform.resources.items()
             if rtype == "google_project_iam_custom_role" and name != "compute_vm_projects"}
    assert roles == CUSTOM_ROLES
    # The VM projects' copy of the Compute role cannot drift from the host's: it takes its permissions.
    copy = terraform.resource("google_project_iam_custom_role", "compute_vm_projects")
    assert copy["permissions"] == "${google_project_iam_custom_role.compute.permissions}"
    assert copy["role_id"] == "${google_project_iam_custom_role.compute.role_id}" and copy["project"] == "${each.value}"
    assert not any("*" in p for perms in roles.values() for p in perms)


# --- every call the product makes, on the resource it acts on ---------------------------------
# Resources as IAM names them in its checks (Secret Manager by project NUMBER), for the variables the
# evaluation below uses: project my-proj (number 123456789), cluster in other-proj, one bound VM identity.
PROJECT_NUMBER = "123456789"
PROJECT = "projects/my-proj"
VM_PROJECT = "vm-proj"  # a further VM project (var.vm_projects = ["vm-proj"])
CLUSTER = "projects/other-proj/locations/us-central1/clusters/mesh"
VM = "projects/my-proj/zones/us-central1-a/instances/vm-1"
ZONE_OPERATION = "projects/my-proj/zones/us-central1-a/operations/operation-1"
VM_ACCOUNT_EMAIL = "orders-vm@my-proj.iam.gserviceaccount.com"
VM_ACCOUNT = f"projects/my-proj/serviceAccounts/{VM_ACCOUNT_EMAIL}"
BOUND_EMAILS = {VM_ACCOUNT_EMAIL}  # what local.bound_service_accounts holds in this evaluation
_defaults = Settings.__dataclass_fields__
CA_SECRETS = [f"projects/{PROJECT_NUMBER}/secrets/{_defaults[f].default}"
              for f in ("ca_cert_secret", "ca_key_secret", "ca_chain_secret", "ca_root_secret")]
CA_SECRET, CA_VERSION = CA_SECRETS[1], CA_SECRETS[1] + "/versions/3"
VM_SECRET = f"projects/{PROJECT_NUMBER}/secrets/" + names.secret_id(VmKey("my-proj", "us-central1-a", "vm-1"),
                                                                    _defaults["secret_prefix"].default)
VM_SECRET_VERSION = VM_SECRET + "/versions/2"
EVENTS_TOPIC = "projects/my-proj/topics/meshjoin-events"

# (adapter call, permission, the resource the API checks it on). Every permission the adapters name
# appears here; each is checked against the grants that cover THAT resource.
FUNCTION_CALLS = [
    ("ComputeAdapter.get_vm: instances.get", "compute.instances.get", VM),
    ("ComputeAdapter.list_vms: instances.aggregatedList", "compute.instances.list", PROJECT),
    ("ComputeAdapter.set_metadata: instances.setMetadata", "compute.instances.setMetadata", VM),
    ("ComputeAdapter.set_metadata: on a VM running as a bound identity", "iam.serviceAccounts.actAs", VM_ACCOUNT),
    ("ComputeAdapter._wait: zoneOperations.wait", "compute.zoneOperations.get", ZONE_OPERATION),
    ("ComputeAdapter.guest_attributes: instances.getGuestAttributes", "compute.instances.getGuestAttributes", VM),
    ("ComputeAdapter.project_metadata: projects.get", "compute.projects.get", PROJECT),
    ("SecretsAdapter.plugin_ca: versions.access (CA)", "secretmanager.versions.access", CA_VERSION),
    ("SecretsAdapter.plugin_ca: versions.list (enabled roots)", "secretmanager.versions.list", CA_SECRET),
    ("SecretsAdapter.list_vm_secrets: secrets.list (legacy inventory)", "secretmanager.secrets.list", PROJECT),
    ("SecretsAdapter.delete_vm_secret: secrets.delete (legacy pruning)", "secretmanager.secrets.delete", VM_SECRET),
    ("KubeAdapter._connect: clusters.get", "container.clusters.get", CLUSTER),
    ("PubSubPublisher.publish: topics.publish (the sweep's per-VM work)", "pubsub.topics.publish", EVENTS_TOPIC),
]
# What the functions must NOT be able to do, on the resources where it would matter.
FUNCTION_REFUSALS = [
    ("read a VM's key", "secretmanager.versions.access", VM_SECRET_VERSION),
    # Keys stay on the VMs: no Secret Manager write of any kind, on any secret.
    ("create a secret", "secretmanager.secrets.create", PROJECT),
    ("add a version to a per-VM secret", "secretmanager.versions.add", VM_SECRET),
    ("add a version to a CA secret", "secretmanager.versions.add", CA_SECRET),
    ("read a per-VM secret's policy", "secretmanager.secrets.getIamPolicy", VM_SECRET),
    ("change who may read a per-VM secret", "secretmanager.secrets.setIamPolicy", VM_SECRET),
    ("list a per-VM secret's versions", "secretmanager.versions.list", VM_SECRET),
    ("destroy a per-VM version", "secretmanager.versions.destroy", VM_SECRET_VERSION),
    ("disable a per-VM version", "secretmanager.versions.disable", VM_SECRET_VERSION),
    ("update a per-VM secret", "secretmanager.secrets.update", VM_SECRET),
    ("delete a CA secret", "secretmanager.secrets.delete", CA_SECRET),
    ("delete a secret outside the prefix", "secretmanager.secrets.delete",
     f"projects/{PROJECT_NUMBER}/secrets/unrelated"),
    ("change who may read the CA", "secretmanager.secrets.setIamPolicy", CA_SECRET),
    ("destroy a CA version", "secretmanager.versions.destroy", CA_VERSION),
    ("act as an unbound identity", "iam.serviceAccounts.actAs",
     "projects/my-proj/serviceAccounts/123-compute@developer.gserviceaccount.com"),
    ("act as an unbound identity of another project", "iam.serviceAccounts.actAs",
     "projects/shared-proj/serviceAccounts/admin@shared-proj.iam.gserviceaccount.com"),
    ("publish a tick (start sweeps)", "pubsub.topics.publish", "projects/my-proj/topics/meshjoin-schedule"),
]
# The VM agent's own calls, as its service account.
VM_CALLS = [("the agent's nudge: topics.publish", "pubsub.topics.publish", EVENTS_TOPIC)]

_STAND_INS = {"${var.project_id}": "my-proj", "${data.google_project.this.number}": PROJECT_NUMBER,
              "${var.secret_prefix}": _defaults["secret_prefix"].default, "${local.cluster_project}": "other-proj"}


def _substitute(text: str) -> str:
    for placeholder, value in _STAND_INS.items():
        text = text.replace(placeholder, value)
    return text


def condition_allows(condition: list | None, resource: str) -> bool:
    """Evaluate the one condition form the module uses: `resource.name.startsWith("...")` joined by ||."""
    if not condition:
        return True
    expression = _substitute(condition[0]["expression"].replace('\\"', '"'))
    alternatives = [a.strip() for a in expression.split("||")]
    prefixes = []
    for alternative in alternatives:
        match = re.fullmatch(r'resource\.name\.startsWith\("([^"]+)"\)', alternative)
        assert match, f"condition this test cannot evaluate (extend it): {alternative}"
        prefixes.append(match.group(1))
    return any(resource.startswith(prefix) for prefix in prefixes)


def role_permissions(terraform, role: str) -> set[str]:
    match = re.fullmatch(r"\$\{google_project_iam_custom_role\.(\w+)(?:\[each\.key\])?\.id\}", role)
    if match:
        permissions = terraform.resource("google_project_iam_custom_role", match.group(1))["permissions"]
        copied = re.fullmatch(r"\$\{google_project_iam_custom_role\.(\w+)\.permissions\}", str(permissions))
        if copied:  # the VM projects' copy of a role (vm_projects.tf)
            permissions = terraform.resource("google_project_iam_custom_role", copied.group(1))["permissions"]
        return set(permissions)
    assert role in PREDEFINED, f"predefined role {role} not in PREDEFINED: list the permissions the code relies on"
    return PREDEFINED[role]


def covered(terraform, body: dict, rtype: str, resource: str) -> bool:
    """Whether the grant `body` of type `rtype` applies to `resource` (its scope, for_each and condition)."""
    if rtype == "google_project_iam_member":
        project = _substitute(body["project"])
        if unref(body.get("for_each", "")) == "toset(local.other_vm_projects)":
            assert body["project"] == "${each.value}", "a per-VM-project grant this test cannot place"
            project = VM_PROJECT  # the further VM project the evaluation below assumes
        in_scope = resource == f"projects/{project}" or resource.startswith(f"projects/{project}/") or \
            (project == "my-proj" and resource.startswith(f"projects/{PROJECT_NUMBER}/"))
        return in_scope and condition_allows(body.get("condition"), resource)
    if rtype == "google_secret_manager_secret_iam_member":
        assert unref(body["for_each"]) == "local.ca_secrets", "a secret-level grant this test cannot place"
        return any(resource == s or resource.startswith(s + "/versions/") for s in CA_SECRETS)
    if rtype == "google_service_account_iam_member":
        if unref(body.get("for_each", "")) == "toset(local.bound_service_accounts)":
            # One grant per bound email on projects/-/serviceAccounts/EMAIL: IAM stores it on the account
            # itself, whichever project the email names, so it covers exactly the bound accounts.
            assert body["service_account_id"] == "projects/-/serviceAccounts/${each.value}", \
                "an act-as grant this test cannot place"
            match = re.fullmatch(r"projects/[^/]+/serviceAccounts/([^/]+)", resource)
            return bool(match) and match.group(1) in BOUND_EMAILS
        return False  # the push identity's token creator: not a VM identity
    if rtype == "google_pubsub_topic_iam_member":
        return unref(body["topic"]) == "google_pubsub_topic.events.id" and resource == EVENTS_TOPIC
    return False  # run.invoker, subscriptions: nothing the product's calls act on


def permitted(terraform, member: str, permission: str, resource: str, member_for_each: str | None = None) -> list:
    """The grants (resource addresses) that give `member` `permission` on `resource`."""
    found = []
    for (rtype, name), body in terraform.resources.items():
        if not rtype.endswith("_iam_member"):
            continue
        if body["member"] != member:
            continue
        if member_for_each is not None and unref(body.get("for_each", "")) != member_for_each:
            continue
        if permission in role_permissions(terraform, body["role"]) and covered(terraform, body, rtype, resource):
            found.append(f"{rtype}.{name}")
    return found


@pytest.mark.parametrize("call, permission, resource", FUNCTION_CALLS, ids=[c[0] for c in FUNCTION_CALLS])
def test_defect2_every_call_is_granted_on_the_resource_it_acts_on(terraform, call, permission, resource):
    """Defect 2 (per-VM versions.list) and the like: a permission granted only elsewhere (the CA
    secrets' list, another project) does not count."""
    assert permitted(terraform, FUNCTIONS_SA, permission, resource), \
        f"{call} needs {permission} on {resource}; no grant to the functions covers it there"


@pytest.mark.parametrize("what, permission, resource", FUNCTION_REFUSALS, ids=[r[0] for r in FUNCTION_REFUSALS])
def test_functions_cannot_do_what_they_never_need(terraform, what, permission, resource):
    assert permitted(terraform, FUNCTIONS_SA, permission, resource) == [], f"the functions could {what}"


@pytest.mark.parametrize("call, permission, resource", VM_CALLS, ids=[c[0] for c in VM_CALLS])
def test_defect3_vm_identities_may_nudge_on_the_events_topic_only(terraform, call, permission, resource):
    grants = permitted(terraform, "serviceAccount:${each.value}", permission, resource,
                       member_for_each="local.vm_publishers")
    assert grants, f"{call}: the bound VM identities need {permission} on {resource}"
    # The publishers are exactly the bound accounts (evaluated: test_bound_accounts_are_acted_as_and_nudge).
    assert unref(terraform.locals["vm_publishers"]) == "toset(local.bound_service_accounts)"
    assert permitted(terraform, "serviceAccount:${each.value}", permission,
                     "projects/my-proj/topics/meshjoin-schedule") == []


def test_vm_identities_hold_nothing_in_secret_manager(terraform):
    """Keys stay on the VMs (issue 14): a VM's service account needs no Secret Manager permission at
    all, so the only grant to the bound VM identities is the nudge on the events topic, and no grant in
    the module hands anybody secretAccessor (the product set it per secret at run time before)."""
    vm_grants = {(rtype, name): body for (rtype, name), body in terraform.resources.items()
                 if rtype.endswith("_iam_member") and body["member"] == "serviceAccount:${each.value}"}
    assert set(vm_grants) == {("google_pubsub_topic_iam_member", "vm_nudge")}
    for body in vm_grants.values():
        assert not {p for p in role_permissions(terraform, body["role"]) if p.startswith("secretmanager.")}
    code = re.sub(r"#.*", "", terraform.text)
    assert "secretAccessor" not in code and "secretmanager.versions.add" not in code


def test_the_call_table_names_every_permission_the_code_uses():
    """The adapters name the permission of every Google call they make (for their error messages);
    each must be in the call table above (so it is checked on its resource), and no custom-role
    permission may go unused."""
    code = set()
    for path in (REPO / "shared" / "meshjoin" / "adapters").rglob("*.py"):
        code |= set(re.findall(r'"((?:compute|secretmanager|container)\.(?!googleapis\.)[a-zA-Z]+\.[a-zA-Z]+)"',
                               path.read_text()))
    tabled = {permission for _, permission, _ in FUNCTION_CALLS}
    assert code - tabled == set(), "permissions the code needs that the call table does not place"
    assert set().union(*CUSTOM_ROLES.values()) - code == set(), "custom-role permissions the code never uses"


def test_defect1_functions_token_carries_userinfo_email_for_emailed_rbac(terraform):
    """GKE maps a token to the account's email only with the userinfo.email scope; RBAC names the email."""
    from meshjoin import runtime

    assert "https://www.googleapis.com/auth/userinfo.email" in runtime.SCOPES
    assert "https://www.googleapis.com/auth/cloud-platform" in runtime.SCOPES
    assert unref(terraform.locals["kube_user"]) == "google_service_account.functions.email"


def test_per_vm_secret_grant_is_conditioned_on_the_prefix(terraform):
    binding = terraform.resource("google_project_iam_member", "functions_vm_secrets")
    expression = binding["condition"][0]["expression"]
    assert 'resource.name.startsWith("projects/${data.google_project.this.number}/secrets/${var.secret_prefix}-")' \
        in expression
    assert "||" in expression and "&&" not in expression
    # The prefix the condition names is the one the product builds secret ids with.
    prefix = Settings.__dataclass_fields__["secret_prefix"].default
    assert names.secret_id(VmKey("p-roject", "us-central1-a", "vm-1"), prefix).startswith(prefix + "-")
    precondition = binding["lifecycle"][0]["precondition"][0]["condition"]
    assert "local.ca_secrets" in precondition, "the CA secrets must stay outside the per-VM prefix"


def test_acting_as_vm_identities_is_per_bound_account(terraform):
    grant = terraform.resource("google_service_account_iam_member", "act_as_vm")
    assert unref(grant["for_each"]) == "toset(local.bound_service_accounts)"
    # "-": IAM infers the project from the email, so an account of another project is granted on itself.
    assert grant["service_account_id"] == "projects/-/serviceAccounts/${each.value}"
    assert "var.identity_bindings" in terraform.locals["bound_service_accounts"]
    assert terraform.variables["identity_bindings"]["default"] == []


def test_ca_secrets_are_read_on_the_secrets_themselves(terraform):
    grant = terraform.resource("google_secret_manager_secret_iam_member", "ca_reader")
    assert unref(grant["for_each"]) == "local.ca_secrets"
    secret = terraform.resource("google_secret_manager_secret", "ca")
    # managed-by=meshjoin marks per-VM secrets, which the sweep prunes: never on the CA.
    assert names.SECRET_OWNER_LABEL not in secret.get("labels", {})


# --- Kubernetes RBAC -------------------------------------------------------------------------

ALLOWED_VERBS = {"get", "list", "create", "update", "delete"}

# Every request the kube adapter sends, by where it can land: "any" namespace (reads of objects a VM
# left behind elsewhere, and cluster-wide inventories) must be covered by the cluster-wide reader
# role; "bound" namespaces (those identity_bindings name) by the writer role bound there.
KUBE_CALLS = [
    ("list owned WorkloadEntries cluster-wide (inventory, leave)", "list", "workloadentries", "any"),
    ("read an entry before deleting it, in any namespace", "get", "workloadentries", "any"),
    ("list owned Services cluster-wide (inventory)", "list", "services", "any"),
    ("delete_owned reads a Service before pruning it (defect 7)", "get", "services", "any"),
    ("entries selecting an app, per namespace (prune_service)", "list", "workloadentries", "any"),
    ("create an entry", "create", "workloadentries", "bound"),
    ("replace an entry", "update", "workloadentries", "bound"),
    ("delete an entry", "delete", "workloadentries", "bound"),
    ("read a Service before creating it", "get", "services", "bound"),
    ("create a Service", "create", "services", "bound"),
    ("replace meshjoin's Service when the ports change (apply_owned)", "update", "services", "bound"),
    ("pods selecting an app before its Service is pruned (prune_service)", "list", "pods", "bound"),
    ("delete a Service", "delete", "services", "bound"),
    ("read a ServiceAccount before creating it", "get", "serviceaccounts", "bound"),
    ("create a ServiceAccount", "create", "serviceaccounts", "bound"),
]


@pytest.mark.parametrize("call, verb, resource, where", KUBE_CALLS, ids=[c[0] for c in KUBE_CALLS])
def test_defect7_every_kube_call_has_its_verb_where_it_lands(terraform, call, verb, resource, where):
    rules = terraform.locals["reader_rules"] if where == "any" else \
        terraform.locals["writer_rules"] + terraform.locals["reader_rules"]
    assert any(resource in rule["resources"] and verb in rule["verbs"] for rule in rules), \
        f"{call}: RBAC verb {verb} on {resource} is not granted {'cluster-wide' if where == 'any' else 'in the bound namespaces'}"


def test_kube_call_table_covers_every_kind_and_method_the_adapter_uses():
    plural_of = {kind: plural for kind, (_, plural) in kube.PATHS.items()}
    assert {resource for _, _, resource, _ in KUBE_CALLS} == set(plural_of.values())
    methods = set(re.findall(r'_do\("([A-Z]+)"', (REPO / "shared" / "meshjoin" / "adapters" / "kube.py").read_text()))
    assert {kube.RBAC_VERBS[m] for m in methods} | {"list"} == {verb for _, verb, _, _ in KUBE_CALLS}


def test_every_rbac_grant_is_a_call_in_the_table(terraform):
    """The converse of defect 7: no RBAC verb on a resource that no call of the table needs."""
    tabled = {(verb, resource) for _, verb, resource, _ in KUBE_CALLS}
    for rules in (terraform.locals["writer_rules"], terraform.locals["reader_rules"]):
        granted = {(verb, resource) for rule in rules for verb in rule["verbs"] for resource in rule["resources"]}
        assert granted - tabled == set(), "RBAC grants verbs no call of the kube adapter uses"


def test_rbac_covers_exactly_what_the_kube_adapter_touches(terraform):
    local = terraform.locals
    writer = local["writer_rules"]
    reader = local["reader_rules"]
    plural_of = {kind: plural for kind, (_, plural) in kube.PATHS.items()}
    written = {resource for rule in writer for resource in rule["resources"]}
    assert written == set(plural_of.values()), "a kind the adapter handles has no RBAC rule, or vice versa"
    for rule in writer + reader:
        assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
        assert "*" not in rule["resources"] and "*" not in rule["api_groups"]
    # Every HTTP method the adapter sends maps to a verb some rule grants (a PATCH would need "patch").
    methods = set(re.findall(r'_do\("([A-Z]+)"', (REPO / "shared" / "meshjoin" / "adapters" / "kube.py").read_text()))
    assert methods and {kube.RBAC_VERBS[m] for m in methods} <= {v for rule in writer for v in rule["verbs"]}
    # Cluster-wide access is read-only.
    assert {verb for rule in reader for verb in rule["verbs"]} <= {"get", "list"}
    # Per-namespace bindings follow the identity bindings' namespaces.
    assert "var.identity_bindings" in local["rbac_namespaces"]
    binding = terraform.resource("kubernetes_role_binding_v1", "writer")
    subject = binding["subject"][0]
    assert subject["kind"] == "User" and unref(subject["name"]) == "local.kube_user"
    assert unref(local["kube_user"]) == "google_service_account.functions.email"


# --- evaluated by terraform console ----------------------------------------------------------

BINDINGS = ('[{gsa="orders-vm@my-proj.iam.gserviceaccount.com",namespace="apps",serviceAccount="orders",apps=["orders"]},'
            '{gsa="checkout@shared-proj.iam.gserviceaccount.com",namespace="payments",serviceAccount="checkout",'
            'apps=["checkout","cart"]},'
            '{gsa="checkout@shared-proj.iam.gserviceaccount.com",namespace="apps",serviceAccount="checkout",'
            'apps=["checkout"]}]')

# Resource and data references are replaced by a stand-in string so that `terraform console` can
# evaluate the locals and variable validations without providers or state.
_REFERENCE = re.compile(r"(?<![.\w])(?:data\.)?(?:google|kubernetes)_[a-z0-9_]+\.[a-z0-9_]+(?:\[[^\]]*\])?(?:\.[a-z0-9_]+(?:\[[0-9]+\])?)*")


def _locals_only(text: str) -> str:
    blocks = re.findall(r"^locals \{\n.*?^\}\n", text, re.MULTILINE | re.DOTALL)
    return "\n".join(_REFERENCE.sub('"stub"', block) for block in blocks)


@pytest.fixture(scope="module")
def console_module(tmp_path_factory) -> Path:
    module = tmp_path_factory.mktemp("tf-console")
    shutil.copy(TF_DIR / "variables.tf", module / "variables.tf")
    (module / "locals.tf").write_text("\n".join(_locals_only(p.read_text()) for p in sorted(TF_DIR.glob("*.tf"))))
    return module


def console(module: Path, expression: str, **variables) -> subprocess.CompletedProcess:
    """Evaluate `expression`. Note: console reports invalid variables on stderr but exits 0."""
    args = [TERRAFORM, "console", "-no-color"]
    for name, value in {"project_id": "my-proj", "cluster": "projects/other-proj/locations/us-central1/clusters/mesh",
                        **variables}.items():
        args.append(f"-var={name}={value}")
    return subprocess.run(args, input=expression, capture_output=True, text=True, cwd=module, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TF_IN_AUTOMATION": "1", "NO_COLOR": "1",
                               "TF_CLI_CONFIG_FILE": "/dev/null"})


def evaluate(module: Path, expression: str, **variables):
    result = console(module, f"jsonencode({expression})", **variables)
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    return json.loads(json.loads(result.stdout.strip()))


@needs_terraform
def test_rendered_settings_are_accepted_by_the_product(console_module):
    variables = {
        "identity_bindings": BINDINGS,
        "cert_ttl": "12h", "renew_fraction": "0.6", "renew_jitter": "0.2", "key_algorithm": "rsa-2048",
        "istiod_ip": "10.128.15.250", "network": "vm-net", "api_attempts": "3", "prune_cap": "20",
        "sweep_time_budget": "5m", "sweep_workers": "4", "sweep_renewals": "100", "max_event_age": "30m",
        "api_timeout": "20s", "key_rotation_renewals": "5",
    }
    env = evaluate(console_module, "local.function_env", **variables)
    assert env["MESHJOIN_KEY_ROTATION_RENEWALS"] == "5"
    assert all(isinstance(v, str) and v for v in env.values()), "no empty or non-string values"
    settings = Settings.from_env(env)
    assert settings.project == "my-proj"
    assert [(b.gsa, b.subject, b.apps) for b in settings.identity_bindings] == [
        ("orders-vm@my-proj.iam.gserviceaccount.com", "apps/orders", ("orders",)),
        ("checkout@shared-proj.iam.gserviceaccount.com", "payments/checkout", ("checkout", "cart")),
        ("checkout@shared-proj.iam.gserviceaccount.com", "apps/checkout", ("checkout",))]
    assert settings.renew_fraction == 0.6 and settings.renew_jitter_fraction == 0.2
    assert settings.key_algorithm == "rsa-2048" and settings.api_attempts == 3 and settings.prune_cap == 20
    assert settings.sweep_seconds.total_seconds() == 300 and settings.sweep_workers == 4
    assert settings.api_timeout.total_seconds() == 20

    # Unset optional variables are not deployed at all: the product's defaults apply.
    minimal = evaluate(console_module, "local.function_env")
    assert Settings.from_env(minimal) == Settings(project="my-proj", cluster=minimal["MESHJOIN_CLUSTER"],
                                                  events_topic="projects/my-proj/topics/stub")


@needs_terraform
def test_rendered_rbac_manifest_and_sink_filter(console_module):
    rendered = evaluate(console_module, "{ rbac = local.rbac_objects, cluster = local.cluster_project }",
                        identity_bindings=BINDINGS)
    assert rendered["cluster"] == "other-proj"
    kinds = sorted((o["kind"], o["metadata"].get("namespace", "")) for o in rendered["rbac"])
    # Writes in exactly the bound namespaces; cluster-wide only the reader.
    assert kinds == [("ClusterRole", ""), ("ClusterRole", ""), ("ClusterRoleBinding", ""),
                     ("RoleBinding", "apps"), ("RoleBinding", "payments")]
    assert [o["metadata"]["name"] for o in rendered["rbac"] if o["kind"] == "ClusterRoleBinding"] == ["meshjoin-reader"]
    nobody = evaluate(console_module, "local.rbac_objects")
    assert not [o for o in nobody if o["kind"] == "RoleBinding"]


@needs_terraform
def test_bound_accounts_are_acted_as_and_nudge_once_each(console_module):
    """actAs (act_as_vm) and the nudge (vm_nudge) cover each bound account once, whichever project it
    lives in (an account bound in two namespaces is still one account), and nobody when nothing is bound."""
    bound = evaluate(console_module, "{ accounts = local.bound_service_accounts, nudge = local.vm_publishers }",
                     identity_bindings=BINDINGS)
    assert bound["accounts"] == ["orders-vm@my-proj.iam.gserviceaccount.com",
                                 "checkout@shared-proj.iam.gserviceaccount.com"]
    assert sorted(bound["nudge"]) == sorted(bound["accounts"])
    nobody = evaluate(console_module, "{ accounts = local.bound_service_accounts, nudge = local.vm_publishers }")
    assert nobody == {"accounts": [], "nudge": []}


@needs_terraform
@pytest.mark.parametrize("variable, value", [
    ("cluster", "my-cluster"),
    ("cert_ttl", "1 day"),
    ("sweep_time_budget", "9m"),
    ("sweep_interval_minutes", "7"),
    ("key_algorithm", "dsa"),
    ("key_rotation_renewals", "-1"),
    ("renew_fraction", "1.5"),
    ("api_attempts", "0"),
    ("secret_prefix", "bad/prefix"),
    ("extra_settings", '{"OTHER"="x"}'),
    ("name", "Mesh_Join"),
    ("identity_bindings", '[{gsa="not-an-email",namespace="apps",serviceAccount="a",apps=["a"]}]'),
    ("identity_bindings", '[{gsa="a@p-roject.iam.gserviceaccount.com",namespace="kube-system",serviceAccount="a",apps=["a"]}]'),
    ("identity_bindings", '[{gsa="a@p-roject.iam.gserviceaccount.com",namespace="gke-managed-x",serviceAccount="a",apps=["a"]}]'),
    ("identity_bindings", '[{gsa="a@p-roject.iam.gserviceaccount.com",namespace="apps",serviceAccount="a",apps=[]}]'),
    ("identity_bindings", '[{gsa="a@p-roject.iam.gserviceaccount.com",namespace="Apps",serviceAccount="a",apps=["a"]}]'),
])
def test_variable_validation_refuses(console_module, variable, value):
    result = console(console_module, "1", **{variable: value})
    assert "Invalid value for variable" in result.stderr and f"var.{variable} is" in result.stderr, result.stderr


@needs_terraform
def test_variable_validation_accepts_good_values(console_module):
    good = {"cert_ttl": "1h30m", "sweep_time_budget": "7m59s", "sweep_interval_minutes": "15",
            "key_algorithm": "ecdsa-p256", "renew_fraction": "0", "api_attempts": "2", "name": "mesh-join",
            "extra_settings": '{MESHJOIN_FUTURE_SETTING="x"}', "identity_bindings": BINDINGS}
    result = console(console_module, "1", **good)
    assert "Error" not in result.stderr, result.stderr


# --- several VM projects (vm_projects.tf) ----------------------------------------------------

_VM_PROJECT_VM = f"projects/{VM_PROJECT}/zones/us-central1-a/instances/vm-2"
# The Compute calls the product makes for a VM of a further VM project, each on that project's resource.
VM_PROJECT_CALLS = [
    ("get_vm", "compute.instances.get", _VM_PROJECT_VM),
    ("list_vms(project=)", "compute.instances.list", f"projects/{VM_PROJECT}"),
    ("set_metadata", "compute.instances.setMetadata", _VM_PROJECT_VM),
    ("_wait", "compute.zoneOperations.get", f"projects/{VM_PROJECT}/zones/us-central1-a/operations/operation-2"),
    ("guest_attributes", "compute.instances.getGuestAttributes", _VM_PROJECT_VM),
    ("project_metadata(project)", "compute.projects.get", f"projects/{VM_PROJECT}"),
]


@pytest.mark.parametrize("call, permission, resource", VM_PROJECT_CALLS, ids=[c[0] for c in VM_PROJECT_CALLS])
def test_every_compute_call_is_granted_in_a_further_vm_project(terraform, call, permission, resource):
    assert permitted(terraform, FUNCTIONS_SA, permission, resource) == \
        ["google_project_iam_member.functions_compute_vm_projects"], f"{call}: {permission} on {resource}"


def test_nothing_but_compute_is_granted_in_a_further_vm_project(terraform):
    """A VM project holds VMs only: no Secret Manager, cluster or other grant follows it there."""
    per_project = [name for (rtype, name), body in terraform.resources.items()
                   if rtype == "google_project_iam_member" and "other_vm_projects" in str(body.get("for_each", ""))]
    assert per_project == ["functions_compute_vm_projects"]
    for permission in ("secretmanager.secrets.list", "secretmanager.secrets.delete", "container.clusters.get",
                       "compute.instances.create", "compute.instances.delete", "compute.instances.setLabels"):
        assert permitted(terraform, FUNCTIONS_SA, permission, f"projects/{VM_PROJECT}") == [], permission


def test_each_further_vm_project_has_the_hosts_sink_into_the_events_topic(terraform):
    sink = terraform.resource("google_logging_project_sink", "vm_events_vm_projects")
    assert unref(sink["for_each"]) == "toset(local.other_vm_projects)" and sink["project"] == "${each.value}"
    assert sink["destination"] == terraform.resource("google_logging_project_sink", "vm_events")["destination"]
    # The host's filter, with the project's own audit log in place of the host's.
    assert "google_logging_project_sink.vm_events.filter" in sink["filter"] and "${each.value}/logs/" in sink["filter"]
    assert sink["unique_writer_identity"] is True


@needs_terraform
def test_vm_projects_reach_the_functions_host_first_and_once(console_module):
    rendered = evaluate(console_module, "{ p = local.vm_projects, o = local.other_vm_projects, "
                                        "s = local.function_settings.MESHJOIN_VM_PROJECTS }",
                        vm_projects='["vm-proj","my-proj","vm-proj","b-proj"]')
    assert rendered == {"p": ["my-proj", "vm-proj", "b-proj"], "o": ["vm-proj", "b-proj"], "s": "my-proj,vm-proj,b-proj"}
    assert Settings.from_env({"MESHJOIN_PROJECT": "my-proj", "MESHJOIN_CLUSTER": CLUSTER,
                              "MESHJOIN_VM_PROJECTS": rendered["s"]}).vm_projects == tuple(rendered["p"])
    alone = evaluate(console_module, "{ o = local.other_vm_projects, s = local.function_env }")
    assert alone["o"] == [] and "MESHJOIN_VM_PROJECTS" not in alone["s"]  # unset: the product's default
