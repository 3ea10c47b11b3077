"""The maintenance sweep through the sandbox: `meshjoin sandbox tick` → Pub/Sub → the maintenance
function, which lists and plans and publishes each VM's work to the events topic → the events
function does it (issue 16). So a summary counts what was published; the work itself is observed on
the VMs and in the cluster once the events function did it."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from cryptography import x509

from meshjoin import pki

from .conftest import private_key_leaks, running_sandbox, verify_vm_identity, wait_for

TTL_SETTINGS = {
    "MESHJOIN_CERT_TTL": "1m",
    "MESHJOIN_RENEW_FRACTION": "0.5",
    "MESHJOIN_RENEW_JITTER": "0.05",
    "MESHJOIN_PRUNE_CAP": "2",
    "MESHJOIN_CA_CACHE": "1s",
    # A new key at every renewal here, so one renewal shows the whole rotation (default: every 3rd).
    "MESHJOIN_KEY_ROTATION_RENEWALS": "1",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with running_sandbox(tmp_path_factory.mktemp("maintenance"), TTL_SETTINGS) as sandbox:
        yield sandbox


def sweeps(world) -> list[dict]:
    return [e for e in world.function_log("maintenance_fn") if e.get("outcome") == "swept"]


def tick(world) -> dict:
    """Publish a tick and return the summary line of the sweep it caused."""
    before = len(sweeps(world))
    world.meshjoin("sandbox", "tick")
    wait_for(lambda: len(sweeps(world)) > before, timeout=60, what="the sweep's summary line")
    return sweeps(world)[before]


def create(world, name: str, *args: str) -> None:
    world.meshjoin("sandbox", "create-vm", name, "--service-account",
                   f"{name}@meshjoin-sandbox.iam.gserviceaccount.com", *args)


def joined(world, name: str) -> dict:
    return world.join_confirmed(name)


def legacy_secret(world, name: str) -> str:
    """A per-VM secret as the previous version of meshjoin made them (labels and id), created by the operator."""
    secret_id = f"meshjoin-vm-{world.project}-{world.zone}-{name}"
    world.run("gcloud", "secrets", "create", secret_id, "--replication-policy=automatic",
              f"--labels=managed-by=meshjoin,meshjoin-project={world.project},meshjoin-zone={world.zone},"
              f"meshjoin-instance={name}")
    return secret_id


def secret_exists(world, secret_id: str) -> bool:
    return world.run("gcloud", "secrets", "describe", secret_id, check=False).returncode == 0


def on_the_vm(world, name: str, serial: str) -> dict:
    """The VM's files once its agent (the watcher) installed certificate `serial`."""
    def installed():
        certs = world.certs(name)
        chain = certs["cert-chain.pem"]
        return chain and format(x509.load_pem_x509_certificates(chain.encode())[0].serial_number, "x") == serial \
            and certs
    return wait_for(installed, timeout=60, what=f"certificate {serial} installed on {name}")


def test_missed_join_and_lost_delete_are_caught_by_the_next_tick(world):
    create(world, "m-lost", "--label", "mesh=join", "--no-event")
    create(world, "m-gone", "--label", "mesh=join", "--metadata", "mesh-ports=http:8080")
    joined(world, "m-gone")
    world.meshjoin("sandbox", "delete-vm", "m-gone", "--no-event")
    assert world.entries_for("m-gone")
    legacy = legacy_secret(world, "m-legacy")  # a VM of the previous version, deleted since

    summary = tick(world)
    # The sweep publishes the missed VM's join and the lost VM's prune; the legacy secret (host project)
    # it prunes itself.
    assert summary["published_join"] >= 1 and summary["published_prune"] >= 1 and summary["pruned"] >= 1, summary
    assert not secret_exists(world, legacy), "the legacy secret of a VM that is gone was not pruned"
    # The events function does meshjoin's part for the missed VM (waiting); it is joined once its agent confirms.
    wait_for(lambda: world.status("m-lost").get("state") == "waiting", timeout=60, what="m-lost bootstrapped")
    assert world.entries_for("m-lost") == []
    world.confirm("m-lost")
    joined(world, "m-lost")
    assert len(world.entries_for("m-lost")) == 1
    wait_for(lambda: world.entries_for("m-gone") == [], timeout=60, what="m-gone's entry pruned")
    wait_for(lambda: world.kubectl_json("get", "service", "-n", "default", "m-gone") is None, timeout=30,
             what="m-gone's Service pruned")
    for key in ("joined", "waiting", "renewed", "reissued", "pruned", "denied", "errors", "deferred", "duration_s",
                "published", "publish_failed", "sweep"):
        assert key in summary


