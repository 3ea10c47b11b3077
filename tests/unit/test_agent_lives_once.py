"""The VM agent is one static file (issue 16): published once per VM project under a versioned key, fetched and
checked by a short per-VM stub. Its metadata key names cannot drift from names.py. Pure: the file is package data."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from meshjoin import bootstrap, names

AGENT = bootstrap.agent_text()
# The item names the agent reads (KEY_...='...'), each a names.py constant, and all of the bootstrap's.
READ_BY_AGENT = {names.CERT_CHAIN_KEY, names.ROOT_CERT_KEY, names.KEY_ALGORITHM_KEY, names.REKEY_KEY,
                 names.CLUSTER_ENV_KEY, names.MESH_CONFIG_KEY, names.HOSTS_KEY, names.SIDECAR_URL_KEY,
                 names.SIDECAR_SHA256_KEY, names.EVENTS_TOPIC_KEY, names.PUBSUB_ENDPOINT_KEY, names.MESH_ENV_KEY}
# Words of the form meshjoin-... in the agent that are not metadata items: its unit, its path, its key prefix.
NOT_ITEMS = {"meshjoin-watch", "meshjoin-agent", "meshjoin-agent-"}


def shell_constant(name: str) -> str:
    (value,) = re.findall(rf"^{name}='([^']*)'$", AGENT, re.MULTILINE)
    return value


def test_the_agents_metadata_key_names_are_names_py():
    read = {m.group(2) for m in re.finditer(r"^(KEY_[A-Z0-9_]+)='([^']*)'$", AGENT, re.MULTILINE)}
    assert read == READ_BY_AGENT
    mentioned = set(re.findall(r"meshjoin-[a-z0-9-]*", AGENT)) - NOT_ITEMS
    assert mentioned <= set(names.MESHJOIN_KEYS) | {names.STARTUP_SCRIPT_MARKER.lstrip("# ")}, mentioned
    assert shell_constant("MARKER") == names.STARTUP_SCRIPT_MARKER
    assert shell_constant("AGENT_VERSION") == bootstrap.AGENT_VERSION
    assert f'GUEST="$METADATA/instance/guest-attributes/{names.GUEST_NAMESPACE}"' in AGENT
    assert f"guest_put {names.CSR_ATTRIBUTE} " in AGENT
    assert f'CERTS="$ROOT{bootstrap.CERT_DIR}"' in AGENT


def test_the_agent_is_package_data_and_identical_for_every_vm():
    data = (resources.files("meshjoin") / "agent" / "meshjoin-agent.sh").read_bytes()
    assert data.decode() == AGENT and AGENT.startswith("#!/bin/bash\n")
    assert "{{" not in AGENT and "{%" not in AGENT  # no template left: nothing of any VM reaches it
    assert bootstrap.agent_sha256() == hashlib.sha256(data).hexdigest()


def test_the_key_is_versioned_by_the_agents_sha256():
    key = bootstrap.agent_metadata_key()
    assert key == "meshjoin-agent-" + hashlib.sha256(AGENT.encode()).hexdigest()[:16]
    assert re.fullmatch(r"meshjoin-agent-[0-9a-f]{16}", key)
    assert key.startswith(names.AGENT_KEY_PREFIX) and key not in names.MESHJOIN_KEYS  # never an instance item


def test_the_stub_pins_the_full_sha256_and_reads_only_the_projects_item():
    stub = bootstrap.startup_stub()
    assert bootstrap.startup_script() == stub  # what meshjoin writes as startup-script
    assert stub.startswith("#!/bin/bash\n") and names.STARTUP_SCRIPT_MARKER in stub  # reconcile knows it as its own
    assert f"S={bootstrap.agent_sha256()}\n" in stub
    # The key is derived from the pinned checksum in bash (${S::16}): the same as agent_metadata_key().
    sha = bootstrap.agent_sha256()
    assert "/computeMetadata/v1/project/attributes/meshjoin-agent-${S::16}" in stub
    assert "meshjoin-agent-" + sha[:16] == bootstrap.agent_metadata_key()
    assert "instance/attributes" not in stub  # an instance item of that name (the owner's) is never what runs
    assert "Metadata-Flavor:Google" in stub and "${GCE_METADATA_HOST:-metadata.google.internal}" in stub
    # Verified before it runs; a mismatch or a missing item says so and fails the run.
    check = stub.index('sha256sum "$F"|grep -q "^$S "')
    assert check < stub.index('bash "$F"') and "exit 1" in stub[check:stub.index('bash "$F"')]
    assert stub.count("\n") <= 10 and len(stub.encode()) <= 512


def test_bootstrap_items_carry_the_stub_not_the_agent():
    from .test_hostile_input import KEY, SETTINGS
    from meshjoin.model import Identity

    items = bootstrap.bootstrap_items(KEY, Identity("default", "default", "vm-1", "latest"), SETTINGS, root_pem="R")
    assert items[names.STARTUP_SCRIPT_KEY] == bootstrap.startup_stub()
    assert not any("openssl genpkey" in value for value in items.values())
