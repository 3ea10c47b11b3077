"""What the Kubernetes API server checks before it stores an object: apimachinery's name and label
validators, the Status causes they produce, Istio's CRD schemas (openAPIV3Schema + CEL rules from the
CRD file) and the Service checks a client can trip. Split out of kube.py; used by KubeEmulator.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import celpy
import yaml
from celpy import celtypes
from jsonschema import Draft7Validator

from . import kube_rbac


VERBS = ["create", "delete", "get", "list", "patch", "update"]


# --- names and labels: the apimachinery validators every object's metadata goes through -------------

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_DNS_1035_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def dns_label_error(value: str) -> str | None:
    if len(value) <= 63 and _DNS_LABEL_RE.fullmatch(value):
        return None
    return (
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
        "and must start and end with an alphanumeric character (at most 63 characters)"
    )


def dns_subdomain_error(value: str) -> str | None:
    if len(value) <= 253 and _DNS_SUBDOMAIN_RE.fullmatch(value):
        return None
    return (
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
        "and must start and end with an alphanumeric character (at most 253 characters)"
    )


def dns_1035_error(value: str) -> str | None:
    if len(value) <= 63 and _DNS_1035_RE.fullmatch(value):
        return None
    return (
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
        "alphabetic character, and end with an alphanumeric character (at most 63 characters)"
    )


def path_segment_error(value: str) -> str | None:
    """Names of RBAC objects (`system:discovery`): any path segment (apimachinery path.IsValidPathSegmentName)."""
    if value in (".", "..") or "/" in value or "%" in value:
        return "may not be '.' or '..' and may not contain '/' or '%'"
    return None


def qualified_name_error(key: str) -> str | None:
    """Label and annotation keys: an optional DNS-subdomain prefix, '/', then a 63-char name."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or dns_subdomain_error(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if len(name) > 63 or not _QUALIFIED_NAME_RE.fullmatch(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
            "end with an alphanumeric character (at most 63 characters)"
        )
    return None


def label_value_error(value: str) -> str | None:
    if value == "" or (len(value) <= 63 and _QUALIFIED_NAME_RE.fullmatch(value)):
        return None
    return (
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
        "and must start and end with an alphanumeric character (at most 63 characters)"
    )


def cause(fieldpath: str, reason: str, message: str) -> dict[str, str]:
    return {"reason": reason, "message": message, "field": fieldpath}


def join_path(path: str, key: Any) -> str:
    """Kubernetes field paths: `spec.ports.http` for object keys, `spec.ports[0]` for list items."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


# --- CRD schemas ---------------------------------------------------------------------------------------


def _cel_substring(text, start, end=None):
    """Kubernetes' CEL strings extension `substring`, which celpy lacks; out of range is an error."""
    text, start = str(text), int(start)
    end = len(text) if end is None else int(end)
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"index out of range: {start}..{end} of a {len(text)}-character string")
    return celtypes.StringType(text[start:end])


class CelRules:
    """`x-kubernetes-validations` rules compiled once with celpy, plus the Kubernetes CEL extras they use.

    A rule that errors while running (e.g. substring out of range) counts as failed, as in the real
    apiserver; a rule that does not compile fails at load time rather than being skipped.
    """

    FUNCTIONS = {"substring": _cel_substring}

    def __init__(self):
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def add(self, rule: str) -> None:
        if rule not in self._programs:
            self._programs[rule] = self._env.program(self._env.compile(rule), functions=self.FUNCTIONS)

    def holds(self, rule: str, value: Any) -> bool:
        try:
            result = self._programs[rule].evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError:
            return False
        return isinstance(result, celtypes.BoolType) and bool(result)


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}

# How the apiserver words a failed OpenAPI constraint ("spec.weight in body should be ...").
_CONSTRAINT_TEXT = {
    "maximum": "should be less than or equal to {}",
    "minimum": "should be greater than or equal to {}",
    "maxLength": "may not be longer than {}",
    "minLength": "should be at least {} chars long",
    "maxItems": "must have at most {} items",
    "minItems": "should have at least {} items",
    "maxProperties": "must have at most {} properties",
    "pattern": "should match '{}'",
}


