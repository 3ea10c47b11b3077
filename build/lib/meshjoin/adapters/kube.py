"""The GKE cluster: find it with ClusterManager, then talk to its Kubernetes API with the
`kubernetes` client, authenticated by the functions' own Google token (as on GKE).

Objects travel as plain dicts (raw JSON through `ApiClient`), so the core never sees SDK models.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from typing import Iterator, Protocol

from .. import names
from ..errors import ApiPermissionError, ConflictError, KubeApiError, PermanentError, QuotaExceeded, TransientError
from ..settings import Settings
from .retry import call

ISTIO = "/apis/networking.istio.io/v1"
# Kinds meshjoin writes: (path under the namespace, cluster-wide list path).
PATHS = {
    "WorkloadEntry": (ISTIO, "workloadentries"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Pod": ("/api/v1", "pods"),  # only listed: a Service selecting pods is never pruned
}
RBAC_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class Kube(Protocol):
    """What the core asks of the cluster's Kubernetes API: `KubeAdapter` here, `kube_fake.FakeKube` in tests.

    Objects are plain dicts as the API serves them. tests/unit/test_ports.py holds both to these signatures.
    """

    def get(self, kind: str, namespace: str, name: str) -> dict | None: ...

    def list(self, kind: str, label_selector: str, namespace: str | None = None,
             page_size: int = 500) -> Iterator[dict]: ...

    def create_if_missing(self, obj: dict) -> dict: ...

    def apply_owned(self, obj: dict, existing: dict | None) -> dict: ...

    def delete_owned(self, kind: str, namespace: str, name: str, expected: dict | None = None) -> bool: ...


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def api_server(cluster, mode: str) -> tuple[str, bytes | None]:
    """(host, CA to trust or None for the system's) of the cluster's Kubernetes API. Pure.

    "ip": the endpoint clusters.get names, verified with the cluster's own CA. "dns": GKE's DNS-based
    control-plane endpoint (gke-....gke.goog), which reaches private clusters through Google's front
    end without a VPC path; it presents a publicly trusted certificate, so the cluster CA must not be
    pinned there (TLS verification would fail).
    """
    if mode == "dns":
        endpoint = cluster.control_plane_endpoints_config.dns_endpoint_config.endpoint
        if not endpoint:
            raise PermanentError(f"MESHJOIN_CLUSTER_ENDPOINT=dns but cluster {cluster.name} has no DNS-based endpoint "
                                 "(gcloud container clusters update ... --enable-dns-access)")
        return endpoint, None
    return cluster.endpoint, base64.b64decode(cluster.master_auth.cluster_ca_certificate)


class KubeAdapter:
    def __init__(self, settings: Settings, credentials):
        self._settings = settings
        self._credentials = credentials
        self._api = None
        self._lock = threading.Lock()

    # --- connection ------------------------------------------------------------------------------

    def _client(self):
        """Build the Kubernetes client once: clusters.get for endpoint + CA, Google token as bearer."""
        with self._lock:
            if self._api is None:
                self._api = self._connect()
            return self._api

    def _connect(self):
        from google.cloud import container_v1
        from kubernetes import client as k8s

        s = self._settings
        options = {"api_endpoint": s.container_endpoint} if s.container_endpoint else None
        manager = container_v1.ClusterManagerClient(transport="rest", credentials=self._credentials,
                                                    client_options=options)
        cluster = call(lambda: manager.get_cluster(name=s.cluster, timeout=s.api_timeout.total_seconds()),
                       what=f"clusters.get {s.cluster}", permission="container.clusters.get", attempts=s.api_attempts)
        host, ca_pem = api_server(cluster, s.cluster_endpoint)
        config = k8s.Configuration()
        config.host = f"https://{host}"
        if ca_pem is not None:
            ca_file = tempfile.NamedTemporaryFile("wb", prefix="meshjoin-cluster-ca-", suffix=".pem", delete=False)
            with ca_file:
                ca_file.write(ca_pem)
            config.ssl_ca_cert = ca_file.name
        config.api_key_prefix = {"authorization": "Bearer"}
        config.api_key = {"authorization": ""}
        config.refresh_api_key_hook = self._refresh_token
        return k8s.ApiClient(config)

    def _refresh_token(self, config) -> None:
        if not self._credentials.valid:
            import google.auth.transport.requests

            self._credentials.refresh(google.auth.transport.requests.Request())
        config.api_key["authorization"] = self._credentials.token

    def _request(self, method: str, path: str, *, query: dict | None = None, body: dict | list | None = None,
                 content_type: str = "application/json") -> tuple[int, dict, str | None]:
        api = self._client()
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = api.param_serialize(method=method, resource_path=path, query_params=list((query or {}).items()),
                                         header_params=headers, body=body, auth_settings=["BearerToken"])
        response = api.call_api(*serialized, _request_timeout=self._settings.api_timeout.total_seconds())
        raw = response.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw[:200].decode(errors="replace")}
        getheader = getattr(response, "getheader", None)
        return response.status, data, getheader("Retry-After") if getheader else None

    def _do(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), **kwargs) -> tuple[int, dict]:
        """One API call with retry of transient failures; non-`ok` statuses become errors."""

        def attempt():
            try:
                status, data, retry_after = self._request(method, path, **kwargs)
            except Exception as exc:  # urllib3 connection/timeout errors surface as various types
                raise TransientError(f"kubernetes {method} {path}: {type(exc).__name__}: {exc}") from exc
            if status == 429:  # API Priority and Fairness: back off as long as the server asks
                raise QuotaExceeded(f"kubernetes {method} {path}: 429 {data.get('message', '')}",
                                    _seconds(retry_after))
            if status >= 500:
                raise TransientError(f"kubernetes {method} {path}: {status} {data.get('message', '')}")
            return status, data

        status, data = call(attempt, what=f"kubernetes {method} {path}",
                            permission="", attempts=self._settings.api_attempts)
        if status in ok:
            return status, data
        message = str(data.get("message", ""))[:500]
        if status in (401, 403):
            raise ApiPermissionError(
                f"kubernetes {method} {path}: {status}; grant RBAC verb {RBAC_VERBS.get(method, method)} "
                f"on this resource to meshjoin's service account ({message})")
        raise KubeApiError(status, f"kubernetes {method} {path}: {message}")

    # --- reads -----------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        base, plural = PATHS[kind]
        status, data = self._do("GET", f"{base}/namespaces/{namespace}/{plural}/{name}", ok=(200, 404))
        return None if status == 404 else data

    def list(self, kind: str, label_selector: str, namespace: str | None = None,
             page_size: int = 500) -> Iterator[dict]:
        """All objects matching the selector, following `continue` tokens (cluster-wide by default)."""
        base, plural = PATHS[kind]
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        token = None
        while True:
            query = {"labelSelector": label_selector, "limit": str(page_size)}
            if token:
                query["continue"] = token
            _, data = self._do("GET", path, query=query)
            yield from data.get("items", [])
            token = (data.get("metadata") or {}).get("continue")
            if not token:
                return

    # --- writes ----------------------------------------------------------------------------------

    def create_if_missing(self, obj: dict) -> dict:
        """Create `obj` unless an object of that name exists; return what is there now."""
        kind, meta = obj["kind"], obj["metadata"]
        existing = self.get(kind, meta["namespace"], meta["name"])
        if existing is not None:
            return existing
        base, plural = PATHS[kind]
        try:
            _, data = self._do("POST", f"{base}/namespaces/{meta['namespace']}/{plural}", body=obj, ok=(201, 200))
        except KubeApiError as exc:
            if exc.status == 409:  # a concurrent reconcile made it first: fine
                return self.get(kind, meta["namespace"], meta["name"]) or obj
            raise self._permanent(exc) from None
        return data

    def apply_owned(self, obj: dict, existing: dict | None) -> dict:
        """Create or replace an object meshjoin owns; refuse to touch one it does not.

        `existing` None means none is expected: create without reading first (one call on a first
        join); if one exists after all (409), read it and replace it like any other.
        """
        kind, meta = obj["kind"], obj["metadata"]
        base, plural = PATHS[kind]
        collection = f"{base}/namespaces/{meta['namespace']}/{plural}"
        try:
            if existing is None:
                try:
                    _, data = self._do("POST", collection, body=obj, ok=(201, 200))
                    return data
                except KubeApiError as exc:
                    if exc.status != 409:
                        raise
                existing = self.get(kind, meta["namespace"], meta["name"])
                if existing is None:
                    raise KubeApiError(409, "deleted while being replaced")
            if not names.owned(existing.get("metadata")):
                raise ConflictError(f"{kind} {meta['namespace']}/{meta['name']} exists and is not managed by "
                                    "meshjoin; remove it or rename the VM")
            body = {**obj, "metadata": {**meta, "resourceVersion": existing["metadata"]["resourceVersion"]}}
            _, data = self._do("PUT", f"{collection}/{meta['name']}", body=body)
            return data
        except KubeApiError as exc:
            if exc.status == 409:
                raise TransientError(f"{kind} {meta['namespace']}/{meta['name']} changed concurrently") from None
            raise self._permanent(exc) from None

    def delete_owned(self, kind: str, namespace: str, name: str, expected: dict | None = None) -> bool:
        """Delete an object meshjoin owns (404 is success); the uid precondition guards races."""
        base, plural = PATHS[kind]
        obj = expected if expected is not None else self.get(kind, namespace, name)
        if obj is None:
            return False
        if not names.owned(obj.get("metadata")):
            return False
        body = {"kind": "DeleteOptions", "apiVersion": "v1",
                "preconditions": {"uid": obj["metadata"]["uid"]}}
        status, _ = self._do("DELETE", f"{base}/namespaces/{namespace}/{plural}/{name}", body=body,
                             ok=(200, 202, 404, 409))
        return status in (200, 202)

    @staticmethod
    def _permanent(exc: KubeApiError) -> PermanentError:
        if exc.status == 404:
            return PermanentError(f"{exc} (does the namespace exist?)")
        return PermanentError(str(exc))
