"""The sandbox as a person uses it: real gcloud, real kubectl, the audit sink, and a clean `down`."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess

from google.cloud import pubsub_v1

from meshjoin.events import Ignored, decode_push
from meshjoin.model import VmKey

from .conftest import MESHJOIN, REPO, wait_for


def test_gcloud_publish_reaches_the_event_function(sandbox):
    sandbox.publish("{}")
    wait_for(lambda: [e for e in sandbox.function_log() if e.get("outcome") == "rejected"
                      and "neither a Cloud Audit Log entry" in e["message"]], what="the function's log line")


def test_kubectl_works_with_the_env_file_alone(sandbox):
    namespaces = sandbox.run("kubectl", "get", "namespaces").stdout
    assert "default" in namespaces and "istio-system" in namespaces
    result = sandbox.run("kubectl", "get", "workloadentries", "-A")
    assert result.returncode == 0


def test_create_vm_publishes_audit_entries_like_a_log_router_sink(sandbox):
    """A pull subscription taps the events topic; the entries decode with DESIGN.md's shapes."""
    os.environ["PUBSUB_EMULATOR_HOST"] = sandbox.env_vars["PUBSUB_EMULATOR_HOST"]
    subscriber = pubsub_v1.SubscriberClient()
    topic = f"projects/{sandbox.project}/topics/{sandbox.env_vars['MESHJOIN_EVENTS_TOPIC']}"
    tap = subscriber.subscription_path(sandbox.project, "test-audit-tap")
    subscriber.create_subscription(name=tap, topic=topic)
    sandbox.meshjoin("sandbox", "create-vm", "audit-vm", "--label", "mesh=join")

    entries = []

    def pulled():
        response = subscriber.pull(subscription=tap, max_messages=10, timeout=5)
        if response.received_messages:
            subscriber.acknowledge(subscription=tap, ack_ids=[m.ack_id for m in response.received_messages])
        entries.extend(json.loads(m.message.data) for m in response.received_messages)
        return len(entries) >= 2

    wait_for(pulled, what="two audit entries")
    first, last = entries[0], entries[1]
    vm = sandbox.vm("audit-vm")
    for entry in (first, last):
        proto = entry["protoPayload"]
        assert proto["serviceName"] == "compute.googleapis.com"
        assert proto["methodName"] == "v1.compute.instances.insert"
        assert proto["resourceName"] == f"projects/{sandbox.project}/zones/{sandbox.zone}/instances/audit-vm"
        assert entry["resource"]["labels"]["instance_id"] == vm["id"]
        assert entry["severity"] == "NOTICE"
    # Only the first entry of an operation carries the (type-only) request, as in Cloud Logging.
    assert first["protoPayload"]["request"] == {"@type": "type.googleapis.com/compute.instances.insert"}
    assert first["operation"].get("first") is True and not first["operation"].get("last")
    assert last["operation"].get("last") is True
    assert first["operation"]["id"] == last["operation"]["id"]

    from datetime import datetime, timedelta, timezone

    now, age = datetime.now(timezone.utc), timedelta(hours=1)

    def as_push(entry):  # Pub/Sub stamps every delivered message with publishTime
        return {"message": {"data": base64.b64encode(json.dumps(entry).encode()).decode(),
                            "publishTime": now.isoformat().replace("+00:00", "Z")}}

    assert decode_push(as_push(last), now=now, max_age=age) == VmKey(sandbox.project, sandbox.zone, "audit-vm")
    try:
        decode_push(as_push(first), now=now, max_age=age)
        raise AssertionError("the first entry should be ignored")
    except Ignored:
        pass
    subscriber.delete_subscription(subscription=tap)


def test_product_code_never_imports_the_sandbox():
    offenders = []
    for root in (REPO / "shared", REPO / "functions"):
        for path in root.rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                modules = []
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules = [node.module]
                offenders += [f"{path}: {m}" for m in modules if m.split(".")[0] == "meshjoin_sandbox"]
    assert offenders == []


def test_down_leaves_no_process_behind(tmp_path):
    state = tmp_path / "sbx"
    up = subprocess.run([MESHJOIN, "sandbox", "up", "--state-dir", str(state)], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stderr
    pids = json.loads((state / "pids.json").read_text())
    assert set(pids) == {"pubsub", "world", "events_fn", "maintenance_fn"}
    # The Pub/Sub emulator is a shell wrapper around Java, functions-framework runs gunicorn workers:
    # every one of them must be in a group that `down` signals.
    members = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    in_groups = [line.split()[0] for line in members if line.split() and int(line.split()[1]) in pids.values()]
    assert len(in_groups) >= len(pids)
    down = subprocess.run([MESHJOIN, "sandbox", "down", "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    left = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    survivors = [line for line in left if line.split() and int(line.split()[1]) in pids.values()]
    assert survivors == []
    assert not (state / "pids.json").exists()


def test_gcloud_reads_vms_and_secrets_as_the_operator(sandbox):
    """With the env file sourced, real gcloud is the project owner (issue 13: it used to get 401)."""
    sandbox.meshjoin("sandbox", "create-vm", "gcloud-vm", "--label", "team=a", "--service-account",
                     f"gcloud-vm@{sandbox.project}.iam.gserviceaccount.com")
    listed = sandbox.run("gcloud", "compute", "instances", "list", "--format=value(name)").stdout.split()
    assert "gcloud-vm" in listed
    described = sandbox.run("gcloud", "compute", "instances", "describe", "gcloud-vm", "--zone", sandbox.zone,
                            "--format=value(labels.team)").stdout.strip()
    assert described == "a"
    secrets = sandbox.run("gcloud", "secrets", "list", "--format=value(name)").stdout.split()
    assert {"istio-ca-key", "istio-root-cert"} <= set(secrets)
    root = sandbox.run("gcloud", "secrets", "versions", "access", "latest", "--secret", "istio-root-cert").stdout
    assert root == sandbox.ca_file("root-cert.pem").read_text()


def test_sandbox_token_speaks_for_any_account_and_iam_decides(sandbox):
    """`meshjoin sandbox token --as`: the functions' account reads the CA key, anybody else gets 403."""
    import requests

    functions = sandbox.env_vars["MESHJOIN_SANDBOX_FUNCTIONS_SA"]
    url = (f"{sandbox.env_vars['MESHJOIN_SECRETMANAGER_ENDPOINT']}/v1/projects/{sandbox.project}"
           "/secrets/istio-ca-key/versions/latest:access")

    def access(token: str | None) -> requests.Response:
        return requests.get(url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=10)

    mine = sandbox.meshjoin("sandbox", "token", "--as", functions).stdout.strip()
    assert access(mine).status_code == 200
    stranger = sandbox.meshjoin("sandbox", "token", "--as", f"stranger@{sandbox.project}.iam.gserviceaccount.com",
                                "--scope", "cloud-platform").stdout.strip()
    refused = access(stranger)
    assert refused.status_code == 403 and refused.json()["error"]["status"] == "PERMISSION_DENIED"
    assert access(None).status_code == 401
    narrow = sandbox.meshjoin("sandbox", "token", "--as", functions, "--scope", "userinfo.email").stdout.strip()
    assert access(narrow).json()["error"]["message"] == "Request had insufficient authentication scopes."


def test_an_undeclared_terraform_variable_stops_up_with_its_name(tmp_path):
    up = subprocess.run([MESHJOIN, "sandbox", "up", "--state-dir", str(tmp_path), "--terraform-var", "no_such=1"],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode != 0 and "not declared by the module: no_such" in up.stderr
    assert not (tmp_path / "pids.json").exists() or "pubsub" not in (tmp_path / "pids.json").read_text()