def test_renewal_only_after_the_renewal_point_then_the_vm_rotates_its_key(world):
    create(world, "m-renew", "--label", "mesh=join")
    first = joined(world, "m-renew")
    first_key = world.certs("m-renew")["key.pem"]
    not_before = datetime.fromisoformat(first["certNotBefore"].replace("Z", "+00:00"))
    not_after = datetime.fromisoformat(first["certNotAfter"].replace("Z", "+00:00"))
    due = pki.renewal_time(not_before, not_after, renew_fraction=0.5, jitter_fraction=0.05,
                           jitter_key=f"{world.project}/{world.zone}/m-renew")
    assert datetime.now(timezone.utc) < due, "the test needs to tick before the renewal point"
    tick(world)
    assert world.status("m-renew")["certSerial"] == first["certSerial"], "renewed before its renewal point"

    time.sleep(max(0.0, (due - datetime.now(timezone.utc)).total_seconds()) + 0.5)
    summary = tick(world)
    assert summary["published_renew"] >= 1, summary
    # The renewal (the events function's) re-certified the key the VM holds (it needs nothing from the VM),
    # and, with MESHJOIN_KEY_ROTATION_RENEWALS=1, asked the VM for a new key.
    renewed = wait_for(lambda: (s := world.status("m-renew")).get("certSerial") != first["certSerial"] and s,
                       timeout=60, what="m-renew renewed by the events function")
    assert renewed["certNotAfter"] > first["certNotAfter"] and renewed["certSerial"] != first["certSerial"]
    assert world.metadata("m-renew").get("meshjoin-rekey")
    # The VM's watcher makes the new key and sends its CSR; meshjoin certifies it; the watcher installs it.
    rotated = wait_for(lambda: (s := world.status("m-renew")).get("keyId") != first["keyId"] and s, timeout=60,
                       what="the VM's new key certified")
    certs = on_the_vm(world, "m-renew", rotated["certSerial"])
    assert certs["key.pem"] != first_key and not certs["key.next.pem"]
    verify_vm_identity(certs, first["identity"], world.ca_file("root-cert.pem").read_text())
    assert rotated["state"] == "joined" and len(world.entries_for("m-renew")) == 1


def test_ca_rotation_reissues_every_vm_and_bundles_both_roots(world):
    create(world, "m-rot", "--label", "mesh=join")
    before = joined(world, "m-rot")
    old_root = world.ca_file("root-cert.pem").read_text()
    new_dir = world.meshjoin("sandbox", "rotate-ca").stdout.strip().rsplit(" ", 1)[-1]
    time.sleep(1.2)  # MESHJOIN_CA_CACHE=1s in this sandbox
    summary = tick(world)
    assert summary["published_reissue"] >= 1, summary
    after = wait_for(lambda: (s := world.status("m-rot")).get("caFingerprint") != before["caFingerprint"] and s,
                     timeout=60, what="m-rot re-issued by the events function")
    certs = on_the_vm(world, "m-rot", after["certSerial"])
    roots = certs["root-cert.pem"]
    assert roots.count("BEGIN CERTIFICATE") == 2 and old_root.strip() in roots
    new_root = open(f"{new_dir}/root-cert.pem").read()
    verify_vm_identity(certs, after["identity"], new_root)
    assert world.metadata("m-rot")["meshjoin-root-cert"] == roots
    # Every joined VM of the fleet now carries the new CA.
    wait_for(lambda: {world.status(n).get("caFingerprint") for n in ("m-lost", "m-renew", "m-rot")}
             == {after["caFingerprint"]}, timeout=60, what="every VM re-issued")


def test_listing_failure_prunes_nothing(world):
    create(world, "m-fail", "--label", "mesh=join")
    joined(world, "m-fail")
    world.meshjoin("sandbox", "delete-vm", "m-fail", "--no-event")
    world.meshjoin("sandbox", "fault", "--emulator", "compute", "--method", "instances.aggregatedList",
                   "--status", "503", "--count", "50")
    try:
        summary = tick(world)
    finally:
        world.meshjoin("sandbox", "fault", "--clear")
    assert summary["severity"] == "ERROR" and summary["pruned"] == 0 and summary["published_prune"] == 0, summary
    assert len(world.entries_for("m-fail")) == 1
    assert tick(world)["published_prune"] >= 1
    wait_for(lambda: world.entries_for("m-fail") == [], timeout=60, what="m-fail's entry pruned")


def test_prune_cap_limits_deletions_per_sweep(world):
    names = ["m-cap-1", "m-cap-2", "m-cap-3"]
    for name in names:
        create(world, name, "--label", "mesh=join")
    for name in names:
        joined(world, name)
        world.meshjoin("sandbox", "delete-vm", name, "--no-event")
    summary = tick(world)
    assert summary["published_prune"] == 2, summary
    assert any("exceed MESHJOIN_PRUNE_CAP=2" in e["message"] for e in world.function_log("maintenance_fn"))
    wait_for(lambda: sum(1 for n in names if world.entries_for(n)) == 1, timeout=60, what="two entries pruned")
    time.sleep(2)  # no third one goes: the cap held
    assert sum(1 for n in names if world.entries_for(n)) == 1
    assert tick(world)["published_prune"] == 1
    wait_for(lambda: all(world.entries_for(n) == [] for n in names), timeout=60, what="the last entry pruned")


@pytest.mark.timeout(300)
def test_zz_after_joins_renewals_and_a_ca_rotation_no_private_key_is_outside_the_vms(world):
    names = [n for n in ("m-lost", "m-renew", "m-rot", "m-fail", "m-cap-1", "m-cap-2", "m-cap-3") if world.vm(n)]
    assert private_key_leaks(world, names) == []
