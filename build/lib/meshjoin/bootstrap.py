"""What a VM needs to become a mesh workload, rendered into instance metadata items. Pure.

No private key exists here or anywhere in meshjoin: the VM's agent makes its key on the VM, hands
meshjoin a CSR (guest attribute `meshjoin/csr`) and receives its certificate chain, which is public,
in `meshjoin-cert-chain` (written by the reconcile, not rendered here). Every value that reaches a file on the VM is either validated by
policy (DNS names, ports) or comes from settings, and is still quoted/encoded for its format,
so no label or metadata value can add a line to cluster.env, /etc/hosts or the script.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from functools import lru_cache
from importlib import resources

from . import names
from .model import Identity, VmKey
from .settings import Settings

CERT_DIR = "/etc/certs"
# What the agent reports as guest attribute meshjoin/agent-version; bump with the template.
AGENT_VERSION = "3"
GUEST_NAMESPACE = names.GUEST_NAMESPACE
PUBSUB_ENDPOINT = "https://pubsub.googleapis.com"
# Ports istio-agent and envoy use on the VM itself (istioctl writes the same list).
LOCAL_EXCLUDE_PORTS = "15090,15021,15020"


OPTIONAL_CLUSTER_ENV = ("ISTIO_META_MESH_ID", "ISTIO_META_NETWORK")


def cluster_env(key: VmKey, identity: Identity, settings: Settings) -> str:
    """`/var/lib/istio/envoy/cluster.env`, with the keys `istioctl x workload entry configure` writes: this VM's
    own lines (vm_env(), instance metadata) then those every VM of the deployment shares (mesh_env(), project
    metadata), as the agent joins them."""
    return vm_env(key, identity, settings) + mesh_env(settings)


def vm_env(key: VmKey, identity: Identity, settings: Settings) -> str:
    """The lines of cluster.env that name this VM's identity: `meshjoin-cluster-env`."""
    workload_labels = {
        "app": identity.app,
        "version": identity.version,
        "service.istio.io/canonical-name": identity.app,
        "service.istio.io/canonical-revision": identity.version,
    }
    values = {
        "CANONICAL_REVISION": identity.version,
        "CANONICAL_SERVICE": identity.app,
        "ISTIO_INBOUND_PORTS": ",".join(str(p) for p in identity.ports.values()) or "*",
        "ISTIO_METAJSON_LABELS": json.dumps(workload_labels, separators=(",", ":")),
        "ISTIO_META_WORKLOAD_NAME": identity.app,
        "ISTIO_NAMESPACE": identity.namespace,
        "ISTIO_SERVICE": f"{identity.app}.{identity.namespace}",
        "POD_NAMESPACE": identity.namespace,
        "SERVICE_ACCOUNT": identity.service_account,
    }
    return "".join(f"{name}={_shell_value(value)}\n" for name, value in values.items())


def mesh_env(settings: Settings) -> str:
    """The lines of cluster.env every VM of the deployment shares: `meshjoin-mesh-env`, in project metadata
    (deploy/terraform/agent.tf renders the same text: quoted as shlex.quote does, constants as they are)."""
    values = {
        "ISTIO_LOCAL_EXCLUDE_PORTS": LOCAL_EXCLUDE_PORTS,
        "ISTIO_META_CLUSTER_ID": settings.cluster_id,
        "ISTIO_META_DNS_CAPTURE": "true",
        "ISTIO_META_MESH_ID": settings.mesh_id,
        "ISTIO_META_NETWORK": settings.network,
        "ISTIO_SERVICE_CIDR": "*",
        "TRUST_DOMAIN": settings.trust_domain,
        # istio-agent serves the files meshjoin's agent installs and never renews through istiod:
        # meshjoin is the only issuer of the VM's identity, so a VM that leaves or is denied loses it
        # within one certificate lifetime (MESHJOIN_CERT_TTL). FILE_MOUNTED_CERTS is read from the
        # environment (istio pilot/cmd/pilot-agent/options/options.go). PROV_CERT and OUTPUT_CERTS must be
        # set EMPTY: istio-start.sh defaults both to ./etc/certs when unset, PROV_CERT with
        # FILE_MOUNTED_CERTS is a startup error (options/security.go), and an OUTPUT_CERTS equal to the
        # cert directory makes SDS skip the files (security/pkg/nodeagent/cache/secretcache.go).
        # The agent writes key.pem before cert-chain.pem: istio-agent watches the certificate file.
        "FILE_MOUNTED_CERTS": "true",
        "PROV_CERT": "",
        "OUTPUT_CERTS": "",
    }
    # An empty mesh id or network is istio-agent's default whether set empty or unset: left out.
    # PROV_CERT and OUTPUT_CERTS are the exception: istio-start.sh defaults them when unset.
    return "".join(f"{name}={_shell_value(value)}\n" for name, value in values.items()
                   if value or name not in OPTIONAL_CLUSTER_ENV)


