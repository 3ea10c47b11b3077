"""Rendering of the VM bootstrap and the cluster objects: shapes, quoting, no key material."""

from __future__ import annotations

import json
import shlex
import subprocess
from datetime import datetime, timezone

import jsonschema
import pytest
import yaml

from meshjoin import bootstrap, names, registration
from meshjoin.model import Identity, Vm, VmKey
from meshjoin.settings import Settings
from meshjoin_sandbox.crds import istio_crds_path

SETTINGS = Settings(project="my-project", cluster="projects/my-project/locations/us-central1/clusters/mesh",
                    istiod_ip="10.0.0.9", network="vpc-1", mesh_id="mesh1")
KEY = VmKey("my-project", "us-central1-a", "vm-1")
IDENTITY = Identity("apps", "orders", "orders", "v2", {"http": 8080, "grpc": 9090})
VM = Vm(KEY, "4242", {"mesh": "join"}, {}, "fp", "10.128.0.7", "vm@my-project.iam.gserviceaccount.com")
CRDS = istio_crds_path()


def parse_env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        (parsed,) = shlex.split(value) or [""]
        out[name] = parsed
    return out


def test_cluster_env_has_istioctl_keys_and_certs_dir():
    env = parse_env(bootstrap.cluster_env(KEY, IDENTITY, SETTINGS))
    for name in ("ISTIO_NAMESPACE", "ISTIO_SERVICE", "ISTIO_SERVICE_CIDR", "ISTIO_INBOUND_PORTS",
                 "ISTIO_LOCAL_EXCLUDE_PORTS", "SERVICE_ACCOUNT", "CANONICAL_SERVICE", "CANONICAL_REVISION",
                 "ISTIO_META_CLUSTER_ID", "ISTIO_META_MESH_ID", "ISTIO_META_NETWORK", "ISTIO_META_DNS_CAPTURE",
                 "ISTIO_META_WORKLOAD_NAME", "POD_NAMESPACE", "TRUST_DOMAIN"):
        assert name in env, name
    assert env["ISTIO_SERVICE"] == "orders.apps" and env["SERVICE_ACCOUNT"] == "orders"
    assert env["FILE_MOUNTED_CERTS"] == "true"
    assert env["ISTIO_INBOUND_PORTS"] == "8080,9090"
    assert json.loads(env["ISTIO_METAJSON_LABELS"])["app"] == "orders"


