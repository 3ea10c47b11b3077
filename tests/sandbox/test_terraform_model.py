"""meshjoin_sandbox.terraform: deploy/terraform evaluated as `terraform plan` would, or a loud refusal."""

from __future__ import annotations

import shutil

import pytest

from meshjoin_sandbox.terraform import TerraformError, default_terraform_dir, load_terraform, parse_expression

# b@ is bound twice (two namespaces): one actAs grant, one nudge grant, distinct() as in iam.tf.
BINDINGS = [{"gsa": "b@p1.iam.gserviceaccount.com", "namespace": "apps", "serviceAccount": "b", "apps": ["b"]},
            {"gsa": "a@p1.iam.gserviceaccount.com", "namespace": "payments", "serviceAccount": "a", "apps": ["a"]},
            {"gsa": "b@p1.iam.gserviceaccount.com", "namespace": "payments", "serviceAccount": "b", "apps": ["b"]}]
VARS = {"project_id": "p1", "cluster": "projects/p1/locations/us-central1/clusters/mesh", "identity_bindings": BINDINGS}


@pytest.fixture(scope="module")
def model():
    return load_terraform(default_terraform_dir(), VARS, project_number="42")


def write_module(tmp_path, text: str):
    (tmp_path / "main.tf").write_text(text)
    return tmp_path


def test_locals_interpolate_variables_and_computed_attributes(model):
    assert model.locals["functions_member"] == "serviceAccount:meshjoin-functions@p1.iam.gserviceaccount.com"
    assert model.locals["role_prefix"] == "meshjoin"
    assert model.locals["cluster_location"] == "us-central1"
    assert model.locals["pubsub_agent"] == "serviceAccount:service-42@gcp-sa-pubsub.iam.gserviceaccount.com"
    assert model.locals["rbac_cluster_bindings"] == ["meshjoin-reader"]
    kinds = [(o["kind"], o["metadata"].get("namespace")) for o in model.locals["rbac_objects"]]
    assert kinds == [("ClusterRole", None), ("ClusterRole", None), ("RoleBinding", "apps"),
                     ("RoleBinding", "payments"), ("ClusterRoleBinding", None)]


def test_for_each_over_a_set_is_ordered_and_keyed_like_terraform(model):
    grants = model.resources("google_service_account_iam_member")
    act_as = [g for g in grants if g["_name"] == "act_as_vm"]
    assert [g["_key"] for g in act_as] == ["a@p1.iam.gserviceaccount.com", "b@p1.iam.gserviceaccount.com"]
    assert model.locals["bound_service_accounts"] == ["b@p1.iam.gserviceaccount.com", "a@p1.iam.gserviceaccount.com"]
    # ... and the for_each of the nudge grants (their topic id is known only after apply).
    assert model.locals["vm_publishers"] == ("a@p1.iam.gserviceaccount.com", "b@p1.iam.gserviceaccount.com")
    # projects/-/: the account may live in another project (deploy/terraform/iam.tf)
    assert act_as[0]["service_account_id"] == "projects/-/serviceAccounts/a@p1.iam.gserviceaccount.com"


def test_conditions_and_cross_resource_references(model):
    member = {g["_name"]: g for g in model.resources("google_project_iam_member")}["functions_vm_secrets"]
    assert member["role"] == "projects/p1/roles/meshjoin.vmSecrets"
    assert member["condition"][0]["expression"] == (
        'resource.name.startsWith("projects/42/secrets/meshjoin-vm-") || '
        'resource.name.startsWith("projects/p1/secrets/meshjoin-vm-")')
    readers = model.resources("google_secret_manager_secret_iam_member")
    assert sorted(r["secret_id"] for r in readers) == ["istio-ca-cert", "istio-ca-key", "istio-cert-chain",
                                                       "istio-root-cert"]


def test_count_and_dynamic_blocks(tmp_path):
    model = load_terraform(default_terraform_dir(), {**VARS, "manage_kubernetes_rbac": False})
    assert model.resources("kubernetes_cluster_role_v1") == []
    assert model.resources("kubernetes_role_binding_v1") == []
    bound = load_terraform(default_terraform_dir(), VARS)
    assert sorted(b["_key"] for b in bound.resources("kubernetes_role_binding_v1")) == ["apps", "payments"]
    assert [b["metadata"][0]["name"] for b in bound.resources("kubernetes_cluster_role_binding_v1")] == ["meshjoin-reader"]
    (writer,) = [r for r in bound.resources("kubernetes_cluster_role_v1") if r["_name"] == "writer"]
    assert [rule["resources"] for rule in writer["rule"]] == [["workloadentries"], ["services"], ["pods"],
                                                              ["serviceaccounts"]]
    nobody = load_terraform(default_terraform_dir(), {**VARS, "identity_bindings": []}, project_number="42")
    assert nobody.resources("kubernetes_role_binding_v1") == []
    assert [g for g in nobody.resources("google_service_account_iam_member") if g["_name"] == "act_as_vm"] == []


def test_distinct_keeps_first_occurrences_in_order_and_takes_lists_only(tmp_path):
    """As Terraform's: objects compare by value, a set converts to a list, a map is refused."""
    directory = write_module(tmp_path, 'locals {\n'
                             '  strings = distinct(["b", "a", "b", "c", "a"])\n'
                             '  objects = distinct([{ a = 1 }, { a = 2 }, { a = 1 }])\n'
                             '  of_set  = distinct(toset(["b", "a"]))\n'
                             '  of_map  = distinct({ a = 1 })\n'
                             '}\n')
    model = load_terraform(directory, {})
    assert model.locals["strings"] == ["b", "a", "c"]
    assert model.locals["objects"] == [{"a": 1}, {"a": 2}]
    assert model.locals["of_set"] == ["a", "b"]
    with pytest.raises(TerraformError, match="distinct takes a list"):
        model.locals["of_map"]