def _shell_value(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError("cluster.env values are single lines")  # policy validation makes this unreachable
    return shlex.quote(value)


def mesh_config(settings: Settings) -> str:
    """`/etc/istio/config/mesh` (JSON is YAML, and json.dumps cannot be tricked into a new key).

    In the form Terraform's `"${jsonencode(...)}\n"` renders (deploy/terraform/agent.tf publishes it to project
    metadata): keys sorted, no spaces, `<`, `>` and `&` escaped as Go's encoder does (tests/deploy compares both)."""
    default_config = {
        "discoveryAddress": settings.istiod_address,
        "proxyMetadata": {
            "CANONICAL_SERVICE_FROM_CLUSTER_ENV": "true",
            # With file-mounted certificates istio-agent's connection to istiod presents these files;
            # it reads them from proxyConfig.proxyMetadata, i.e. this file, not from the environment
            # (istio pkg/istio-agent/agent.go; Istio's own file_mounted_certs integration test sets them here).
            "ISTIO_META_TLS_CLIENT_CERT_CHAIN": f"{CERT_DIR}/cert-chain.pem",
            "ISTIO_META_TLS_CLIENT_KEY": f"{CERT_DIR}/key.pem",
            "ISTIO_META_TLS_CLIENT_ROOT_CERT": f"{CERT_DIR}/root-cert.pem",
        },
    }
    if settings.mesh_id:
        default_config["meshId"] = settings.mesh_id
    return terraform_jsonencode({"defaultConfig": default_config}) + "\n"


def terraform_jsonencode(value) -> str:
    """JSON as Terraform's jsonencode() writes it: object keys sorted, compact, UTF-8 kept, and `<`, `>`, `&`,
    U+2028, U+2029 escaped (Go's encoding/json, which Terraform's cty JSON marshalling uses)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                          ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def hosts_lines(settings: Settings) -> str:
    """Lines for /etc/hosts so the VM resolves istiod (through the east-west gateway IP)."""
    if not settings.istiod_ip:
        return ""
    host = settings.istiod_address.rsplit(":", 1)[0]
    return f"{settings.istiod_ip} {host}\n"


# The agent: one static file shipped in this package (and in each function's bundle). Terraform publishes the
# same file to every VM project's metadata (deploy/terraform/agent.tf), so both sides derive the key and the
# checksum from identical bytes and agree by construction.
AGENT_FILE = "agent/meshjoin-agent.sh"
AGENT_KEY_PREFIX = names.AGENT_KEY_PREFIX
AGENT_KEY_HEX = 16  # hex digits of the SHA-256 in the key: a new agent is a new key


@lru_cache(maxsize=1)
def agent_bytes() -> bytes:
    return (resources.files("meshjoin") / AGENT_FILE).read_bytes()


def agent_text() -> str:
    """The VM agent (bash + openssl), identical for every VM."""
    return agent_bytes().decode()


def agent_sha256() -> str:
    return hashlib.sha256(agent_bytes()).hexdigest()


def agent_metadata_key() -> str:
    """The project metadata item holding this agent: `meshjoin-agent-<first 16 hex of its SHA-256>`."""
    return AGENT_KEY_PREFIX + agent_sha256()[:AGENT_KEY_HEX]


@lru_cache(maxsize=1)
def startup_stub() -> str:
    """The per-VM `startup-script`: fetch the agent from the *project's* metadata (never an instance item of
    the same name, which the VM's owner controls), run it only if its full SHA-256 is the one pinned here,
    else say why on the serial console and exit non-zero. Carries the marker by which meshjoin recognises its
    own script (reconcile keeps an owner's or a project's own script). `GCE_METADATA_HOST` is honoured as
    by the agent and google-auth (the sandbox points it at the VM's own metadata server)."""
    # Terse on purpose: it is listed with every VM (4 kB of meshjoin metadata a VM, all items together).
    # `${S::16}` derives the item's key from the pinned checksum, as agent_metadata_key() does. A VM whose
    # stub pins an agent that is no longer published fails this run with that line; the watcher its earlier
    # boots installed keeps converging, and the next reconcile writes the current stub (deploy/README.md).
    return (f"#!/bin/bash\n{names.STARTUP_SCRIPT_MARKER}\n"
            f"S={agent_sha256()}\n"
            "F=$(mktemp)||exit\n"
            'trap \'rm -f "$F"\' EXIT\n'
            'curl -sSo"$F" -fHMetadata-Flavor:Google "http://${GCE_METADATA_HOST:-metadata.google.internal}'
            f'/computeMetadata/v1/project/attributes/{AGENT_KEY_PREFIX}${{S::{AGENT_KEY_HEX}}}"\n'
            'sha256sum "$F"|grep -q "^$S "||{ echo "meshjoin: no agent of SHA-256 $S in project metadata: '
            'not run">&2;exit 1;}\n'
            'bash "$F" "$@"\n')


def startup_script() -> str:
    """What meshjoin writes as a VM's `startup-script`: the stub (the agent itself is in project metadata)."""
    return startup_stub()


def deployment_items(settings: Settings) -> dict[str, str]:
    """The agent's inputs that every VM of a deployment shares. Not written per VM: Terraform publishes them to
    each VM project's metadata (deploy/terraform/agent.tf renders the same values from the variables the
    functions' settings come from; tests/deploy/test_agent_settings_tf.py compares them), and the agent reads
    an instance item of the same key first, else the project's. Empty values are left out, as Terraform does."""
    items = {
        names.MESH_ENV_KEY: mesh_env(settings),
        names.MESH_CONFIG_KEY: mesh_config(settings),
        names.HOSTS_KEY: hosts_lines(settings),
        names.KEY_ALGORITHM_KEY: settings.key_algorithm,
        names.SIDECAR_URL_KEY: settings.sidecar_url,
        names.SIDECAR_SHA256_KEY: settings.sidecar_sha256 if settings.sidecar_url else "",
    }
    if settings.events_topic:  # the agent's nudge after it confirmed (the sweep catches up without it)
        items[names.EVENTS_TOPIC_KEY] = settings.events_topic
        items[names.PUBSUB_ENDPOINT_KEY] = settings.pubsub_endpoint or PUBSUB_ENDPOINT
    return {key: value for key, value in items.items() if value}


def bootstrap_items(key: VmKey, identity: Identity, settings: Settings, *, root_pem: str) -> dict[str, str]:
    """The metadata items of one VM the agent reads, but the status, what belongs to one certificate
    (`meshjoin-cert-chain`, `meshjoin-rekey`: the reconcile adds those) and what every VM shares
    (deployment_items(): in project metadata). The root certificate stays per VM: the functions drive a CA
    rotation, and they never write project metadata."""
    items = {
        names.CLUSTER_ENV_KEY: vm_env(key, identity, settings),
        names.ROOT_CERT_KEY: root_pem,
        names.STARTUP_SCRIPT_KEY: startup_script(),
    }
    # The agent confirms through guest attributes, which GCE enables per VM by this item
    # (the reconcile keeps an owner's own value of it).
    items[names.GUEST_ATTRIBUTES_KEY] = "TRUE"
    return items