def test_istio_start_sees_file_mounted_certificates_and_no_provisioning():
    """meshjoin is the only issuer: istio-agent serves the files and never renews through istiod.
    istio-start.sh defaults PROV_CERT and OUTPUT_CERTS to ./etc/certs when they are UNSET (`${X-...}`),
    so cluster.env sets them empty; what the script then sees is checked the way it expands them."""
    text = bootstrap.cluster_env(KEY, IDENTITY, SETTINGS)
    script = 'set -a; source /dev/stdin; echo "[${PROV_CERT-./etc/certs}][${OUTPUT_CERTS-./etc/certs}][$FILE_MOUNTED_CERTS]"'
    out = subprocess.run(["bash", "-c", script], input=text, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[][][true]"


def test_mesh_config_points_istiods_connection_at_the_files():
    """With file-mounted certificates istio-agent reads the client files for istiod from proxyMetadata."""
    metadata = json.loads(bootstrap.mesh_config(SETTINGS))["defaultConfig"]["proxyMetadata"]
    assert (metadata["ISTIO_META_TLS_CLIENT_CERT_CHAIN"], metadata["ISTIO_META_TLS_CLIENT_KEY"],
            metadata["ISTIO_META_TLS_CLIENT_ROOT_CERT"]) == ("/etc/certs/cert-chain.pem", "/etc/certs/key.pem",
                                                             "/etc/certs/root-cert.pem")


def test_cluster_env_is_sourceable_by_bash():
    text = bootstrap.cluster_env(KEY, IDENTITY, SETTINGS)
    out = subprocess.run(["bash", "-c", 'set -a; source /dev/stdin; echo "$ISTIO_METAJSON_LABELS"'],
                         input=text, capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["version"] == "v2"


def test_cluster_env_refuses_multiline_values():
    evil = Identity("apps", "orders", "orders", "v2\nEVIL=1", {})
    with pytest.raises(ValueError):
        bootstrap.cluster_env(KEY, evil, SETTINGS)


def test_mesh_config_is_what_terraforms_jsonencode_writes():
    """agent.tf renders it with `"${jsonencode(...)}\\n"`: keys sorted, compact, Go's HTML escapes."""
    settings = Settings(project="p", cluster=SETTINGS.cluster, mesh_id="m<&>")
    text = bootstrap.mesh_config(settings)
    assert text.endswith("}\n") and " " not in text and "\\u003c\\u0026\\u003e" in text
    assert json.loads(text)["defaultConfig"]["meshId"] == "m<&>"
    assert list(json.loads(text)["defaultConfig"]) == ["discoveryAddress", "meshId", "proxyMetadata"]


def test_mesh_config_and_hosts():
    assert json.loads(bootstrap.mesh_config(SETTINGS))["defaultConfig"]["discoveryAddress"] == \
        "istiod.istio-system.svc:15012"
    assert bootstrap.hosts_lines(SETTINGS) == "10.0.0.9 istiod.istio-system.svc\n"
    assert bootstrap.hosts_lines(Settings(project="p", cluster=SETTINGS.cluster)) == ""


def test_bootstrap_items_carry_no_key_and_the_final_keys():
    items = bootstrap.bootstrap_items(KEY, IDENTITY, SETTINGS, root_pem="ROOT")
    # What every VM shares (mesh config, hosts, key algorithm, ...) is in project metadata, not here.
    assert set(items) == {names.CLUSTER_ENV_KEY, names.ROOT_CERT_KEY, names.STARTUP_SCRIPT_KEY,
                          names.GUEST_ATTRIBUTES_KEY}
    assert names.SECRET_KEY not in items  # legacy only: no per-VM secret any more
    shared = bootstrap.deployment_items(SETTINGS)
    assert set(shared) == {names.MESH_ENV_KEY, names.MESH_CONFIG_KEY, names.HOSTS_KEY, names.KEY_ALGORITHM_KEY} and \
        set(shared) <= set(names.DEPLOYMENT_KEYS)
    assert shared[names.KEY_ALGORITHM_KEY] == "ecdsa-p256"  # what the agent generates
    assert items[names.GUEST_ATTRIBUTES_KEY] == "TRUE"  # the agent hands in its CSR and confirms through them
    assert not any("PRIVATE KEY" in v for v in items.values())
    assert names.STARTUP_SCRIPT_MARKER in items[names.STARTUP_SCRIPT_KEY]


def test_key_algorithm_item_follows_the_setting_and_agent_version_is_3():
    settings = Settings.from_env({"MESHJOIN_PROJECT": "my-proj", "MESHJOIN_CLUSTER": SETTINGS.cluster,
                                  "MESHJOIN_KEY_ALGORITHM": "rsa-2048"})
    assert bootstrap.deployment_items(settings)[names.KEY_ALGORITHM_KEY] == "rsa-2048"
    assert bootstrap.AGENT_VERSION == "3"
    assert (names.CERT_CHAIN_KEY, names.KEY_ALGORITHM_KEY, names.REKEY_KEY) == \
        ("meshjoin-cert-chain", "meshjoin-key-algorithm", "meshjoin-rekey")


def test_defect3_bootstrap_names_the_events_topic_for_the_agents_nudge():
    settings = Settings.from_env({"MESHJOIN_PROJECT": "my-proj", "MESHJOIN_CLUSTER": SETTINGS.cluster,
                                  "MESHJOIN_EVENTS_TOPIC": "meshjoin-events"})
    items = bootstrap.deployment_items(settings)
    assert items[names.EVENTS_TOPIC_KEY] == "projects/my-proj/topics/meshjoin-events"
    assert items[names.PUBSUB_ENDPOINT_KEY] == "https://pubsub.googleapis.com"
    script = bootstrap.agent_text()  # what the VM's startup-script stub fetches and runs
    # The agent reports in the namespace and keys meshjoin reads, and only then nudges.
    for key in ("agent-version", "cert-serial", "sidecar", "updated"):
        assert key in script
    assert "instance/guest-attributes/meshjoin" in script
    assert ":publish" in script


def _schema(kind: str) -> dict:
    for doc in yaml.safe_load_all(CRDS.read_text()):
        if doc and doc["spec"]["names"]["kind"] == kind:
            version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(kind)


def test_workload_entry_valid_against_istio_schema():
    entry = registration.workload_entry(VM, IDENTITY, "vpc-1", datetime(2026, 1, 1, tzinfo=timezone.utc))
    jsonschema.validate(entry["spec"], _schema("WorkloadEntry")["properties"]["spec"])
    assert entry["spec"]["address"] == "10.128.0.7" and entry["spec"]["locality"] == "us-central1/us-central1-a"
    assert entry["metadata"]["labels"][names.MANAGED_BY_LABEL] == "meshjoin"
    assert entry["metadata"]["annotations"]["meshjoin.dev/instance-id"] == "4242"
    assert entry["metadata"]["name"] == "vm-1-us-central1-a-my-project"  # the project is part of ownership


def test_service_only_with_ports():
    assert registration.service(Identity("a", "b", "c", "v", {})) is None
    svc = registration.service(IDENTITY)
    assert svc["spec"]["selector"] == {"app": "orders"}
    assert [p["port"] for p in svc["spec"]["ports"]] == [9090, 8080]


def test_entry_matches_ignores_server_fields():
    desired = registration.workload_entry(VM, IDENTITY, "", datetime(2026, 1, 1, tzinfo=timezone.utc))
    existing = json.loads(json.dumps(desired))
    existing["metadata"].update(uid="u", resourceVersion="7")
    assert registration.entry_matches(existing, desired)
    existing["spec"]["address"] = "10.0.0.1"
    assert not registration.entry_matches(existing, desired)
