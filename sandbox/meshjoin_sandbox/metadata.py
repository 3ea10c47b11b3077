"""GCE metadata server emulator: lets `google.auth.default()` work unchanged in the sandbox.

Point google-auth at it with `GCE_METADATA_HOST=127.0.0.1:PORT` and `GCE_METADATA_IP=127.0.0.1:PORT`.
Unbound, it is the functions' view (project, zone, the meshjoin service account and its token).
Bound to one Compute instance, it is that VM's view: name, id, IP and live `instance/attributes/`
read from the Compute emulator, with `wait_for_change` long-polls as the startup script uses them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time

from werkzeug.wrappers import Response

from .web import ApiError, RoutedApp, route
from .world import CLOUD_PLATFORM

HEADERS = {"Metadata-Flavor": "Google", "Server": "Metadata Server for VM"}
TOKEN_LIFETIME = 3599
# How often a `wait_for_change` request re-reads the world, and the longest it ever waits.
POLL_INTERVAL = 0.05
MAX_WAIT = 300.0
_TOKEN_PATH = re.compile(r"instance/service-accounts/([^/]+)/(token|identity)")


class _Data(dict):
    """A directory whose keys are data (attribute names, account emails), kept as-is in JSON.

    Every other directory's kebab-case keys become camelCase in recursive JSON, as on GCE.
    """


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(part.capitalize() for part in rest)


def _to_json(node):
    if isinstance(node, _Data):
        return {key: _to_json(value) for key, value in node.items()}
    if isinstance(node, dict):
        return {_camel(key): _to_json(value) for key, value in node.items()}
    return node


def _flatten(node, prefix: str = "") -> list[str]:
    """`recursive=true&alt=text`: one `path value` line per leaf (per item of a list leaf)."""
    if isinstance(node, list):
        return [f"{prefix} {item}" for item in node]
    if not isinstance(node, dict):
        return [f"{prefix} {node}"]
    lines = []
    for key, value in node.items():
        lines += _flatten(value, f"{prefix}/{key}" if prefix else key)
    return lines


def _render_error(err: ApiError) -> Response:
    return Response(err.message + "\n", status=err.status, mimetype="text/html", headers=HEADERS)


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class MetadataEmulator:
    """One metadata server: the functions' view, or with `instance=(zone, name)` that VM's view."""

    def __init__(self, world, instance: tuple[str, str] | None = None, compute=None):
        self.world = world
        self.bound = instance
        # The Compute emulator of the bound VM's project (another sandbox project's VM sees its own
        # project); None: the host's, looked up when needed.
        self._compute = compute
        self.app = RoutedApp(self, render_error=_render_error, before=self._before, strict_slashes=False)

    @property
    def compute(self):
        return self._compute if self._compute is not None else self.world.emulators.get("compute")

    def _before(self, request, endpoint: str) -> None:
        """The real server refuses requests without the flavor header, or proxied ones."""
        if request.headers.get("Metadata-Flavor") != "Google" or "X-Forwarded-For" in request.headers:
            raise ApiError(403, "Missing required header: Metadata-Flavor: Google")

    @route("*", "/", "root")
    def _root(self, request) -> Response:
        return Response("computeMetadata/\n", mimetype="application/text", headers=HEADERS)

    # ---- the metadata tree -------------------------------------------------------------------------

    def _tree(self) -> dict:
        """Everything this server knows right now, as nested directories of string leaves."""
        world = self.world
        zone = self.bound[0] if self.bound else world.zone
        compute = self.compute
        project = compute.project if self.bound and compute is not None else world.project
        number = compute.project_number if self.bound and compute is not None else world.project_number
        tree = {
            "project": {"project-id": project, "numeric-project-id": number,
                        "attributes": _project_attributes(compute)},
            "instance": {"zone": f"projects/{number}/zones/{zone}",
                         "service-accounts": _Data()},
            "universe": {"universe-domain": "googleapis.com"},
        }
        if self.bound is None:
            accounts = [{"email": world.service_account, "scopes": [CLOUD_PLATFORM]}]
        else:
            instance = compute.instance(*self.bound)
            if instance is None:  # the VM is gone: only project-level facts remain
                return tree
            accounts = instance.get("serviceAccounts", [])
            name = instance["name"]
            nic = instance["networkInterfaces"][0]
            tree["instance"].update({
                "id": instance["id"],
                "name": name,
                "hostname": f"{name}.{zone}.c.{project}.internal",
                "attributes": _Data((i["key"], i["value"]) for i in instance["metadata"].get("items", [])),
                "network-interfaces": {"0": {
                    "ip": nic["networkIP"],
                    "network": f"projects/{number}/networks/{nic['network'].rsplit('/', 1)[-1]}",
                }},
            })
        for account in accounts[:1]:
            info = {"aliases": ["default"], "email": account["email"], "scopes": list(account["scopes"])}
            tree["instance"]["service-accounts"].update({"default": info, account["email"]: info})
        return tree

    def _lookup(self, path: str):
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["instance", "guest-attributes"]:
            # Only asked for by name: guest attributes are not part of `instance/` listings, so a VM's
            # own writes never wake a `wait_for_change` on its instance metadata.
            node = {"instance": self._guest_tree()}
        else:
            node = self._tree()
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise ApiError(404, f"{path} was not found on this server.")
            node = node[part]
        return node

    # ---- answers -----------------------------------------------------------------------------------

    @route("*", "/computeMetadata/v1/", "get", defaults={"path": ""})
    @route("*", "/computeMetadata/v1/<path:path>", "get")
    def _get(self, request, path: str) -> Response:
        token_path = _TOKEN_PATH.fullmatch(path.rstrip("/"))
        if token_path:
            return self._credential(request, token_path.group(1), token_path.group(2))
        if path.startswith("instance/guest-attributes/") and request.method in ("PUT", "DELETE"):
            return self._write_guest_attribute(request, path)
        if request.method not in ("GET", "HEAD"):
            raise ApiError(405, f"method {request.method} not allowed")
        node = self._lookup(path)
        if request.args.get("wait_for_change") == "true":
            node = self._wait_for_change(request, path, node)
        recursive = request.args.get("recursive") == "true"
        alt = request.args.get("alt", "json" if recursive else "text")
        if alt not in ("json", "text"):
            raise ApiError(400, f"Invalid alt parameter: {alt}")
        if alt == "json":
            body = json.dumps(_to_json(node) if recursive or not isinstance(node, dict) else _listing(node))
            mimetype = "application/json"
        else:
            body = "\n".join(_flatten(node) if recursive else _listing(node)) if isinstance(node, dict) else _text(node)
            mimetype = "application/text"
        return Response(body, mimetype=mimetype, headers={**HEADERS, "ETag": _etag(node)})

    def _guest_tree(self) -> dict:
        if self.bound is None:
            return {}
        instance = self.compute.instance(*self.bound)
        return _guest_attributes(self.compute, self.bound, instance) if instance is not None else {}

    def _write_guest_attribute(self, request, path: str) -> Response:
        """PUT/DELETE instance/guest-attributes/NS/KEY: only a VM's own server, only when enabled."""
        parts = path.split("/")[2:]
        if self.bound is None or len(parts) != 2 or not all(parts):
            raise ApiError(404, f"{path} was not found on this server.")
        compute = self.compute
        instance = compute.instance(*self.bound)
        if instance is None:
            raise ApiError(404, f"{path} was not found on this server.")
        if not compute.guest_attributes_enabled(*self.bound):
            raise ApiError(403, "Guest attributes endpoint access is disabled.")
        namespace, key = parts
        if request.method == "DELETE":
            compute.guest_attributes.delete(instance["id"], namespace, key)
        else:
            value = request.get_data(as_text=True)
            compute.guest_attributes.put(instance["id"], namespace, key, value)
        return Response("", mimetype="application/text", headers=HEADERS)

    def _token_scopes(self, request, info: dict) -> list[str]:
        """Unbound (Cloud Functions / Cloud Run): the scopes asked for, cloud-platform by default.
        Bound to a VM: the VM's access scopes, fixed at insert as on GCE, whatever is asked."""
        if self.bound is None:
            return _requested_scopes(request) or [CLOUD_PLATFORM]
        return list(info["scopes"])

    def _wait_for_change(self, request, path: str, node):
        """Block until the value's ETag differs from `last_etag` (or the current one), or time runs out."""
        last = request.args.get("last_etag") or _etag(node)
        try:
            timeout = float(request.args.get("timeout_sec", MAX_WAIT))
        except ValueError as exc:
            raise ApiError(400, "timeout_sec must be a number") from exc
        deadline = time.monotonic() + min(timeout, MAX_WAIT)
        while _etag(node) == last and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
            node = self._lookup(path)
        return node

    def _credential(self, request, account: str, kind: str) -> Response:
        """The account's access token (google-auth may GET or POST for it), or an ID token."""
        info = self._lookup(f"instance/service-accounts/{account}")
        if kind == "token":
            token = self.world.issue_token(info["email"], self._token_scopes(request, info))
            body = {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}
            return Response(json.dumps(body), mimetype="application/json", headers=HEADERS)
        audience = request.args.get("audience")
        if not audience:
            raise ApiError(400, "non-empty audience parameter required")
        # Shaped as a JWT so google-auth can read its expiry, but not signed: nothing here verifies it.
        now = int(time.time())
        subject = str(int.from_bytes(hashlib.sha256(info["email"].encode()).digest()[:8], "big"))
        claims = {"iss": "https://accounts.google.com", "aud": audience, "azp": subject, "sub": subject,
                  "email": info["email"], "email_verified": True, "iat": now, "exp": now + 3600}
        token = f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.{secrets.token_urlsafe(32)}"
        return Response(token, mimetype="application/text", headers=HEADERS)


