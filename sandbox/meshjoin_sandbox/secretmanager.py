"""Secret Manager v1 emulator: the REST surface the unmodified `secretmanager_v1` client calls.

Global (non-regional) secrets only. Behaviour follows the real service where the product could
notice: resource names come back with the project NUMBER, `latest` is the most recently created
version whatever its state (so accessing it while disabled fails like in production), etags are
quoted strings checked with FAILED_PRECONDITION, and IAM policies carry base64 etags checked with
ABORTED. IAM bindings are stored and returned but not enforced: any sandbox token may do anything.
"""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Request

from .iam import check_scopes
from .quota import limiter, secret_manager_quotas
from .paging import google_offset_page, with_next_page_token
from .web import ApiError, FaultyEmulator, RoutedApp, json_response, read_json, route

SECRET_ID = re.compile(r"[a-zA-Z_0-9-]{1,255}")
# Label rules of the real service, restricted to ASCII (it also allows non-Latin lowercase letters).
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
MAX_LABELS = 64
MAX_PAYLOAD = 64 * 1024
MAX_PAGE = 25000
# Route templates (werkzeug syntax, `seg`: a segment without its `:verb`); each handler carries its routes.
SECRETS = "/v1/projects/<seg:project>/secrets"
SECRET = SECRETS + "/<seg:secret>"
VERSION = SECRET + "/versions/<seg:version>"
STATES = {"ENABLED": 1, "DISABLED": 2, "DESTROYED": 3}
# Secret fields a patch may touch (FieldMask paths, camelCase as the client sends them).
PATCHABLE = {"labels", "annotations", "versionAliases", "topics", "rotation", "expireTime"}
EMPTY_POLICY_ETAG = "ACAB"  # what the real service returns for a never-set policy
MEMBER = re.compile(
    r"(allUsers|allAuthenticatedUsers|(user|serviceAccount|group|domain|deleted:\w+):.+|principal(Set)?://.+)"
)


class _Segment(BaseConverter):
    """One path segment without the `:verb` suffix Google's custom methods append."""

    regex = "[^/:]+"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), the checksum Secret Manager uses for payloads; pure Python, no C ext."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _b64decode(text: str, what: str) -> bytes:
    """Protobuf JSON bytes: standard or URL-safe base64, padding optional."""
    text = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"Invalid value for {what}: not base64.", "INVALID_ARGUMENT") from exc


def _camel(path: str) -> str:
    head, *rest = path.split("_")
    return head + "".join(word.capitalize() for word in rest)


# --- list filters -------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(\()|(\))|(<=|>=|!=|=|:|<|>)|"((?:[^"\\]|\\.)*)"|([^\s()"=:<>!]+))')


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ApiError(400, f"Invalid filter: cannot parse {text[pos:]!r}.", "INVALID_ARGUMENT")
        pos = match.end()
        lparen, rparen, op, quoted, word = match.groups()
        if lparen or rparen:
            tokens.append(("paren", lparen or rparen))
        elif op:
            tokens.append(("op", op))
        elif quoted is not None:
            tokens.append(("value", quoted.replace('\\"', '"')))
        else:
            tokens.append(("word", word))
    return tokens


class _Filter:
    """The subset of the AIP-160 filter language Secret Manager documents for list calls.

    `a b` and `a AND b` are conjunctions, `OR` binds tighter than AND, `NOT x` / `-x` negate,
    parentheses group. Restrictions are `field OP value` over `name` and `create_time`, `state`
    (versions), `labels.KEY` and `labels:KEY`; `:` means "contains" for names and label values,
    "is set" with `*`, and equality for states.
    """

    def __init__(self, text: str, fields: set[str]):
        self.fields = fields
        self.tokens = _tokenize(text)
        self.pos = 0
        self.tree = self._expr() if self.tokens else None
        if self.pos != len(self.tokens):
            raise ApiError(400, f"Invalid filter: unexpected {self.tokens[self.pos][1]!r}.", "INVALID_ARGUMENT")

    def _peek(self, kind: str, value: str | None = None) -> bool:
        if self.pos >= len(self.tokens):
            return False
        tok_kind, tok_value = self.tokens[self.pos]
        return tok_kind == kind and (value is None or tok_value == value)

    def _take(self) -> str:
        if self.pos >= len(self.tokens):
            raise ApiError(400, "Invalid filter: unexpected end.", "INVALID_ARGUMENT")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def _expr(self):
        terms = [self._disjunction()]
        while self.pos < len(self.tokens) and not self._peek("paren", ")"):
            if self._peek("word", "AND"):
                self._take()
            terms.append(self._disjunction())
        return ("and", terms)

    def _disjunction(self):
        terms = [self._term()]
        while self._peek("word", "OR"):
            self._take()
            terms.append(self._term())
        return ("or", terms)

    def _term(self):
        if self._peek("word", "NOT"):
            self._take()
            return ("not", self._term())
        if self._peek("paren", "("):
            self._take()
            inner = self._expr()
            if self._take() != ")":
                raise ApiError(400, "Invalid filter: missing ')'.", "INVALID_ARGUMENT")
            return inner
        name = self._take()
        negate = name.startswith("-") and len(name) > 1
        name = name[1:] if negate else name
        field_name = name.split(".", 1)[0] if name.startswith("labels.") else name
        if field_name not in self.fields or not self._peek("op"):
            raise ApiError(400, f"Invalid filter: unsupported restriction on {name!r}.", "INVALID_ARGUMENT")
        op = self._take()
        if not (self._peek("word") or self._peek("value")):
            raise ApiError(400, f"Invalid filter: {name}{op} needs a value.", "INVALID_ARGUMENT")
        restriction = ("cmp", name, op, self._take())
        return ("not", restriction) if negate else restriction

    def __call__(self, record: dict) -> bool:
        return self.tree is None or self._eval(self.tree, record)

    def _eval(self, node, record: dict) -> bool:
        kind = node[0]
        if kind == "and":
            return all(self._eval(child, record) for child in node[1])
        if kind == "or":
            return any(self._eval(child, record) for child in node[1])
        if kind == "not":
            return not self._eval(node[1], record)
        _, name, op, value = node
        labels = record.get("labels", {})
        if name == "labels":
            actual = value if op == ":" and (value == "*" or value in labels) else None
        elif name.startswith("labels."):
            actual = labels.get(name[len("labels."):])
        else:
            actual = record.get(name)
        if op == ":":
            if value == "*" or name == "labels":
                return actual is not None
            if name == "state":
                return actual == value.upper()
            return actual is not None and value in actual
        if actual is None:
            return op == "!="
        return {
            "=": actual == value, "!=": actual != value,
            "<": actual < value, ">": actual > value, "<=": actual <= value, ">=": actual >= value,
        }[op]


# --- state --------------------------------------------------------------------------------------


@dataclass
class _Version:
    number: int
    data: bytes | None
    etag: str
    create_time: str = field(default_factory=_now)
    state: str = "ENABLED"
    destroy_time: str = ""
    client_checksum: bool = False


@dataclass
class _Secret:
    secret_id: str
    fields: dict  # what the client set (labels, replication, annotations, ...), protobuf JSON
    etag: str
    create_time: str = field(default_factory=_now)
    versions: dict[int, _Version] = field(default_factory=dict)
    policy: dict = field(default_factory=lambda: {"etag": EMPTY_POLICY_ETAG})


# The IAM permission of each method, checked on the resource its URL names (the project for
# create/list, the secret, or the version); https://cloud.google.com/secret-manager/docs/access-control.
PERMISSIONS: dict[str, str] = {
    "secrets.create": "secretmanager.secrets.create",
    "secrets.list": "secretmanager.secrets.list",
    "secrets.get": "secretmanager.secrets.get",
    "secrets.patch": "secretmanager.secrets.update",
    "secrets.delete": "secretmanager.secrets.delete",
    "secrets.getIamPolicy": "secretmanager.secrets.getIamPolicy",
    "secrets.setIamPolicy": "secretmanager.secrets.setIamPolicy",
    "secrets.versions.add": "secretmanager.versions.add",
    "secrets.versions.list": "secretmanager.versions.list",
    "secrets.versions.get": "secretmanager.versions.get",
    "secrets.versions.access": "secretmanager.versions.access",
    "secrets.versions.enable": "secretmanager.versions.enable",
    "secrets.versions.disable": "secretmanager.versions.disable",
    "secrets.versions.destroy": "secretmanager.versions.destroy",
}


