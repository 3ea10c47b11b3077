"""The join story through the sandbox: audit events and operator messages → a mesh-ready VM."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from .conftest import wait_for


def sa(name: str) -> str:
    return f"{name}@meshjoin-sandbox.iam.gserviceaccount.com"


def create(sandbox, name: str, *args: str, service_account: str | None = None) -> None:
    sandbox.meshjoin("sandbox", "create-vm", name, "--service-account", service_account or sa(name), *args)


def joined(sandbox, name: str, timeout: float = 20.0) -> dict:
    """meshjoin delivers (waiting), the VM's agent confirms, the VM is joined (issue 13: the VM's own truth)."""
    return sandbox.join_confirmed(name, timeout=timeout)


def test_labelled_vm_joins_with_a_verifiable_identity(sandbox, tmp_path):
    create(sandbox, "web-1", "--label", "mesh=join", "--label", "mesh-namespace=apps",
           "--label", "mesh-service-account=web", "--metadata", "mesh-ports=http:8080")
    status = joined(sandbox, "web-1")
    vm = sandbox.vm("web-1")
    ip = vm["networkInterfaces"][0]["networkIP"]

    assert status["identity"] == "spiffe://cluster.local/ns/apps/sa/web"
    assert status["workloadEntry"] == "apps/web-1-us-central1-a-meshjoin-sandbox"
    entry = sandbox.kubectl_json("get", "workloadentry", "-n", "apps", "web-1-us-central1-a-meshjoin-sandbox")
    assert entry["spec"]["address"] == ip
    assert entry["spec"]["serviceAccount"] == "web"
    assert entry["spec"]["ports"] == {"http": 8080}
    assert entry["metadata"]["annotations"]["meshjoin.dev/instance-id"] == vm["id"]
    assert sandbox.kubectl_json("get", "service", "-n", "apps", "web-1")["spec"]["selector"] == {"app": "web-1"}
    assert sandbox.kubectl_json("get", "serviceaccount", "-n", "apps", "web") is not None

    material = sandbox.secret_payload(status["secret"])
    assert set(material) == {"key.pem", "cert-chain.pem", "root-cert.pem"}
    (tmp_path / "chain.pem").write_text(material["cert-chain.pem"])
    leaf_pem = material["cert-chain.pem"].split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(sandbox.ca_file("root-cert.pem")),
                             "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [status["identity"]]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    key = serialization.load_pem_private_key(material["key.pem"].encode(), None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.PEM, public) == \
        leaf.public_key().public_bytes(serialization.Encoding.PEM, public)
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") == status["certNotAfter"]

    metadata = sandbox.metadata("web-1")
    assert status["secret"] == metadata["meshjoin-secret"]
    assert "PROV_CERT=/etc/certs" in metadata["meshjoin-cluster-env"]
    assert not any("PRIVATE KEY" in value for value in metadata.values())
    assert "PRIVATE KEY" not in sandbox.raw_logs()


def test_vm_without_the_label_gets_nothing(sandbox):
    create(sandbox, "plain-1")
    wait_for(lambda: sandbox.logged("plain-1", "ignored"), what="the ignored log line")
    assert "meshjoin-status" not in sandbox.metadata("plain-1")
    assert sandbox.entries_for("plain-1") == []


def test_set_labels_joins_and_leaves(sandbox):
    create(sandbox, "flip-1")
    wait_for(lambda: sandbox.logged("flip-1", "ignored"), what="the ignored log line")
    sandbox.meshjoin("sandbox", "set-labels", "flip-1", "mesh=join")
    status = joined(sandbox, "flip-1")
    assert len(sandbox.entries_for("flip-1")) == 1

    sandbox.meshjoin("sandbox", "set-labels", "flip-1", "--remove", "mesh")
    wait_for(lambda: sandbox.status("flip-1").get("state") == "left", what="flip-1 left")
    assert sandbox.entries_for("flip-1") == []
    metadata = sandbox.metadata("flip-1")
    assert "meshjoin-secret" not in metadata and "meshjoin-cluster-env" not in metadata
    gone = sandbox.meshjoin("sandbox", "access-secret", status["secret"], check=False)
    assert gone.returncode != 0


def test_delete_vm_leaves(sandbox):
    create(sandbox, "gone-1", "--label", "mesh=join", "--metadata", "mesh-ports=http:8081")
    status = joined(sandbox, "gone-1")
    sandbox.meshjoin("sandbox", "delete-vm", "gone-1")
    wait_for(lambda: sandbox.entries_for("gone-1") == [], what="entry removed")
    wait_for(lambda: sandbox.kubectl_json("get", "service", "-n", "default", "gone-1") is None,
             what="the Service nobody selects any more removed")
    assert sandbox.meshjoin("sandbox", "access-secret", status["secret"], check=False).returncode != 0


def test_operator_message_with_real_gcloud_joins_a_vm_whose_event_was_lost(sandbox):
    create(sandbox, "lost-1", "--label", "mesh=join", "--no-event")
    time.sleep(1.0)
    assert sandbox.status("lost-1") == {}
    sandbox.publish({"project": sandbox.project, "zone": sandbox.zone, "instance": "lost-1"})
    joined(sandbox, "lost-1")


def test_triple_delivery_and_reordering_converge(sandbox):
    """Each message delivered 3 times, a delete's event before the insert's: one entry per live VM."""
    create(sandbox, "dup-live", "--label", "mesh=join", "--no-event")
    create(sandbox, "dup-dead", "--label", "mesh=join", "--no-event")
    sandbox.meshjoin("sandbox", "delete-vm", "dup-dead", "--no-event")
    messages = []
    for name in ("dup-live", "dup-dead"):
        key = {"project": sandbox.project, "zone": sandbox.zone, "instance": name}
        messages += [key] * 3
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(sandbox.publish, messages))
    joined(sandbox, "dup-live")
    wait_for(lambda: len([e for e in sandbox.logged("dup-dead", "left")]) >= 3, what="dead VM handled 3 times")
    wait_for(lambda: len([e for e in sandbox.function_log() if e.get("instance") == "dup-live"
                          and e.get("state") in ("waiting", "joined")]) >= 3, what="live VM handled 3 times")
    assert len(sandbox.entries_for("dup-live")) == 1
    assert sandbox.entries_for("dup-dead") == []
    # Losers of the race destroyed what they minted: exactly the delivered version is usable.
    status = sandbox.status("dup-live")
    assert sandbox.secret_payload(status["secret"])["cert-chain.pem"]


def test_istio_system_and_foreign_service_accounts_are_denied(sandbox):
    create(sandbox, "evil-1", "--label", "mesh=join", "--label", "mesh-namespace=istio-system",
           "--metadata", "mesh-ports=http:8080")
    create(sandbox, "evil-2", "--label", "mesh=join", "--label", "mesh-namespace=payments",
           "--label", "mesh-service-account=admin")
    for name, words in (("evil-1", "not bound to istio-system/*"), ("evil-2", "not bound to payments/admin")):
        status = wait_for(lambda: (s := sandbox.status(name)).get("state") == "denied" and s,
                          what=f"{name} denied")
        assert words in status["reason"]
        assert sandbox.entries_for(name) == []
        secret = f"meshjoin-vm-{sandbox.project}-{sandbox.zone}-{name}"
        assert sandbox.meshjoin("sandbox", "access-secret", secret, check=False).returncode != 0
    assert sandbox.kubectl_json("get", "service", "-n", "istio-system", "evil-1") is None
    assert sandbox.kubectl_json("get", "service", "-n", "payments", "evil-2") is None


def test_defect3_a_vm_labelled_while_running_waits_without_traffic(sandbox):
    """setLabels on a running VM (the common path): GCE runs startup-script only at boot, so meshjoin
    delivers and then waits for the VM's own confirmation; no WorkloadEntry selects it meanwhile."""
    create(sandbox, "late-1", "--metadata", "mesh-ports=http:8080")
    sandbox.meshjoin("sandbox", "set-labels", "late-1", "mesh=join")
    status = wait_for(lambda: (s := sandbox.status("late-1")).get("state") == "waiting" and s,
                      what="late-1 delivered and waiting")
    assert status["certSerial"] and status["secret"].endswith("/versions/1")
    assert "google_metadata_script_runner startup" in status["reason"] and "reboot" in status["reason"]
    assert "workloadEntry" not in status and sandbox.entries_for("late-1") == []
    metadata = sandbox.metadata("late-1")
    assert metadata["enable-guest-attributes"] == "TRUE"
    assert metadata["meshjoin-events-topic"].endswith("/topics/" + sandbox.config["events_topic"])
    # Re-checks change nothing until the VM confirms.
    sandbox.publish({"project": sandbox.project, "zone": sandbox.zone, "instance": "late-1"})
    wait_for(lambda: sandbox.logged("late-1", "rechecked"), what="the re-check logged")
    assert sandbox.status("late-1")["waitingSince"] == status["waitingSince"]
    assert sandbox.entries_for("late-1") == []