def _requested_scopes(request) -> list[str]:
    """`?scopes=a,b` as google-auth sends it (compute_engine._metadata.get_service_account_token);
    repeated parameters are accepted too."""
    return [scope.strip() for value in request.args.getlist("scopes") for scope in value.split(",") if scope.strip()]


def _text(leaf) -> str:
    """A leaf as alt=text shows it: lists (scopes, aliases) one item per line."""
    return "\n".join(leaf) if isinstance(leaf, list) else leaf


def _listing(directory: dict) -> list[str]:
    return sorted(f"{key}/" if isinstance(value, dict) else key for key, value in directory.items())


def _etag(node) -> str:
    return hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()[:16]


def _project_attributes(compute) -> "_Data":
    """project/attributes/: the project's common instance metadata (compute.py keeps it)."""
    if compute is None or not hasattr(compute, "project_metadata"):
        return _Data()
    return _Data((i["key"], i["value"]) for i in compute.project_metadata().get("items", []))


def _guest_attributes(compute, bound: tuple[str, str], instance: dict) -> dict:
    """instance/guest-attributes/ as the VM itself reads it back (absent while the feature is off)."""
    if not hasattr(compute, "guest_attributes") or not compute.guest_attributes_enabled(*bound):
        return {}
    namespaces = compute.guest_attributes.namespaces(instance["id"])
    return {"guest-attributes": _Data((ns, _Data(keys)) for ns, keys in namespaces.items())}
