"""Deterministic names and ownership marks: any step can be repeated, pruning touches only ours."""

from __future__ import annotations

import hashlib
import re

from .model import VmKey

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "meshjoin"
ANNOTATION_PREFIX = "meshjoin.dev/"
SECRET_OWNER_LABEL = "managed-by"  # on legacy per-VM secrets (label keys allow no dots or slashes)
VM_LABEL = "meshjoin.dev/instance"  # on WorkloadEntries: lets a selector find one VM's entry

# Instance metadata items meshjoin writes; the VM agent reads the bootstrap ones.
STATUS_KEY = "meshjoin-status"
CERT_CHAIN_KEY = "meshjoin-cert-chain"  # the leaf meshjoin signed for the VM's own key, then the CA chain (PEM)
KEY_ALGORITHM_KEY = "meshjoin-key-algorithm"  # what the agent generates: ecdsa-p256 | rsa-2048
REKEY_KEY = "meshjoin-rekey"  # an opaque token: a new value asks the agent for a new key
# Legacy only (agent 2 and before): the per-VM secret version holding a key meshjoin made. A VM that
# still has it is migrating; meshjoin removes it, and deletes the secret, once agent 3 confirmed.
SECRET_KEY = "meshjoin-secret"
CLUSTER_ENV_KEY = "meshjoin-cluster-env"  # this VM's lines of cluster.env
MESH_ENV_KEY = "meshjoin-mesh-env"  # the lines of cluster.env every VM of the deployment shares
MESH_CONFIG_KEY = "meshjoin-mesh-config"
ROOT_CERT_KEY = "meshjoin-root-cert"
HOSTS_KEY = "meshjoin-hosts"
SIDECAR_URL_KEY = "meshjoin-sidecar-url"
SIDECAR_SHA256_KEY = "meshjoin-sidecar-sha256"
EVENTS_TOPIC_KEY = "meshjoin-events-topic"  # where the agent nudges meshjoin after confirming
PUBSUB_ENDPOINT_KEY = "meshjoin-pubsub-endpoint"
GUEST_ATTRIBUTES_KEY = "enable-guest-attributes"  # GCE's switch; the agent reports through them
STARTUP_SCRIPT_KEY = "startup-script"
STARTUP_SCRIPT_MARKER = "# meshjoin-startup-script"
# Project metadata (of every VM project, written by Terraform, never by the functions): the agent's text
# under `meshjoin-agent-<first 16 hex of its SHA-256>`, fetched and checked by each VM's startup-script stub.
AGENT_KEY_PREFIX = "meshjoin-agent-"
# What every VM of a deployment shares: in project metadata (Terraform), read by the agent when its instance
# has no item of the same key. meshjoin no longer writes them per VM, and removes the copies it wrote before.
DEPLOYMENT_KEYS = (MESH_ENV_KEY, MESH_CONFIG_KEY, HOSTS_KEY, KEY_ALGORITHM_KEY, SIDECAR_URL_KEY, SIDECAR_SHA256_KEY, EVENTS_TOPIC_KEY,
                   PUBSUB_ENDPOINT_KEY)
MESHJOIN_KEYS = (STATUS_KEY, CERT_CHAIN_KEY, KEY_ALGORITHM_KEY, REKEY_KEY, SECRET_KEY, CLUSTER_ENV_KEY,
                 MESH_CONFIG_KEY, ROOT_CERT_KEY, HOSTS_KEY, SIDECAR_URL_KEY, SIDECAR_SHA256_KEY, EVENTS_TOPIC_KEY,
                 PUBSUB_ENDPOINT_KEY, MESH_ENV_KEY)
# The guest attributes (namespace GUEST_NAMESPACE) the agent writes and meshjoin reads.
GUEST_NAMESPACE = "meshjoin"
CSR_ATTRIBUTE = "csr"  # PEM PKCS#10 CSR of the key the agent wants certified


_PLAIN_PROJECT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")


def project_part(project: str) -> str:
    """The project as a name part. A domain-scoped id (`example.com:proj`) has characters neither
    Kubernetes names nor secret ids allow, so it is hashed (`p` + 12 hex digits). Names only keep
    objects of different projects apart; the ownership annotations and labels carry the full project
    id and are what meshjoin checks before it trusts or touches an object."""
    if _PLAIN_PROJECT.fullmatch(project):
        return project
    return "p" + hashlib.sha256(project.encode()).hexdigest()[:12]


def entry_name(key: VmKey) -> str:
    """WorkloadEntry name, one per (project, zone, instance); a recreated VM gets the same name.
    At most 63 + 1 + 30 + 1 + ~25 characters: well inside a DNS subdomain's 253."""
    return f"{key.instance}-{key.zone}-{project_part(key.project)}"


def secret_id(key: VmKey, prefix: str) -> str:
    """Legacy per-VM secret id ([a-zA-Z0-9_-]{1,255}): prefix-project-zone-instance (at most ~220 characters)."""
    return f"{prefix}-{project_part(key.project)}-{key.zone}-{key.instance}"


def owned(metadata: dict | None) -> bool:
    labels = (metadata or {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY
