"""Secret Manager: the plug-in CA (read, cached), and the pruning of legacy per-VM secrets.

Secret Manager holds only the plug-in CA: VMs make their own keys (issue 14), so a join, renewal or
key rotation makes no Secret Manager call beyond the cached CA read. Meshjoin 2 kept each VM's key in
a per-VM secret labelled `managed-by=meshjoin`; those are listed by label (the sweep) and deleted
once their VM has migrated, left or is gone. The calls, hence the permissions the functions need:
versions.access and versions.list on the four CA secrets, secrets.list on the project, secrets.delete
on the legacy `{prefix}-*` secrets. Nothing else.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from .. import names, pki
from ..errors import BadMessage, CaMaterialError
from ..events import validated_key
from ..model import VmKey
from ..settings import Settings
from . import ratelimit
from .ratelimit import ACCESS, READ, WRITE
from .retry import call

LIST_PAGE_SIZE = 25000  # the API's maximum: a secret's listing entry is small, the fleet's secrets one call


@dataclass(frozen=True)
class PluginCa:
    bundle: pki.CaBundle
    versions: tuple[str, ...]  # the four secret versions it was read from
    fingerprint: str


def load_plugin_ca(ca_cert: bytes, ca_key: bytes, cert_chain: bytes, root_pems: Sequence[str],
                   versions: tuple[str, ...]) -> PluginCa:
    """The plug-in CA from its four secrets' payloads (`root_pems`: every enabled root version). Pure.

    The fingerprint covers the signing CA and the roots, so either change re-issues every VM's certificate.
    """
    try:
        bundle = pki.load_ca_bundle(ca_cert, ca_key, cert_chain, pki.bundle_roots(*root_pems).encode())
    except CaMaterialError as exc:
        raise CaMaterialError(f"plug-in CA in Secret Manager ({', '.join(versions)}): {exc}") from None
    fingerprint = hashlib.sha256((pki.ca_fingerprint(bundle) + bundle.root_certs_pem).encode()).hexdigest()[:16]
    return PluginCa(bundle, versions, fingerprint)


class Secrets(Protocol):
    """What the core asks of Secret Manager: `SecretsAdapter` here, `secrets_fake.FakeSecrets` in tests.

    tests/unit/test_ports.py holds both to these signatures, parameter by parameter.
    """

    def plugin_ca(self) -> PluginCa: ...

    def list_vm_secrets(self) -> Iterator[tuple[VmKey, str]]: ...

    def delete_vm_secret(self, key: VmKey) -> bool: ...


class SecretsAdapter:
    def __init__(self, settings: Settings, credentials):
        from google.cloud import secretmanager_v1

        self._sm = secretmanager_v1
        self._settings = settings
        self._timeout = settings.api_timeout.total_seconds()
        options = {"api_endpoint": settings.secretmanager_endpoint} if settings.secretmanager_endpoint else None
        self._client = secretmanager_v1.SecretManagerServiceClient(
            transport="rest", credentials=credentials, client_options=options)
        self._ca: PluginCa | None = None
        self._ca_read_at = float("-inf")
        self._ca_lock = threading.Lock()
        self._limiters = ratelimit.shared_limiters(settings)

    def _call(self, fn, what: str, permission: str, passthrough=(), *, kind: str):
        """One call, paced by this process's share of the quota it counts against (`kind`)."""
        return call(fn, what=what, permission=permission, attempts=self._settings.api_attempts,
                    passthrough=passthrough, pace=lambda: self._limiters.acquire("secretmanager", kind))

    def _secret_path(self, secret_id: str) -> str:
        return f"projects/{self._settings.project}/secrets/{secret_id}"

    # --- the plug-in CA -------------------------------------------------------------------------

    def plugin_ca(self) -> PluginCa:
        """The CA, re-read at most every `ca_cache`; rebuilt only when a secret version changed.

        Trusted roots are every ENABLED version of the root secret: during a root rotation the
        operator adds the new root as a new version and VMs trust both; disabling the old version
        retires the old root. The fingerprint covers the signing CA and the roots, so either change
        re-issues every VM's certificate.
        """
        with self._ca_lock:
            if self._ca is not None and time.monotonic() - self._ca_read_at < self._settings.ca_cache.total_seconds():
                return self._ca
            s = self._settings
            parts = [self._access_latest(name) for name in (s.ca_cert_secret, s.ca_key_secret, s.ca_chain_secret)]
            roots = self._enabled_versions(s.ca_root_secret)
            versions = tuple(name for name, _ in parts) + tuple(roots)
            if self._ca is None or self._ca.versions != versions:
                root_pems = [self._access(name)[1].decode() for name in roots]
                ca_cert, ca_key, chain = (data for _, data in parts)
                self._ca = load_plugin_ca(ca_cert, ca_key, chain, root_pems, versions)
            self._ca_read_at = time.monotonic()
            return self._ca

    def _enabled_versions(self, secret_id: str) -> list[str]:
        """Names of the ENABLED versions of a secret, newest first."""
        request = self._sm.ListSecretVersionsRequest(parent=self._secret_path(secret_id), filter="state:ENABLED")
        pager = self._call(lambda: self._client.list_secret_versions(request=request, retry=None,
                                                                     timeout=self._timeout),
                           f"list versions of {secret_id}", "secretmanager.versions.list", kind=READ)
        names_ = [v.name for v in pager if v.state == self._sm.SecretVersion.State.ENABLED]
        if not names_:
            raise CaMaterialError(f"secret {secret_id} has no enabled version")
        return names_

    def _access_latest(self, secret_id: str) -> tuple[str, bytes]:
        return self._access(f"{self._secret_path(secret_id)}/versions/latest")

    def _access(self, name: str) -> tuple[str, bytes]:
        response = self._call(lambda: self._client.access_secret_version(name=name, retry=None, timeout=self._timeout),
                              f"access {name}", "secretmanager.versions.access", kind=ACCESS)
        return response.name, response.payload.data

    # --- legacy per-VM secrets (agent 2 and before): listed and deleted, never written -------

    def vm_secret_id(self, key: VmKey) -> str:
        return names.secret_id(key, self._settings.secret_prefix)

    def delete_vm_secret(self, key: VmKey) -> bool:
        """Delete the VM's legacy secret; False when there was none (404 is success)."""
        from google.api_core.exceptions import NotFound

        secret_id = self.vm_secret_id(key)
        try:
            self._call(lambda: self._client.delete_secret(name=self._secret_path(secret_id), retry=None,
                                                          timeout=self._timeout),
                       f"delete secret {secret_id}", "secretmanager.secrets.delete", passthrough=(NotFound,), kind=WRITE)
        except NotFound:
            return False
        return True

    def list_vm_secrets(self) -> Iterator[tuple[VmKey, str]]:
        """(VM key, secret name) of every legacy per-VM secret meshjoin made, found by label (paged)."""
        request = self._sm.ListSecretsRequest(
            parent=f"projects/{self._settings.project}", page_size=LIST_PAGE_SIZE,
            filter=f"labels.{names.SECRET_OWNER_LABEL}={names.MANAGED_BY}")
        pager = self._call(lambda: self._client.list_secrets(request=request, retry=None, timeout=self._timeout),
                           "list secrets",
                           "secretmanager.secrets.list", kind=READ)
        pages = iter(pager.pages)  # one request per page (the first came with list_secrets): paced per page
        while True:
            try:
                page = self._call(lambda: next(pages), "list secrets page", "secretmanager.secrets.list",
                                  passthrough=(StopIteration,), kind=READ)
            except StopIteration:
                return
            for secret in page.secrets:
                key = self.vm_key_of_secret(secret.name, dict(secret.labels))
                if key is not None:
                    yield key, secret.name

    def vm_key_of_secret(self, name: str, labels: dict[str, str]) -> VmKey | None:
        """The VM a listed secret belongs to, or None: labels name another project (or none), do not
        form a GCE name, or the secret's id is not the one meshjoin derives for that VM (anyone who may
        create secrets can set these labels; the sweep must never act on a key they made up)."""
        if labels.get("meshjoin-project") != names.project_part(self._settings.project):
            return None
        try:
            key = validated_key(self._settings.project, labels.get("meshjoin-zone") or "",
                                labels.get("meshjoin-instance") or "")
        except BadMessage:
            return None
        return key if name.rsplit("/", 1)[-1] == self.vm_secret_id(key) else None
