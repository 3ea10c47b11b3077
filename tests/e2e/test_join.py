"""The join story through the sandbox: audit events and operator messages → a mesh-ready VM."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshjoin import bootstrap, names

from .conftest import verify_vm_identity, wait_for


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

    # The VM made its key; meshjoin certified it: the files in the VM's own root verify end to end.
    certs = wait_for(lambda: (c := sandbox.certs("web-1"))["cert-chain.pem"] and c, what="web-1's certificate")
    leaf = verify_vm_identity(certs, status["identity"], sandbox.ca_file("root-cert.pem").read_text())
    (tmp_path / "chain.pem").write_text(certs["cert-chain.pem"])
    leaf_pem = certs["cert-chain.pem"].split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(sandbox.ca_file("root-cert.pem")),
                             "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") == status["certNotAfter"]
    assert format(leaf.serial_number, "x") == status["certSerial"] == status["confirmedSerial"]

    metadata = sandbox.metadata("web-1")
    assert metadata["meshjoin-cert-chain"] == certs["cert-chain.pem"]
    assert "meshjoin-secret" not in metadata
    # meshjoin is the only issuer: istio-agent serves the files, it does not renew through istiod. Those lines are
    # the deployment's (project metadata meshjoin-mesh-env, agent.tf): the agent joined them with the VM's own.
    cluster_env = (sandbox.vm_root("web-1") / "var/lib/istio/envoy/cluster.env").read_text()
    assert "FILE_MOUNTED_CERTS=true\n" in cluster_env and "PROV_CERT=''\n" in cluster_env  # empty: istio-start.sh
    assert cluster_env.startswith(metadata["meshjoin-cluster-env"]) and "SERVICE_ACCOUNT=web\n" in cluster_env
    mesh = json.loads((sandbox.vm_root("web-1") / "etc/istio/config/mesh").read_text())
    assert mesh["defaultConfig"]["discoveryAddress"] == "istiod.istio-system.svc:15012"
    # What every VM shares comes from project metadata only: meshjoin wrote none of it on the VM.
    assert not set(metadata) & set(names.DEPLOYMENT_KEYS), sorted(metadata)
    assert not any("PRIVATE KEY" in value for value in metadata.values())
    assert "PRIVATE KEY" not in sandbox.raw_logs()

    # Issue 16: the agent lives once in project metadata; each item of the VM says its part once.
    assert metadata["startup-script"] == bootstrap.startup_stub()
    roots = x509.load_pem_x509_certificates(metadata["meshjoin-root-cert"].encode())
    assert not set(x509.load_pem_x509_certificates(metadata["meshjoin-cert-chain"].encode())) & set(roots)
    ours = {k: len(k) + len(v.encode()) for k, v in metadata.items() if k != "mesh-ports"}  # mesh-ports: the owner's
    # Issue 16's target: at most 4096 bytes (46,628 before the agent lived once; README, "Metadata size").
    assert ours["startup-script"] < 512 and sum(ours.values()) <= 4096, ours


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
    assert "meshjoin-cert-chain" not in metadata and "meshjoin-cluster-env" not in metadata
    # The watcher on the VM withdraws the identity: istio stopped, key and certificate removed.
    wait_for(lambda: not any(sandbox.certs("flip-1")[f] for f in ("key.pem", "key.next.pem", "cert-chain.pem")),
             timeout=30, what="flip-1's key removed by its agent")
    assert status["identity"]


def test_delete_vm_leaves(sandbox):
    create(sandbox, "gone-1", "--label", "mesh=join", "--metadata", "mesh-ports=http:8081")
    joined(sandbox, "gone-1")
    sandbox.meshjoin("sandbox", "delete-vm", "gone-1")
    wait_for(lambda: sandbox.entries_for("gone-1") == [], what="entry removed")
    wait_for(lambda: sandbox.kubectl_json("get", "service", "-n", "default", "gone-1") is None,
             what="the Service nobody selects any more removed")


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
    # However many passes raced, the VM holds one certificate, for its own key, the one its status names.
    status = sandbox.status("dup-live")
    certs = sandbox.certs("dup-live")
    leaf = verify_vm_identity(certs, status["identity"], sandbox.ca_file("root-cert.pem").read_text())
    assert format(leaf.serial_number, "x") == status["certSerial"]


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
        assert "meshjoin-cert-chain" not in sandbox.metadata(name)
    assert sandbox.kubectl_json("get", "service", "-n", "istio-system", "evil-1") is None
    assert sandbox.kubectl_json("get", "service", "-n", "payments", "evil-2") is None


def test_defect3_a_vm_labelled_while_running_waits_without_traffic(sandbox):
    """setLabels on a running VM (the common path): GCE runs startup-script only at boot, so meshjoin
    delivers and then waits for the VM's own confirmation; no WorkloadEntry selects it meanwhile."""
    create(sandbox, "late-1", "--metadata", "mesh-ports=http:8080")
    sandbox.meshjoin("sandbox", "set-labels", "late-1", "mesh=join")
    status = wait_for(lambda: (s := sandbox.status("late-1")).get("state") == "waiting" and s,
                      what="late-1 bootstrapped and waiting")
    # No agent ran (the VM booted before it was labelled): it sent no key, so nothing was certified.
    assert "certSerial" not in status and "meshjoin-cert-chain" not in sandbox.metadata("late-1")
    assert "google_metadata_script_runner startup" in status["reason"] and "reboot" in status["reason"]
    assert "workloadEntry" not in status and sandbox.entries_for("late-1") == []
    metadata = sandbox.metadata("late-1")
    assert metadata["enable-guest-attributes"] == "TRUE"
    # The agent's nudge goes to the events topic its project's metadata names (agent.tf; none on the VM).
    assert "meshjoin-events-topic" not in metadata
    info = json.loads(sandbox.run("gcloud", "compute", "project-info", "describe", "--format=json").stdout)
    shared = {i["key"]: i["value"] for i in info["commonInstanceMetadata"]["items"]}
    assert shared["meshjoin-events-topic"] == f"projects/{sandbox.project}/topics/{sandbox.config['events_topic']}"
    # Re-checks change nothing until the VM confirms.
    sandbox.publish({"project": sandbox.project, "zone": sandbox.zone, "instance": "late-1"})
    wait_for(lambda: sandbox.logged("late-1", "rechecked"), what="the re-check logged")
    assert sandbox.status("late-1")["waitingSince"] == status["waitingSince"]
    assert sandbox.entries_for("late-1") == []
    # Its owner runs the agent (what the reason says): the VM sends its key, meshjoin certifies, it confirms.
    sandbox.confirm("late-1")
    status = wait_for(lambda: (s := sandbox.status("late-1")).get("state") == "joined" and s, what="late-1 joined")
    verify_vm_identity(sandbox.certs("late-1"), status["identity"], sandbox.ca_file("root-cert.pem").read_text())
    assert len(sandbox.entries_for("late-1")) == 1