class SecretManagerEmulator(FaultyEmulator):
    """Secret Manager v1 over REST, plus Python helpers (`put`, `access`, `fail_next`) for the sandbox."""

    def __init__(self, world):
        self.world = world
        self._secrets: dict[str, _Secret] = {}
        self._etag_clock = itertools.count(time.time_ns() // 1000)
        self.app = RoutedApp(self, before=self._before, converters={"seg": _Segment}, strict_slashes=False)
        self.faults = self.app.inject_faults(world)
        world.emulators["secretmanager"] = self
        # Google's default per-project quotas (quota.py): over them, 429 RESOURCE_EXHAUSTED.
        self.quotas = secret_manager_quotas(world.timing.time_factor)
        self.app.limiter = limiter(self.quotas, world, 429, "RESOURCE_EXHAUSTED")

    # --- sandbox helpers ------------------------------------------------------------------------

    def put(self, secret_id: str, data: bytes, labels: dict[str, str] | None = None) -> str:
        """Store `data` as a new version, creating the secret (automatic replication, `labels`) if missing."""
        with self.world.lock:
            if secret_id not in self._secrets:
                self._check_secret_id(secret_id)
                self._check_labels(labels or {})
                fields = {"replication": {"automatic": {}}, **({"labels": dict(labels)} if labels else {})}
                self._new_secret(secret_id, fields)
            return self._secret_name(secret_id) + f"/versions/{self._new_version(secret_id, data).number}"

    def access(self, secret_id: str, version: str = "latest") -> bytes:
        """The payload of a version, with the same errors (ApiError) the API would answer."""
        with self.world.lock:
            return self._usable(self.world.project, secret_id, version).data

    def iam_policy(self, secret_id: str) -> dict | None:
        """The secret's stored IAM policy (what setIamPolicy set), None if there is no such secret."""
        with self.world.lock:
            found = self._secrets.get(secret_id)
            return copy.deepcopy(found.policy) if found is not None else None

    # --- plumbing -------------------------------------------------------------------------------

    def _before(self, request: Request, endpoint: str) -> None:
        """Authenticate (401), check scopes, then IAM: the method's permission on its resource.

        The check comes before any lookup, as on Google: without the permission a missing secret
        is a 403 too ("or it may not exist"), so callers cannot probe for names.
        """
        principal = self.world.authenticate(request)
        method = endpoint.replace("secrets.versions.", "SecretManagerService.").replace(
            "secrets.", "SecretManagerService.")
        check_scopes(principal, "secretmanager", f"google.cloud.secretmanager.v1.{method}", read_only=False)
        if endpoint == "secrets.testIamPermissions":
            return  # answers with the subset the caller holds; needs no permission of its own
        if endpoint not in PERMISSIONS:
            raise ApiError(500, f"sandbox: no IAM permission is mapped for Secret Manager method {endpoint}")
        permission = PERMISSIONS[endpoint]
        args = getattr(request, "url_args", {})
        resource = f"projects/{args.get('project')}"
        if "secret" in args:
            resource += f"/secrets/{args['secret']}"
        if "version" in args:
            resource += f"/versions/{args['version']}"
        self.world.iam.check(principal, permission, resource)

    def _check_project(self, project: str) -> None:
        if project not in (self.world.project, self.world.project_number):
            raise ApiError(403, f"Permission denied on resource project {project}.", "PERMISSION_DENIED")

    def _secret_name(self, secret_id: str) -> str:
        return f"projects/{self.world.project_number}/secrets/{secret_id}"

    def _next_etag(self) -> str:
        return f'"{next(self._etag_clock):x}"'

    def _find(self, project: str, secret_id: str, versions: bool = False) -> _Secret:
        """The secret, or the real service's 404 (its wording differs for version-level calls)."""
        self._check_project(project)
        found = self._secrets.get(secret_id)
        if found is None:
            suffix = " or has no versions" if versions else ""
            raise ApiError(404, f"Secret [{self._secret_name(secret_id)}] not found{suffix}.", "NOT_FOUND")
        return found

    def _resolve(self, secret: _Secret, ref: str) -> _Version:
        """A version by number, `latest` (highest number, any state) or a version alias."""
        if ref == "latest":
            if not secret.versions:
                raise ApiError(404, f"Secret [{self._secret_name(secret.secret_id)}] not found or has no versions.",
                               "NOT_FOUND")
            return secret.versions[max(secret.versions)]
        aliases = secret.fields.get("versionAliases", {})
        if ref in aliases:
            ref = str(aliases[ref])
        if not ref.isdigit() or int(ref) == 0:
            raise ApiError(400, f"Invalid version id or alias [{ref}].", "INVALID_ARGUMENT")
        found = secret.versions.get(int(ref))
        if found is None:
            raise ApiError(404, f"Secret Version [{self._secret_name(secret.secret_id)}/versions/{ref}] not found.",
                           "NOT_FOUND")
        return found

    def _usable(self, project: str, secret_id: str, ref: str) -> _Version:
        """The version `ref` if it may be accessed: disabled and destroyed ones are FAILED_PRECONDITION."""
        found = self._resolve(self._find(project, secret_id, versions=True), ref)
        if found.state != "ENABLED":
            name = f"{self._secret_name(secret_id)}/versions/{found.number}"
            raise ApiError(400, f"Secret Version [{name}] is in {found.state} state.", "FAILED_PRECONDITION")
        return found

    def _new_secret(self, secret_id: str, fields: dict) -> _Secret:
        created = _Secret(secret_id=secret_id, fields=fields, etag=self._next_etag())
        self._secrets[secret_id] = created
        return created

    def _new_version(self, secret_id: str, data: bytes, client_checksum: bool = False) -> _Version:
        secret = self._secrets[secret_id]
        number = max(secret.versions, default=0) + 1
        created = _Version(number=number, data=data, etag=self._next_etag(), client_checksum=client_checksum)
        secret.versions[number] = created
        return created

    @staticmethod
    def _check_etag(given: str | None, current: str, name: str) -> None:
        if given and given != current:
            raise ApiError(400, f"The etag provided for [{name}] does not match the current etag.",
                           "FAILED_PRECONDITION")

    @staticmethod
    def _check_secret_id(secret_id: str) -> None:
        if not SECRET_ID.fullmatch(secret_id):
            raise ApiError(400, f"Invalid secret_id [{secret_id}]: it must match [a-zA-Z_0-9-]{{1,255}}.",
                           "INVALID_ARGUMENT")

    @staticmethod
    def _check_labels(labels) -> None:
        if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
            raise ApiError(400, f"Secret labels must be a map of at most {MAX_LABELS} entries.", "INVALID_ARGUMENT")
        for key, value in labels.items():
            if not LABEL_KEY.fullmatch(key) or not isinstance(value, str) or not LABEL_VALUE.fullmatch(value):
                raise ApiError(400, f"Invalid label {key}={value!r}: keys must match {LABEL_KEY.pattern} and "
                               f"values {LABEL_VALUE.pattern}.", "INVALID_ARGUMENT")

    def _secret_json(self, secret: _Secret) -> dict:
        return {
            **copy.deepcopy(secret.fields),
            "name": self._secret_name(secret.secret_id),
            "createTime": secret.create_time,
            "etag": secret.etag,
        }

    def _version_json(self, secret: _Secret, version: _Version, request: Request) -> dict:
        numeric = "enum-encoding=int" in request.args.get("$alt", "")
        body = {
            "name": f"{self._secret_name(secret.secret_id)}/versions/{version.number}",
            "createTime": version.create_time,
            "state": STATES[version.state] if numeric else version.state,
            "replicationStatus": {"automatic": {}},
            "etag": version.etag,
        }
        if version.destroy_time:
            body["destroyTime"] = version.destroy_time
        if version.client_checksum:
            body["clientSpecifiedPayloadChecksum"] = True
        return body

    # --- secrets --------------------------------------------------------------------------------

    @route("POST", SECRETS, "secrets.create")
    def _create(self, request: Request, project: str):
        self._check_project(project)
        secret_id = request.args.get("secretId", "")
        self._check_secret_id(secret_id)
        body = read_json(request)
        fields = {k: v for k, v in body.items() if k not in ("name", "createTime", "etag")}
        replication = fields.get("replication") or {}
        if "automatic" not in replication and not (replication.get("userManaged") or {}).get("replicas"):
            raise ApiError(400, "Secret.replication is required: automatic or userManaged with replicas.",
                           "INVALID_ARGUMENT")
        self._check_labels(fields.get("labels", {}))
        with self.world.lock:
            if secret_id in self._secrets:
                raise ApiError(409, f"Secret [{self._secret_name(secret_id)}] already exists.", "ALREADY_EXISTS")
            return json_response(self._secret_json(self._new_secret(secret_id, fields)))

    @route("GET", SECRETS, "secrets.list")
    def _list(self, request: Request, project: str):
        self._check_project(project)
        keep = _Filter(request.args.get("filter", ""), {"name", "create_time", "labels"})
        with self.world.lock:
            matching = [
                self._secret_json(s) for _, s in sorted(self._secrets.items())
                if keep({"name": self._secret_name(s.secret_id), "create_time": s.create_time,
                         "labels": s.fields.get("labels", {})})
            ]
        chunk, token = google_offset_page(matching, request, max_page=MAX_PAGE)
        return json_response(with_next_page_token({"secrets": chunk, "totalSize": len(matching)}, token))

    @route("GET", SECRET, "secrets.get")
    def _get(self, request: Request, project: str, secret: str):
        with self.world.lock:
            return json_response(self._secret_json(self._find(project, secret)))

    @route("PATCH", SECRET, "secrets.patch")
    def _patch(self, request: Request, project: str, secret: str):
        body = read_json(request)
        paths = [_camel(p.strip()) for p in request.args.get("updateMask", "").split(",") if p.strip()]
        if not paths:
            raise ApiError(400, "update_mask is required.", "INVALID_ARGUMENT")
        for path in paths:
            if path not in PATCHABLE:
                raise ApiError(400, f"Invalid update_mask path [{path}]; updatable: {sorted(PATCHABLE)}.",
                               "INVALID_ARGUMENT")
        if "labels" in paths:
            self._check_labels(body.get("labels", {}))
        with self.world.lock:
            found = self._find(project, secret)
            self._check_etag(body.get("etag"), found.etag, self._secret_name(secret))
            for path in paths:
                if path in body:
                    found.fields[path] = copy.deepcopy(body[path])
                else:
                    found.fields.pop(path, None)
            found.etag = self._next_etag()
            return json_response(self._secret_json(found))

    @route("DELETE", SECRET, "secrets.delete")
    def _delete(self, request: Request, project: str, secret: str):
        with self.world.lock:
            found = self._find(project, secret)
            self._check_etag(request.args.get("etag"), found.etag, self._secret_name(secret))
            del self._secrets[secret]
        return json_response({})

    # --- IAM ------------------------------------------------------------------------------------

    @route(("GET", "POST"), SECRET + ":getIamPolicy", "secrets.getIamPolicy")
    def _get_iam_policy(self, request: Request, project: str, secret: str):
        with self.world.lock:
            return json_response(copy.deepcopy(self._find(project, secret).policy))

    @route("POST", SECRET + ":setIamPolicy", "secrets.setIamPolicy")
    def _set_iam_policy(self, request: Request, project: str, secret: str):
        policy = read_json(request).get("policy") or {}
        version = int(policy.get("version") or 0)
        bindings = []
        for binding in policy.get("bindings", []):
            role, members = binding.get("role", ""), binding.get("members", [])
            if not re.fullmatch(r"(roles|projects/[^/]+/roles|organizations/\d+/roles)/[\w.]+", role):
                raise ApiError(400, f"Role {role} is not supported for this resource.", "INVALID_ARGUMENT")
            for member in members:
                if not MEMBER.fullmatch(member):
                    raise ApiError(400, f"Invalid member {member!r} in binding for {role}.", "INVALID_ARGUMENT")
            if "condition" in binding and version < 3:
                raise ApiError(400, "Conditional role bindings require policy version 3.", "INVALID_ARGUMENT")
            if members:
                bindings.append({**binding, "members": list(dict.fromkeys(members))})
        with self.world.lock:
            found = self._find(project, secret)
            if policy.get("etag") and policy["etag"] != found.policy["etag"]:
                raise ApiError(409, "There were concurrent policy changes. Please retry the whole "
                               "read-modify-write with exponential backoff.", "ABORTED")
            stored = {"version": max(version, 1), "etag": base64.b64encode(os.urandom(8)).decode()}
            if bindings:
                stored["bindings"] = bindings
            found.policy = stored
            return json_response(copy.deepcopy(stored))

    @route("POST", SECRET + ":testIamPermissions", "secrets.testIamPermissions")
    def _test_iam_permissions(self, request: Request, project: str, secret: str):
        asked = read_json(request).get("permissions", [])
        principal = self.world.authenticate(request)
        with self.world.lock:
            self._find(project, secret)
        resource = f"projects/{project}/secrets/{secret}"
        granted = [p for p in asked if p.startswith("secretmanager.")
                   and self.world.iam.permitted(principal, p, resource)]
        return json_response({"permissions": granted} if granted else {})

    # --- versions -------------------------------------------------------------------------------

    @route("POST", SECRET + ":addVersion", "secrets.versions.add")
    def _add_version(self, request: Request, project: str, secret: str):
        payload = read_json(request).get("payload") or {}
        data = _b64decode(payload.get("data", ""), "payload.data")
        if len(data) > MAX_PAYLOAD:
            raise ApiError(400, f"Secret payload is {len(data)} bytes; the limit is {MAX_PAYLOAD}.",
                           "INVALID_ARGUMENT")
        checksum = payload.get("dataCrc32c")
        if checksum is not None and str(checksum) != str(crc32c(data)):
            raise ApiError(400, "Checksum mismatch: payload.data_crc32c does not match the data.",
                           "INVALID_ARGUMENT")
        with self.world.lock:
            found = self._find(project, secret)
            created = self._new_version(secret, data, client_checksum=checksum is not None)
            return json_response(self._version_json(found, created, request))

    @route("GET", SECRET + "/versions", "secrets.versions.list")
    def _list_versions(self, request: Request, project: str, secret: str):
        keep = _Filter(request.args.get("filter", ""), {"name", "create_time", "state"})
        with self.world.lock:
            found = self._find(project, secret)
            matching = [
                self._version_json(found, v, request)
                for _, v in sorted(found.versions.items(), reverse=True)
                if keep({"name": f"{self._secret_name(secret)}/versions/{v.number}",
                         "create_time": v.create_time, "state": v.state})
            ]
        chunk, token = google_offset_page(matching, request, max_page=MAX_PAGE)
        return json_response(with_next_page_token({"versions": chunk, "totalSize": len(matching)}, token))

    @route("GET", VERSION, "secrets.versions.get")
    def _get_version(self, request: Request, project: str, secret: str, version: str):
        with self.world.lock:
            found = self._find(project, secret, versions=True)
            return json_response(self._version_json(found, self._resolve(found, version), request))

    @route("GET", VERSION + ":access", "secrets.versions.access")
    def _access(self, request: Request, project: str, secret: str, version: str):
        with self.world.lock:
            found = self._usable(project, secret, version)
        return json_response({
            "name": f"{self._secret_name(secret)}/versions/{found.number}",
            "payload": {"data": base64.b64encode(found.data).decode(), "dataCrc32c": str(crc32c(found.data))},
        })

    @route("POST", VERSION + ":enable", "secrets.versions.enable")
    def _enable(self, request: Request, project: str, secret: str, version: str):
        return self._set_state(request, "ENABLED", project, secret, version)

    @route("POST", VERSION + ":disable", "secrets.versions.disable")
    def _disable(self, request: Request, project: str, secret: str, version: str):
        return self._set_state(request, "DISABLED", project, secret, version)

    @route("POST", VERSION + ":destroy", "secrets.versions.destroy")
    def _destroy(self, request: Request, project: str, secret: str, version: str):
        return self._set_state(request, "DESTROYED", project, secret, version)

    def _set_state(self, request: Request, state: str, project: str, secret: str, version: str):
        """enable / disable / destroy: a DESTROYED version never changes again."""
        etag = read_json(request).get("etag")
        with self.world.lock:
            found = self._find(project, secret, versions=True)
            target = self._resolve(found, version)
            name = f"{self._secret_name(secret)}/versions/{target.number}"
            self._check_etag(etag, target.etag, name)
            if target.state == "DESTROYED":
                raise ApiError(400, f"Secret Version [{name}] is in DESTROYED state.", "FAILED_PRECONDITION")
            target.state = state
            if state == "DESTROYED":
                target.data = None
                target.destroy_time = _now()
            target.etag = self._next_etag()
            return json_response(self._version_json(found, target, request))
