"""Secret Manager: the plug-in CA (read, cached) and the per-VM secrets (write, IAM, delete).

A per-VM secret holds `{"key.pem", "cert-chain.pem", "root-cert.pem"}` as JSON; its IAM policy
grants secretAccessor to the VM's own service account and nobody else.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator

from .. import names, pki
from ..errors import BadMessage, CaMaterialError, TransientError
from ..events import validated_key
from ..model import VmKey
from ..settings import Settings
from . import ratelimit
from .ratelimit import ACCESS, READ, WRITE
from .retry import call

ACCESSOR_ROLE = "roles/secretmanager.secretAccessor"
LIST_PAGE_SIZE = 25000  # the API's maximum: a secret's listing entry is small, the fleet's secrets one call
MAX_POLICY_RACES = 3


def _version_number(name: str) -> int:
    number = name.rpartition("/versions/")[2]
    return int(number) if number.isdigit() else -1


@dataclass(frozen=True)
class PluginCa:
    bundle: pki.CaBundle
    versions: tuple[str, ...]  # the four secret versions it was read from
    fingerprint: str


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
                try:
                    bundle = pki.load_ca_bundle(*(data for _, data in parts), pki.bundle_roots(*root_pems).encode())
                except CaMaterialError as exc:
                    raise CaMaterialError(f"plug-in CA in Secret Manager ({', '.join(versions)}): {exc}") from None
                fingerprint = hashlib.sha256(
                    (pki.ca_fingerprint(bundle) + bundle.root_certs_pem).encode()).hexdigest()[:16]
                self._ca = PluginCa(bundle, versions, fingerprint)
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

    # --- per-VM secrets -------------------------------------------------------------------------

    def store_vm_material(self, key: VmKey, cert: pki.WorkloadCert, reader_service_account: str,
                          exists: bool = False) -> str:
        """Add a version holding the VM's key and chain; returns the version's resource name.

        `exists` (a renewal: the status names a version of this secret) skips the create call, one
        write of the Secret Manager quota saved per renewal; a secret deleted meanwhile (404 on
        addSecretVersion) is created after all.
        """
        # The REST transport maps ALREADY_EXISTS to its HTTP status: Conflict (409).
        from google.api_core.exceptions import Conflict, NotFound

        secret_id = self.vm_secret_id(key)
        parent = self._secret_path(secret_id)
        payload = json.dumps({"key.pem": cert.key_pem, "cert-chain.pem": cert.chain_pem,
                              "root-cert.pem": cert.root_pem}).encode()
        if exists:
            self._restrict_access(parent, reader_service_account, missing_ok=True)
            try:
                return self._add_version(secret_id, parent, payload, passthrough=(NotFound,))
            except NotFound:
                pass
        secret = self._sm.Secret(
            replication=self._sm.Replication(automatic=self._sm.Replication.Automatic()),
            labels={names.SECRET_OWNER_LABEL: names.MANAGED_BY, "meshjoin-project": names.project_part(key.project),
                    "meshjoin-zone": key.zone, "meshjoin-instance": key.instance},
        )
        try:
            self._call(lambda: self._client.create_secret(
                parent=f"projects/{self._settings.project}", secret_id=secret_id, secret=secret, retry=None,
                timeout=self._timeout),
                f"create secret {secret_id}", "secretmanager.secrets.create", passthrough=(Conflict,), kind=WRITE)
            created = True
        except Conflict:
            created = False
        self._restrict_access(parent, reader_service_account, created=created)
        return self._add_version(secret_id, parent, payload)

    def _add_version(self, secret_id: str, parent: str, payload: bytes, passthrough=()) -> str:
        version = self._call(lambda: self._client.add_secret_version(
            parent=parent, payload=self._sm.SecretPayload(data=payload), retry=None, timeout=self._timeout),
            f"add version to {secret_id}", "secretmanager.versions.add", passthrough=passthrough, kind=WRITE)
        return version.name

    def _restrict_access(self, secret: str, reader_service_account: str, created: bool = False,
                         missing_ok: bool = False) -> None:
        """Exactly one binding: the VM's own service account may access; set only if different.

        A secret this call just created has the empty policy: it is set without reading it first.
        A stale etag (ABORTED, 409 over REST: a concurrent writer, or our own earlier set whose answer
        was lost) means read again and decide again.
        """
        from google.api_core.exceptions import Conflict, NotFound
        from google.iam.v1 import iam_policy_pb2, policy_pb2

        wanted = [(ACCESSOR_ROLE, (f"serviceAccount:{reader_service_account}",))]
        for _ in range(MAX_POLICY_RACES):
            if created:
                policy = policy_pb2.Policy()
                created = False
            else:
                try:
                    policy = self._call(lambda: self._client.get_iam_policy(
                        request=iam_policy_pb2.GetIamPolicyRequest(resource=secret), retry=None,
                        timeout=self._timeout),
                        f"getIamPolicy {secret}", "secretmanager.secrets.getIamPolicy",
                        passthrough=(NotFound,) if missing_ok else (), kind=READ)
                except NotFound:
                    return  # the caller creates the secret (and sets its policy) next
            current = [(b.role, tuple(sorted(b.members))) for b in policy.bindings]
            if current == wanted:
                return
            new_policy = policy_pb2.Policy(
                bindings=[policy_pb2.Binding(role=role, members=list(members)) for role, members in wanted],
                etag=policy.etag)
            try:
                self._call(lambda: self._client.set_iam_policy(
                    request=iam_policy_pb2.SetIamPolicyRequest(resource=secret, policy=new_policy), retry=None,
                    timeout=self._timeout),
                    f"setIamPolicy {secret}", "secretmanager.secrets.setIamPolicy", passthrough=(Conflict,), kind=WRITE)
                return
            except Conflict:
                continue
        raise TransientError(f"setIamPolicy {secret}: the policy kept changing")

    def vm_secret_id(self, key: VmKey) -> str:
        return names.secret_id(key, self._settings.secret_prefix)

    def destroy_version(self, version_name: str) -> None:
        # Over REST, FAILED_PRECONDITION (already destroyed) arrives as BadRequest (400).
        from google.api_core.exceptions import BadRequest, NotFound

        try:
            self._call(lambda: self._client.destroy_secret_version(name=version_name, retry=None,
                                                                   timeout=self._timeout),
                       f"destroy {version_name}", "secretmanager.versions.destroy",
                       passthrough=(NotFound, BadRequest), kind=WRITE)
        except (NotFound, BadRequest):
            pass  # already gone or destroyed: the goal holds

    def destroy_undelivered_versions(self, key: VmKey, delivered: str, keep: Iterable[str | None] = (),
                                     minted_before: datetime | None = None) -> int:
        """Destroy the enabled versions of the VM's secret other than `delivered` and `keep`: those
        numbered below `delivered`, and newer ones created before `minted_before` (a newer version
        may be one a concurrent pass is about to deliver, so only once no pass can still be running)."""
        secret_id = self.vm_secret_id(key)
        delivered_number = _version_number(delivered)
        kept = {_version_number(name) for name in keep if name} | {delivered_number}
        request = self._sm.ListSecretVersionsRequest(parent=self._secret_path(secret_id), filter="state:ENABLED")
        pager = self._call(lambda: self._client.list_secret_versions(request=request, retry=None,
                                                                     timeout=self._timeout),
                           f"list versions of {secret_id}", "secretmanager.versions.list", kind=READ)
        stale = [v.name for v in pager if v.state == self._sm.SecretVersion.State.ENABLED
                 and _version_number(v.name) not in kept
                 and (_version_number(v.name) < delivered_number
                      or (minted_before is not None and v.create_time < minted_before))]
        for name in stale:
            self.destroy_version(name)
        return len(stale)

    def delete_vm_secret(self, key: VmKey) -> bool:
        """Delete the VM's secret; False when there was none (404 is success)."""
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
        """(VM key, secret name) of every per-VM secret meshjoin made, found by label (paged)."""
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

    def read_vm_material(self, version_name: str) -> dict[str, str]:
        """The delivered JSON (tests and `meshjoin explain`); callers must not log it."""
        response = self._call(lambda: self._client.access_secret_version(name=version_name, retry=None,
                                                                         timeout=self._timeout),
                              f"access {version_name}", "secretmanager.versions.access", kind=ACCESS)
        return json.loads(response.payload.data)
