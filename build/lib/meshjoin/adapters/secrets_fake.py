"""An in-memory Secret Manager for unit tests: the `Secrets` port as meshjoin uses the service.

It holds the plug-in CA (read, as `SecretsAdapter.plugin_ca` answers it) and meshjoin 2's per-VM secrets
(listed, deleted; 404 is "there was none"). `rotate_ca` stands for the operator's CA rotation: new versions
of the four CA secrets, the fingerprint computed as the real adapter computes it (`load_plugin_ca`), so a
new signing CA or a change in the enabled roots re-issues every VM's certificate.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .. import names
from ..errors import CaMaterialError
from ..model import VmKey
from .secrets import PluginCa, load_plugin_ca

LEGACY_PREFIX = "meshjoin-vm"  # Settings.secret_prefix's default


class FakeSecrets:
    """Secret Manager as meshjoin now uses it: the CA (read) and meshjoin 2's per-VM secrets (list, delete)."""

    def __init__(self, ca: PluginCa | None, legacy=()):
        self.ca = ca  # None: the CA secrets have no version yet (see rotate_ca)
        self.legacy: set[VmKey] = set(legacy)  # VMs that still have a per-VM secret from meshjoin 2
        self.calls: list[str] = []  # every call but the CA read
        self.ca_reads = 0

    # --- the Secrets port ---------------------------------------------------------------------------------

    def plugin_ca(self) -> PluginCa:
        self.ca_reads += 1
        if self.ca is None:
            raise CaMaterialError("the plug-in CA's secrets have no enabled version")
        return self.ca

    def list_vm_secrets(self) -> Iterator[tuple[VmKey, str]]:
        self.calls.append("secrets.list")
        return iter([(key, f"projects/1/secrets/{names.secret_id(key, LEGACY_PREFIX)}") for key in sorted(self.legacy)])

    def delete_vm_secret(self, key: VmKey) -> bool:
        self.calls.append(f"secrets.delete {key}")
        present = key in self.legacy
        self.legacy.discard(key)
        return present

    # --- what the operator does ---------------------------------------------------------------------------

    def rotate_ca(self, ca_cert: bytes, ca_key: bytes, cert_chain: bytes, root_pems: Sequence[str],
                  version: str) -> PluginCa:
        """New versions of the CA secrets (`root_pems`: the root secret's enabled versions, newest first)."""
        versions = (version,) * 3 + tuple(f"{version}-root{i}" for i in range(len(root_pems)))
        self.ca = load_plugin_ca(ca_cert, ca_key, cert_chain, root_pems, versions)
        return self.ca