def test_a_precondition_that_fails_fails_the_load(tmp_path):
    """The module refuses a secret_prefix that would cover the CA secrets; so does the sandbox."""
    model = load_terraform(default_terraform_dir(), {**VARS, "secret_prefix": "istio"}, project_number="42")
    with pytest.raises(TerraformError, match="precondition failed: A CA secret id starts with"):
        model.resources("google_project_iam_member")


@pytest.mark.parametrize("expression,why", [
    ("${upper(var.x)}x", "unexpected trailing text"),
    ("${formatdate(\"YYYY\", var.x)}", "function formatdate() is not supported"),
    ("${var.xs[*].id}", "splat expressions are not supported"),
    ("\"%{ if true }x%{ endif }\"", "template directives"),
])
def test_what_it_cannot_evaluate_fails_loudly_naming_file_and_expression(tmp_path, expression, why):
    text = 'variable "x" {\n  type = string\n  default = "a"\n}\nvariable "xs" {\n  type = list(string)\n' \
           '  default = []\n}\nlocals {\n  it = ' + expression.replace("${", "${", 1) + "\n}\n"
    directory = write_module(tmp_path, text)
    try:
        model = load_terraform(directory, {})
    except TerraformError as exc:  # a parse error is as loud
        assert "main.tf" in str(exc)
        return
    with pytest.raises(TerraformError) as failed:
        model.locals["it"]
    assert "main.tf" in str(failed.value) and why in str(failed.value)


def test_undeclared_or_unset_variables_and_lists_in_for_each_are_errors(tmp_path):
    with pytest.raises(TerraformError, match="not declared by the module: nope"):
        load_terraform(default_terraform_dir(), {**VARS, "nope": 1})
    model = load_terraform(default_terraform_dir(), {})
    with pytest.raises(TerraformError, match=r"var.cluster has no value"):
        model.locals["cluster_parts"]
    directory = write_module(tmp_path, 'resource "google_x" "y" {\n  for_each = ["a"]\n  name = each.value\n}\n')
    with pytest.raises(TerraformError, match="for_each needs a map or a set"):
        load_terraform(directory, {}).resources("google_x")


def test_unknown_after_apply_attributes_are_not_guessed(model):
    with pytest.raises(TerraformError, match="known only after apply"):
        # the sink's writer identity is Google's to choose at apply time (iam.tf: sink_publisher)
        model.resources("google_pubsub_topic_iam_member")


def test_expression_parser_precedence():
    assert parse_expression("a && b ? 1 : 0")[0] == "cond"
    assert parse_expression("!a == b")[:2] == ("op", "==")
    assert parse_expression('"x${a}y"')[0] == "template"


def test_a_copy_of_the_module_is_read_from_where_it_is(tmp_path):
    copy = tmp_path / "tf"
    shutil.copytree(default_terraform_dir(), copy)
    (copy / "iam.tf").write_text((copy / "iam.tf").read_text().replace('"compute.instances.list",', ""))
    roles = {r["_name"]: r["permissions"] for r in load_terraform(copy, VARS).resources(
        "google_project_iam_custom_role")}
    assert "compute.instances.list" not in roles["compute"] and "compute.instances.get" in roles["compute"]


def test_file_and_filesha256_read_the_modules_checkout_only(tmp_path):
    import hashlib

    (tmp_path / ".git").mkdir()  # tmp_path is the checkout; the module is a folder in it
    module = tmp_path / "deploy"
    module.mkdir()
    (tmp_path / "agent.sh").write_text("#!/bin/bash\necho ok\n")
    write_module(module, 'locals {\n'
                         '  text = file("${path.module}/../agent.sh")\n'
                         '  sha  = filesha256("${path.module}/../agent.sh")\n'
                         '  key  = "meshjoin-agent-${substr(filesha256("../agent.sh"), 0, 16)}"\n'
                         '  tail = substr("abcdef", -2, -1)\n'
                         '  out  = file("${path.module}/../../outside.txt")\n'
                         '  none = file("missing.txt")\n}\n')
    (tmp_path.parent / "outside.txt").write_text("beside the checkout")
    model = load_terraform(module, {})
    sha = hashlib.sha256(b"#!/bin/bash\necho ok\n").hexdigest()
    assert model.locals["text"] == "#!/bin/bash\necho ok\n"
    assert model.locals["sha"] == sha
    assert model.locals["key"] == "meshjoin-agent-" + sha[:16]  # relative paths are the module's, as in Terraform
    assert model.locals["tail"] == "ef"
    with pytest.raises(TerraformError, match="outside the module's repository"):
        model.local("out")
    with pytest.raises(TerraformError, match="no file missing.txt"):
        model.local("none")


def test_agent_tf_publishes_the_packaged_agent_under_the_key_the_functions_compute(model):
    from meshjoin import bootstrap

    items = [i for i in model.resources("google_compute_project_metadata_item") if ".agent[" in i["_address"]]
    assert [(i["_address"], i["project"]) for i in items] == \
        [('google_compute_project_metadata_item.agent["p1"]', "p1")]
    assert items[0]["key"] == bootstrap.agent_metadata_key()  # Terraform and the functions agree by construction
    assert items[0]["value"] == bootstrap.agent_text()