class CrdSchema:
    """One served version's openAPIV3Schema: prunes unknown fields, validates structure and CEL rules.

    Structure goes through jsonschema (Draft 7), which ignores the `x-kubernetes-*` keywords and, with
    no format checker, treats `format: int32/int64/date-time` leniently as the apiserver does.
    """

    def __init__(self, schema: dict, cel: CelRules):
        schema = copy.deepcopy(schema)
        # Every object carries these beside its own schema; metadata is validated separately.
        schema.setdefault("properties", {}).update(
            apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"}
        )
        Draft7Validator.check_schema(schema)
        self.schema = schema
        self._validator = Draft7Validator(schema)
        self._cel = cel
        self._compile_rules(schema)

    def _compile_rules(self, node: Any) -> None:
        if isinstance(node, dict):
            for check in node.get("x-kubernetes-validations", ()):
                unsupported = set(check) - {"rule", "message"}
                if unsupported:
                    raise ValueError(f"x-kubernetes-validations keys not supported: {sorted(unsupported)}")
                self._cel.add(check["rule"])
            for value in node.values():
                self._compile_rules(value)
        elif isinstance(node, list):
            for value in node:
                self._compile_rules(value)

    def prune(self, obj: dict) -> list[str]:
        """Drop fields the schema does not declare (as the apiserver does) and return their paths."""
        unknown: list[str] = []
        self._prune(self.schema, obj, "", unknown)
        return unknown

    def _prune(self, schema: dict, value: Any, path: str, unknown: list[str]) -> None:
        if isinstance(value, dict):
            props = schema.get("properties")
            extra = schema.get("additionalProperties")
            closed = props is not None and extra is None and not schema.get("x-kubernetes-preserve-unknown-fields")
            for key in list(value):
                if closed and key not in props:
                    unknown.append(join_path(path, key))
                    del value[key]
                    continue
                sub = (props or {}).get(key, extra)
                if isinstance(sub, dict):
                    self._prune(sub, value[key], join_path(path, key), unknown)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                self._prune(schema["items"], item, join_path(path, index), unknown)

    def causes(self, obj: dict) -> list[dict]:
        found = [c for err in self._validator.iter_errors(obj) for c in self._schema_causes(err)]
        self._cel_causes(self.schema, obj, "", found)
        unique = {(c["field"], c["message"]): c for c in found}
        return list(unique.values())

    @staticmethod
    def _schema_causes(err) -> list[dict]:
        path = ""
        for key in err.absolute_path:
            path = join_path(path, key)
        if err.validator == "required":
            missing = [p for p in err.validator_value if p not in err.instance]
            return [cause(join_path(path, p), "FieldValueRequired", "Required value") for p in missing]
        if err.validator == "enum":
            supported = ", ".join(json.dumps(v) for v in err.validator_value)
            message = f"Unsupported value: {json.dumps(err.instance)}: supported values: {supported}"
            return [cause(path, "FieldValueNotSupported", message)]
        if err.validator == "type":
            actual = json_type(err.instance)
            message = f'Invalid value: "{actual}": {path} in body must be of type {err.validator_value}: "{actual}"'
            return [cause(path, "FieldValueTypeInvalid", message)]
        template = _CONSTRAINT_TEXT.get(err.validator)
        detail = f"{path} in body " + template.format(err.validator_value) if template else err.message
        composite = isinstance(err.instance, (dict, list))
        shown = f'"{json_type(err.instance)}"' if composite else json.dumps(err.instance)
        return [cause(path, "FieldValueInvalid", f"Invalid value: {shown}: {detail}")]

    def _cel_causes(self, schema: dict, value: Any, path: str, found: list[dict]) -> None:
        """Run each node's CEL rules with `self` bound to the value there; ill-typed nodes are skipped
        (the structural error is already reported)."""
        declared = schema.get("type")
        if declared and not _TYPE_CHECKS[declared](value):
            return
        for check in schema.get("x-kubernetes-validations", ()):
            if not self._cel.holds(check["rule"], value):
                shown = declared or json_type(value)
                message = f'Invalid value: "{shown}": {check["message"]}'
                found.append(cause(path or "<root>", "FieldValueInvalid", message))
        if isinstance(value, dict):
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key, extra)
                if isinstance(sub, dict):
                    self._cel_causes(sub, item, join_path(path, key), found)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                self._cel_causes(schema["items"], item, join_path(path, index), found)


# --- kinds ---------------------------------------------------------------------------------------------


