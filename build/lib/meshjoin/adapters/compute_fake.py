"""An in-memory Compute Engine for unit tests: the `Compute` port with the semantics meshjoin relies on.

What it keeps of the real service (and of `ComputeAdapter`):
- `setMetadata` carries the fingerprint read with the VM: a write against an older one is refused (412,
  `StaleFingerprint`), and each write gives the VM a new fingerprint; the VM's other items are kept.
- The sweep's listing is server-side filtered by label, paged (`page_size` a page, counted in `pages`),
  and answers the slim view (`metadata_keys`, `metadata_complete=False`) a real listing answers; such a
  view cannot be written back. Zones named in `unreachable_zones` are missing from every listing and
  reported in `unreachable`, as `returnPartialSuccess` does.
- Guest attributes are the VM's own (what its agent wrote), read whole; none is an empty dict.

`hand_in_key` and `confirm` act as the VM's agent: it makes its key on the VM and writes a CSR for it, then
installs a delivered chain only if the leaf certifies its own key and reports the leaf's serial.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterator, Mapping

from .. import names, pki
from ..errors import StaleFingerprint
from ..model import Vm, VmKey
from .compute import SWEEP_METADATA_KEYS

# The filter forms meshjoin sends (sweep.LABEL_FILTER, ComputeAdapter.find): `labels.K=V`, `name = "V"`,
# joined by AND. Anything else is refused, so a new form cannot silently match everything in tests.
_TERM = re.compile(r'\s*(labels\.[a-z0-9_-]+|name)\s*=\s*("[^"]*"|[^\s"]+)\s*')


def matches_filter(vm: Vm, label_filter: str) -> bool:
    """Whether a VM matches a Compute list filter of the forms meshjoin uses (see `_TERM`)."""
    for term in re.split(r"\s+AND\s+", label_filter.strip()):
        match = _TERM.fullmatch(term)
        if match is None:
            raise ValueError(f"FakeCompute does not understand the filter term {term!r}")
        field, value = match.group(1), match.group(2).strip('"')
        actual = vm.key.instance if field == "name" else vm.labels.get(field[len("labels."):])
        if actual != value:
            return False
    return True


class FakeCompute:
    """VMs by key; `project` is the host project's common instance metadata (as `project_metadata`)."""

    def __init__(self, vms: dict[VmKey, Vm], guest: dict[VmKey, dict] | None = None,
                 project: dict[str, str] | None = None, *, vm_projects: tuple[str, ...] | None = None,
                 unreachable_zones: frozenset[str] = frozenset()):
        self.vms = dict(vms)
        self.writes = 0
        self.guest = dict(guest or {})  # guest attributes meshjoin/* per VM (what its agent wrote)
        self.project = dict(project or {})  # the project's common instance metadata
        self.vm_projects = vm_projects  # what `find` searches without a project (None: every project)
        self.unreachable_zones = frozenset(unreachable_zones)
        self.guest_reads = 0
        self.pages = 0  # listing pages served
        self.vm_keys: dict[VmKey, object] = {}  # the keys the VMs' agents made (on the VM: never meshjoin's)
        self.received: list[tuple[str, str]] = []  # every metadata item meshjoin wrote, for the leak scans

    # --- the Compute port ---------------------------------------------------------------------------------

    def get_vm(self, key: VmKey) -> Vm | None:
        return self.vms.get(key)

    def list_vms(self, label_filter: str, *, project: str | None = None, unreachable: set[str] | None = None,
                 page_size: int = 500, metadata_keys: frozenset[str] | None = SWEEP_METADATA_KEYS) -> Iterator[Vm]:
        if page_size < 1:
            raise ValueError("maxResults must be positive")
        listed = sorted((vm for vm in self.vms.values() if project in (None, vm.key.project)
                         and matches_filter(vm, label_filter)), key=lambda vm: (vm.key.zone, vm.key.instance))
        hidden = {vm.key.zone for vm in listed if vm.key.zone in self.unreachable_zones}
        if unreachable is not None:
            unreachable.update(hidden)
        listed = [vm for vm in listed if vm.key.zone not in hidden]
        for start in range(0, max(len(listed), 1), page_size):
            self.pages += 1
            for vm in listed[start:start + page_size]:
                yield vm if metadata_keys is None else replace(
                    vm, metadata={k: v for k, v in vm.metadata.items() if k in metadata_keys}, metadata_complete=False)

    def guest_attributes(self, key: VmKey) -> dict[str, str]:
        self.guest_reads += 1
        return dict(self.guest.get(key, {}))

    def project_metadata(self, project: str | None = None) -> dict[str, str]:
        return dict(self.project)

    def find(self, name: str, project: str | None = None) -> list[Vm]:
        projects = (project,) if project else self.vm_projects
        return [vm for vm in self.list_vms(f'name = "{name}"', metadata_keys=None)
                if projects is None or vm.key.project in projects]

    def set_metadata(self, vm: Vm, items: Mapping[str, str], remove: frozenset[str] = frozenset()) -> None:
        if not vm.metadata_complete:
            raise ValueError(f"{vm.key}: a listing's partial view of the metadata cannot be written back")
        current = self.vms[vm.key]
        if current.metadata_fingerprint != vm.metadata_fingerprint:
            raise StaleFingerprint(str(vm.key))
        metadata = {k: v for k, v in current.metadata.items() if k not in remove}
        metadata.update(items)
        self.writes += 1
        self.received.extend(items.items())
        self.vms[vm.key] = Vm(vm.key, current.instance_id, current.labels, metadata, f"fp-{self.writes}",
                              current.network_ip, current.service_account, current.status)

    # --- what the VM's owner and agent do -----------------------------------------------------------------

    def owner_writes(self, key: VmKey, items: Mapping[str, str]) -> None:
        """The VM's owner (or another writer) changes its metadata: the fingerprint moves on."""
        current = self.vms[key]
        self.writes += 1
        self.vms[key] = replace(current, metadata={**current.metadata, **items},
                                metadata_fingerprint=f"fp-{self.writes}")

    def hand_in_key(self, key: VmKey, vm_key=None):
        """What the VM's agent does first: make its key on the VM and write a CSR for it."""
        vm_key = vm_key or make_vm_key()
        self.vm_keys[key] = vm_key
        self.guest.setdefault(key, {})[names.CSR_ATTRIBUTE] = csr_for(vm_key)
        return vm_key

    def confirm(self, key: VmKey, *, sidecar: str = "running") -> None:
        """What the VM's agent does with `meshjoin-cert-chain`: install it only if its leaf certifies the
        agent's own key, then report the leaf's serial (openssl prints it in upper case)."""
        from cryptography import x509

        chain = self.vms[key].metadata[names.CERT_CHAIN_KEY]
        if pki.chain_key_id(chain) != pki.key_id(self.vm_keys[key].public_key()):
            raise AssertionError(f"{key}: the delivered chain does not certify the VM's own key")
        leaf = x509.load_pem_x509_certificate(chain.encode())
        self.guest.setdefault(key, {}).update({"agent-version": "3", "cert-serial": format(leaf.serial_number, "X"),
                                               "sidecar": sidecar, "updated": "2026-11-21T12:00:00Z"})


def make_vm_key():
    """A P-256 key as the agent makes it (`openssl genpkey -algorithm EC`): on the VM, never meshjoin's."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def csr_for(vm_key) -> str:
    """The agent's PKCS#10 request for its key, naming nothing (meshjoin ignores names in a CSR)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(vm_key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()
