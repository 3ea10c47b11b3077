"""`meshjoin` subcommands against the sandbox, through the env file: tables, JSON, explanations."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import MESHJOIN, wait_for


def meshjoin(sandbox, *args, check=True):
    return sandbox.meshjoin(*args, check=check)


def create(sandbox, name, *args):
    sandbox.meshjoin("sandbox", "create-vm", name, "--service-account",
                     f"{name}@meshjoin-sandbox.iam.gserviceaccount.com", *args)


@pytest.fixture(scope="module")
def fleet(sandbox):
    create(sandbox, "cli-ok", "--label", "mesh=join", "--label", "mesh-namespace=apps",
           "--label", "mesh-service-account=api", "--metadata", "mesh-ports=http:8080")
    create(sandbox, "cli-denied", "--label", "mesh=join", "--label", "mesh-namespace=kube-system")
    sandbox.join_confirmed("cli-ok")
    wait_for(lambda: sandbox.status("cli-denied").get("state") == "denied", what="cli-denied denied")
    return sandbox


def test_status_json_and_table(fleet):
    rows = {r["name"]: r for r in json.loads(meshjoin(fleet, "status", "--json").stdout)}
    ok, denied = rows["cli-ok"], rows["cli-denied"]
    assert ok["state"] == "joined" and ok["namespace"] == "apps" and ok["service_account"] == "api"
    assert ok["address"] == fleet.vm("cli-ok")["networkInterfaces"][0]["networkIP"]
    assert 0 < ok["cert_seconds_left"] <= 24 * 3600
    assert denied["state"] == "denied" and "not bound to kube-system/*" in denied["reason"]
    table = meshjoin(fleet, "status").stdout
    line = next(l for l in table.splitlines() if "cli-ok" in l)
    assert "joined" in line and "apps/api" in line
    assert "cli-denied: service account cli-denied@meshjoin-sandbox.iam.gserviceaccount.com is not bound to " \
        "kube-system/*" in table


def test_explain_a_denied_vm(fleet):
    out = meshjoin(fleet, "explain", "cli-denied").stdout
    assert "decision: denied: service account cli-denied@meshjoin-sandbox.iam.gserviceaccount.com is not bound " \
        "to kube-system/*" in out
    assert "MESHJOIN_IDENTITY_BINDINGS" in out
    data = json.loads(meshjoin(fleet, "explain", "cli-denied", "--json").stdout)
    assert data["decision"].startswith("denied") and data["status"]["state"] == "denied"


def test_explain_a_joined_and_an_unknown_vm(fleet):
    data = json.loads(meshjoin(fleet, "explain", "cli-ok", "--json").stdout)
    assert data["decision"] == "allowed as spiffe://cluster.local/ns/apps/sa/api"
    assert data["facts"]["WorkloadEntry present"] is True
    assert data["advice"] == ["nothing to do: the VM is in the mesh"]
    missing = meshjoin(fleet, "explain", "no-such-vm", check=False)
    assert missing.returncode == 1 and "no VM named 'no-such-vm'" in missing.stderr


def test_dry_run_changes_nothing_then_reconcile_joins(fleet):
    create(fleet, "cli-missed", "--label", "mesh=join", "--no-event")
    plan = json.loads(meshjoin(fleet, "reconcile", "--dry-run", "--json").stdout)
    assert any("cli-missed" in action and action.startswith("join") for action in plan["planned"])
    assert plan["dry_run"] is True
    assert fleet.status("cli-missed") == {}
    # The CLI's sweep, like the maintenance function's, publishes the VM's work to the events topic;
    # the events function does it.
    out = meshjoin(fleet, "reconcile").stdout
    assert "summary:" in out and "published_join=" in out and "published_join=0," not in out
    # meshjoin did its part; the VM has not confirmed (its agent has not run): no traffic, and the remedy.
    wait_for(lambda: fleet.status("cli-missed").get("state") == "waiting", timeout=60,
             what="the events function's join of cli-missed")
    # --inline does the work in the CLI's own process (operators without Pub/Sub).
    create(fleet, "cli-inline", "--label", "mesh=join", "--no-event")
    out = meshjoin(fleet, "reconcile", "--inline").stdout
    assert "summary:" in out and "published=0" in out
    assert fleet.status("cli-inline")["state"] == "waiting"
    explained = meshjoin(fleet, "explain", "cli-missed").stdout
    assert "agent report: none" in explained and "google_metadata_script_runner startup" in explained
    rows = {r["name"]: r for r in json.loads(meshjoin(fleet, "status", "--json").stdout)}
    assert rows["cli-missed"]["state"] == "waiting"


def test_join_forces_a_fresh_certificate_and_leave_removes(fleet):
    before = fleet.status("cli-ok")
    assert "unchanged" in meshjoin(fleet, "join", "cli-ok").stdout  # a plain join of a joined VM: nothing to do
    assert fleet.status("cli-ok")["certSerial"] == before["certSerial"]
    out = meshjoin(fleet, "join", "--force", "cli-ok").stdout
    assert "renewed" in out
    after = fleet.status("cli-ok")
    # A forced join re-certifies the key the VM holds: a new certificate, the same key.
    assert after["certSerial"] != before["certSerial"] and after["keyId"] == before["keyId"]
    # The VM's agent installs the new certificate and nudges the events function, whose pass records the report:
    # a leave before that pass would be undone by it (the VM still carries mesh=join: any event joins it again).
    wait_for(lambda: after["certSerial"].lower() in (fleet.status("cli-ok").get("agent") or "").lower(),
             timeout=60, what="the events function's record of the agent's report of the forced certificate")
    result = meshjoin(fleet, "leave", "cli-ok")
    assert "left" in result.stdout and "still carries mesh=join" in result.stderr
    assert fleet.entries_for("cli-ok") == []
    assert fleet.status("cli-ok")["state"] == "left"


def test_render_shows_bootstrap_without_key(fleet):
    out = meshjoin(fleet, "render", "cli-missed").stdout
    assert "==> cluster.env" in out and "SERVICE_ACCOUNT=default" in out
    assert "==> startup-script" in out and "BEGIN CERTIFICATE" in out
    assert "PRIVATE KEY" not in out


def test_missing_setting_is_named(fleet):
    env = {k: v for k, v in fleet.env.items() if k != "MESHJOIN_CLUSTER"}
    result = subprocess.run([MESHJOIN, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "MESHJOIN_CLUSTER is required" in result.stderr


@pytest.mark.parametrize("command", ["status", "explain", "join", "leave", "reconcile", "render", "sandbox"])
def test_help_is_complete(command):
    out = subprocess.run([MESHJOIN, command, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "Usage: meshjoin" in out and len(out.splitlines()) > 4