@dataclass
class Kind:
    """One resource type as discovery and the REST paths name it."""

    kind: str
    plural: str
    singular: str
    group: str = ""  # "" is the core group, served under /api
    versions: tuple[str, ...] = ("v1",)  # preferred (and storage) version first
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    schemas: dict[str, CrdSchema] = field(default_factory=dict)  # by version; CRDs only
    status_subresource: bool = False  # writes to the object keep the stored status, /status only status
    unconditional_update: bool = True  # custom resources insist on metadata.resourceVersion in a PUT
    name_error: Callable[[str], str | None] = dns_subdomain_error
    verbs: tuple[str, ...] = tuple(VERBS)  # what discovery lists, and all the REST paths serve

    @property
    def resource(self) -> str:
        """The qualified resource name errors use: `services`, `workloadentries.networking.istio.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def details(self, name: str, **extra: Any) -> dict:
        details = {"name": name, "group": self.group, "kind": self.plural, **extra}
        return {k: v for k, v in details.items() if v != ""}


CORE_KINDS = (
    Kind("Namespace", "namespaces", "namespace", namespaced=False, short_names=("ns",),
         status_subresource=True, name_error=dns_label_error),
    Kind("Service", "services", "service", short_names=("svc",), categories=("all",),
         status_subresource=True, name_error=dns_1035_error),
    Kind("ServiceAccount", "serviceaccounts", "serviceaccount", short_names=("sa",)),
    Kind("Role", "roles", "role", group=kube_rbac.RBAC_GROUP, name_error=path_segment_error),
    Kind("ClusterRole", "clusterroles", "clusterrole", group=kube_rbac.RBAC_GROUP, namespaced=False,
         name_error=path_segment_error),
    Kind("RoleBinding", "rolebindings", "rolebinding", group=kube_rbac.RBAC_GROUP, name_error=path_segment_error),
    Kind("ClusterRoleBinding", "clusterrolebindings", "clusterrolebinding", group=kube_rbac.RBAC_GROUP,
         namespaced=False, name_error=path_segment_error),
    Kind("SelfSubjectAccessReview", "selfsubjectaccessreviews", "", group=kube_rbac.AUTHORIZATION_GROUP,
         namespaced=False, verbs=("create",)),
    # Pods are only stored and listed (meshjoin checks a Service selects none before pruning it).
    Kind("Pod", "pods", "pod", short_names=("po",), categories=("all",), status_subresource=True),
)
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


def version_priority(version: str) -> tuple:
    """Kubernetes' version ordering: GA before beta before alpha, higher numbers first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0, version)
    major, stability, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stability]
    return (rank, -int(major), -int(minor or 0), version)


def load_crd_kinds(crd_path: str, cel: CelRules) -> list[Kind]:
    """The kinds a CRD file defines, each with the schema of every served version."""
    with open(crd_path, encoding="utf-8") as handle:
        crds = [doc for doc in yaml.safe_load_all(handle) if doc]
    kinds = []
    for crd in crds:
        spec, names = crd["spec"], crd["spec"]["names"]
        served = [v for v in spec["versions"] if v.get("served")]
        storage = next(v["name"] for v in served if v.get("storage"))
        versions = sorted((v["name"] for v in served), key=lambda name: (name != storage, version_priority(name)))
        kinds.append(
            Kind(
                kind=names["kind"],
                plural=names["plural"],
                singular=names.get("singular", names["kind"].lower()),
                group=spec["group"],
                versions=tuple(versions),
                namespaced=spec.get("scope") == "Namespaced",
                short_names=tuple(names.get("shortNames", ())),
                categories=tuple(names.get("categories", ())),
                schemas={v["name"]: CrdSchema(v["schema"]["openAPIV3Schema"], cel) for v in served},
                status_subresource="status" in (served[0].get("subresources") or {}),
                unconditional_update=False,
            )
        )
    return kinds




# --- service specifics ---------------------------------------------------------------------------------


def service_causes(spec: dict) -> list[dict]:
    """The Service checks a client can trip: port ranges, port names, protocol, type."""
    causes = []
    if spec.get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        causes.append(cause("spec.type", "FieldValueNotSupported",
                            f'Unsupported value: {json.dumps(spec.get("type"))}: supported values: '
                            '"ClusterIP", "ExternalName", "LoadBalancer", "NodePort"'))
    ports = spec.get("ports") or []
    names = set()
    for index, port in enumerate(ports):
        path = f"spec.ports[{index}]"
        if not isinstance(port, dict):
            causes.append(cause(path, "FieldValueTypeInvalid", 'Invalid value: "port": must be an object'))
            continue
        number = port.get("port")
        if not (isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 65535):
            causes.append(cause(f"{path}.port", "FieldValueInvalid",
                                f"Invalid value: {json.dumps(number)}: must be between 1 and 65535, inclusive"))
        name = port.get("name", "")
        if not name and len(ports) > 1:
            causes.append(cause(f"{path}.name", "FieldValueRequired", "Required value"))
        elif name and dns_label_error(name):
            causes.append(cause(f"{path}.name", "FieldValueInvalid",
                                f'Invalid value: "{name}": {dns_label_error(name)}'))
        elif name in names:
            causes.append(cause(f"{path}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"'))
        names.add(name)
        if port.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            causes.append(cause(f"{path}.protocol", "FieldValueNotSupported",
                                f'Unsupported value: {json.dumps(port.get("protocol"))}: supported values: '
                                '"SCTP", "TCP", "UDP"'))
        target = port.get("targetPort", number)
        if isinstance(target, str):
            bad_target = len(target) > 15 or dns_label_error(target) is not None
        else:
            bad_target = not (isinstance(target, int) and 1 <= target <= 65535)
        if bad_target:
            causes.append(cause(f"{path}.targetPort", "FieldValueInvalid",
                                f"Invalid value: {json.dumps(target)}: "
                                "must be a port number 1-65535 or an IANA service name"))
    return causes
