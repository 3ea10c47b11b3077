"""Identity comes from the VM's service account (issue 15, done-when cases), through the whole sandbox:
audit event → Pub/Sub → events function, and the maintenance function's sweep on a tick.

The session sandbox binds orders@meshjoin-sandbox.iam.gserviceaccount.com to apps/orders (app orders), as
the sandbox's default configuration and the demo do, plus the test VMs' own accounts (conftest.E2E_BINDINGS).
"""

from __future__ import annotations

import json

from .conftest import account, wait_for

ORDERS = account("orders")
ORDERS_LABELS = ("--label", "mesh=join", "--label", "mesh-namespace=apps", "--label", "mesh-service-account=orders",
                 "--label", "mesh-app=orders", "--metadata", "mesh-ports=http:8080")


def create(sandbox, name: str, *args: str, service_account: str | None = None) -> None:
    extra = ("--service-account", service_account) if service_account else ()
    sandbox.meshjoin("sandbox", "create-vm", name, *extra, *args)


def denied_in_log(sandbox, name: str) -> dict:
    """The events function's denial line: for an unbound account it is the only trace (nothing is written)."""
    return wait_for(lambda: next((e for e in sandbox.function_log() if e.get("instance") == name
                                  and e.get("outcome") == "denied"), None), what=f"{name} denied in the log")


def nothing_written(sandbox, name: str) -> None:
    metadata = sandbox.metadata(name)
    assert "meshjoin-status" not in metadata and "meshjoin-cert-chain" not in metadata
    assert sandbox.entries_for(name) == []


def test_a_vm_running_as_the_bound_account_joins(sandbox):
    create(sandbox, "orders-2", *ORDERS_LABELS, service_account=ORDERS)
    status = sandbox.join_confirmed("orders-2")
    assert status["identity"] == "spiffe://cluster.local/ns/apps/sa/orders"
    (entry,) = sandbox.entries_for("orders-2")
    assert entry["metadata"]["labels"]["app"] == "orders" and entry["spec"]["serviceAccount"] == "orders"
    assert entry["metadata"]["annotations"]["meshjoin.dev/project"] == sandbox.project


def test_the_same_labels_on_an_unbound_account_are_denied_with_nothing_written(sandbox):
    create(sandbox, "unbound-1", *ORDERS_LABELS, service_account=account("unbound-1"))
    line = denied_in_log(sandbox, "unbound-1")
    assert "unbound-1@meshjoin-sandbox.iam.gserviceaccount.com is bound to no mesh identity" in line["message"]
    nothing_written(sandbox, "unbound-1")
    explained = json.loads(sandbox.meshjoin("explain", "unbound-1", "--json").stdout)
    assert explained["decision"].startswith("denied: service account unbound-1@")
    row = next(r for r in json.loads(sandbox.meshjoin("status", "--json").stdout) if r["name"] == "unbound-1")
    assert row["state"] == "denied"


def test_a_bound_account_asking_for_another_kubernetes_service_account_is_denied(sandbox):
    create(sandbox, "orders-greedy", "--label", "mesh=join", "--label", "mesh-namespace=apps",
           "--label", "mesh-service-account=payments", service_account=ORDERS)
    status = wait_for(lambda: (s := sandbox.status("orders-greedy")).get("state") == "denied" and s,
                      what="orders-greedy denied")
    assert f"{ORDERS} is not bound to apps/payments" in status["reason"]
    assert sandbox.entries_for("orders-greedy") == []


def test_a_vm_on_the_default_compute_account_is_denied(sandbox):
    create(sandbox, "default-sa-1", *ORDERS_LABELS)  # no --service-account: the project's default compute account
    assert sandbox.vm("default-sa-1")["serviceAccounts"][0]["email"].endswith("-compute@developer.gserviceaccount.com")
    line = denied_in_log(sandbox, "default-sa-1")
    assert "default compute service account" in line["message"]
    nothing_written(sandbox, "default-sa-1")


def test_hostile_mesh_ports_do_not_stop_a_sweep_and_a_lost_event_still_joins(sandbox):
    create(sandbox, "bad-ports", "--label", "mesh=join", "--metadata", "mesh-ports=http:²", "--no-event",
           service_account=account("bad-ports"))
    create(sandbox, "lost-2", "--label", "mesh=join", "--no-event", service_account=account("lost-2"))
    before = [e for e in sandbox.function_log("maintenance_fn") if e.get("outcome") == "swept"]
    sandbox.meshjoin("sandbox", "tick")
    summary = wait_for(lambda: next(iter([e for e in sandbox.function_log("maintenance_fn")
                                          if e.get("outcome") == "swept"][len(before):]), None),
                       timeout=60, what="the sweep's summary line")
    assert not [e for e in sandbox.function_log("maintenance_fn") if "sweep aborted" in e.get("message", "")]
    # The sweep published lost-2's join; the events function did meshjoin's part (delivered, waiting for
    # its agent), then the VM confirms.
    assert summary["published_join"] >= 1 and summary["denied"] >= 1, summary
    wait_for(lambda: sandbox.status("lost-2").get("state") in ("waiting", "joined"), timeout=60,
             what="lost-2 bootstrapped by the events function")
    assert sandbox.join_confirmed("lost-2")["state"] == "joined"
    bad = wait_for(lambda: (s := sandbox.status("bad-ports")).get("state") == "denied" and s, timeout=60,
                   what="bad-ports denied by the events function")
    assert "not name:port" in bad["reason"]
    # The operator's sweep prints no traceback either.
    result = sandbox.meshjoin("reconcile", "--dry-run", check=False)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr
