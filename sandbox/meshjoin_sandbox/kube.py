"""Kubernetes API server emulator: the GKE cluster's control plane, as far as meshjoin touches it.

Serves discovery (enough for real `kubectl`), Namespaces, Services, ServiceAccounts and Istio's
WorkloadEntry / WorkloadGroup / ServiceEntry, with the semantics a client can observe: Status errors,
resourceVersion conflicts, label/field selectors, paging, merge and JSON patches, dry runs, pruning of
unknown fields, and CRD validation (openAPIV3Schema + `x-kubernetes-validations` CEL rules) straight
from Istio's own CRD file — so an object the product writes here is one the real cluster would accept.

Who may call what is GKE's decision (kube_rbac.py): the Google token names a user (email with the
userinfo.email scope, else the numeric id), RBAC objects stored here decide, IAM `container.*`
permissions are the fallback; SelfSubjectAccessReview answers `kubectl auth can-i`. OpenAPI v2/v3
for `kubectl explain` comes from the same CRD schemas (kube_openapi.py); the few built-in kinds
kubectl sends as protobuf are decoded (kube_protobuf.py). What an object must satisfy before it is stored
is kube_schema.py; selectors are kube_selectors.py; merge and JSON patches kube_patch.py. This module is
the HTTP surface and the store: routing, discovery, paging, resourceVersion, dry runs.

Deliberately absent: watch, server-side apply, finalizers/graceful deletion (deletes are immediate;
deleting a namespace deletes its contents at once), Table output, protobuf answers and protobuf
bodies of kinds other than those kube_protobuf.py lists, strategic-merge list merging (a strategic
merge patch is applied as a JSON merge patch, minus its `$` directives).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import secrets
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import yaml
from werkzeug.wrappers import Request, Response

from . import kube_openapi, kube_rbac
from .kube_protobuf import PROTOBUF_MEDIA_TYPE, decode_object
from .kube_patch import PatchFailed, json_patch, merge_patch, strip_directives
from .kube_schema import (CORE_KINDS, RBAC_KINDS, CelRules, Kind, cause, label_value_error, load_crd_kinds,
                          qualified_name_error, service_causes, version_priority)
from .kube_selectors import FIELD_SELECTABLE, parse_selector, selector_matches
from .paging import kube_page
from .web import ApiError, FaultyEmulator, RoutedApp, json_response, read_json, route


SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.4-gke.1415000",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-01T00:00:00Z",
    "goVersion": "go1.23.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}
SEED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease", "istio-system")
SERVICE_CIDR_START = "10.96.0.1"  # the first address goes to default/kubernetes, as in a real cluster

# Status reasons by HTTP code, for errors raised without a Kubernetes reason of their own.
REASON_BY_CODE = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}
STATUS_REASONS = {*REASON_BY_CODE.values(), "AlreadyExists"}
NOT_FOUND_MESSAGE = "the server could not find the requested resource"
OBJECT_MEDIA_TYPES = ("application/json", "application/yaml", PROTOBUF_MEDIA_TYPE)
PATCH_MEDIA_TYPES = ("application/json-patch+json", "application/merge-patch+json",
                     "application/strategic-merge-patch+json")

# Route templates (werkzeug syntax) of the resource paths, core (`/api/v1`) and named groups alike;
# each handler carries its routes (web.route).
API_ROOTS = ("/api/<version>", "/apis/<group>/<version>")
COLLECTIONS = tuple(base + "/<plural>" for root in API_ROOTS for base in (root, root + "/namespaces/<namespace>"))
OBJECTS = tuple(collection + "/<name>" for collection in COLLECTIONS)
STATUSES = tuple(root + "/namespaces/<namespace>/<plural>/<name>/<any(status):subresource>" for root in API_ROOTS)


def read_body(request: Request, media_types: tuple[str, ...]) -> Any:
    """The request body in one of `media_types`; 415 for anything else (e.g. protobuf). Like the
    apiserver, a body without a Content-Type (the generated Python client sends none) is JSON."""
    mimetype = request.mimetype or "application/json"
    if mimetype not in media_types:
        raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                            f"{', '.join(media_types)}", "UnsupportedMediaType")
    if mimetype == PROTOBUF_MEDIA_TYPE:
        return decode_object(request.get_data())
    if mimetype != "application/yaml":
        return read_json(request)
    try:
        return yaml.safe_load(request.get_data(as_text=True)) or {}
    except yaml.YAMLError as exc:
        raise ApiError(400, f"request body is not YAML: {exc}", "BadRequest") from exc


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _content(obj: dict) -> dict:
    """What metadata.generation tracks: everything but type, metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}


def _is_true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def _dry_run(request: Request) -> bool:
    return request.args.get("dryRun") == "All"


# --- the emulator --------------------------------------------------------------------------------------


class KubeEmulator(FaultyEmulator):
    """The cluster's API server. Objects live in dicts keyed by resource and (namespace, name)."""

    def __init__(self, world, crd_path: str):
        """A fresh cluster: seed namespaces, the bootstrap RBAC policy and the operator as cluster-admin.
        kubernetes.tf's objects come later, once the namespaces they bind in exist
        (`seed_terraform_rbac`, or `sandbox up` applying them over the API)."""
        self.world = world
        self._lock = threading.RLock()
        self._rv = 0  # the cluster-wide resourceVersion counter, bumped by every write
        self._next_ip = ipaddress.IPv4Address(SERVICE_CIDR_START)
        self._kinds: dict[tuple[str, str], Kind] = {}
        for kind in (*CORE_KINDS, *load_crd_kinds(crd_path, CelRules())):
            self._kinds[(kind.group, kind.plural)] = kind
        self._objects: dict[str, dict[tuple[str, str], dict]] = {k.resource: {} for k in self._kinds.values()}
        # Per resource: (resourceVersion when sorted, keys in listing order); see _listing_order.
        self._orders: dict[str, tuple[int, list[tuple[str, str]]]] = {}
        self.authorizer = kube_rbac.Authorizer(self._objects.__getitem__, self._iam_permitted)
        self._seed()
        self._seed_rbac()
        self.openapi = kube_openapi.OpenApi(list(self._kinds.values()))
        # Fault injection per API method `PLURAL.VERB` (e.g. `workloadentries.create`; VERB is one of
        # list, create, get, replace, patch, delete), discovery calls by their endpoint name.
        self.app = RoutedApp(self, render_error=render_status, before=self._authorize, strict_slashes=False)
        self.faults = self.app.inject_faults(world, self._method_names(), method_name=self._method_name)
        world.emulators["kube"] = self

    # -- wiring

    OBJECT_VERBS = ("list", "create", "get", "replace", "patch", "delete")

    def _method_names(self) -> list[str]:
        discovery = ["version", "core_versions", "groups", "group", "openapi", "resources"]
        return discovery + [f"{k.plural}.{verb}" for k in self._kinds.values() for verb in self.OBJECT_VERBS]

    @staticmethod
    def _method_name(endpoint: str, args: dict) -> str:
        return f"{args['plural']}.{endpoint}" if "plural" in args else endpoint

    # -- authentication and authorization (kube_rbac.py)

    # REST endpoint -> Kubernetes verb (k8s.io/apiserver RequestInfoFactory).
    ENDPOINT_VERBS = {"list": "list", "create": "create", "get": "get", "replace": "update", "patch": "patch",
                      "delete": "delete", "access_review": "create"}

    def _authorize(self, request: Request, endpoint: str) -> None:
        """401 unless the bearer token is one the world issued; 403 unless RBAC or IAM allow the call."""
        try:
            principal = self.world.authenticate(request)
        except ApiError as exc:
            raise ApiError(401, "Unauthorized", "Unauthorized") from exc
        user = kube_rbac.kube_user(principal)
        wanted_user = request.headers.get("Impersonate-User")
        wanted_groups = request.headers.getlist("Impersonate-Group")
        if wanted_user or wanted_groups:
            user, principal = self._impersonate(user, principal, wanted_user, wanted_groups)
        request.environ["sandbox.principal"], request.environ["sandbox.user"] = principal, user
        attrs = self._attributes(request, endpoint, request.url_args, user)
        with self._lock:
            decision = self.authorizer.decide(attrs, principal)
        if not decision.allowed:
            raise kube_rbac.forbidden(attrs, decision.reason)

    def _impersonate(self, user: kube_rbac.KubeUser, principal, wanted_user: str | None, wanted_groups: list[str]):
        """`kubectl --as USER [--as-group G]`: the caller needs the `impersonate` verb on users (and groups);
        the request then runs as that user, in system:authenticated plus the groups asked for. GKE's
        IAM fallback does not apply to an impersonated user (it is no Google token)."""
        if not wanted_user:
            raise ApiError(400, "requested impersonation of groups without impersonating a user", "BadRequest")
        asked = [("users", wanted_user)] + [("groups", group) for group in wanted_groups]
        for resource, name in asked:
            attrs = kube_rbac.Attributes(user, "impersonate", resource=resource, name=name)
            with self._lock:
                decision = self.authorizer.decide(attrs, principal)
            if not decision.allowed:
                raise kube_rbac.forbidden(attrs, decision.reason)
        groups = tuple(dict.fromkeys([*wanted_groups, kube_rbac.AUTHENTICATED]))
        return kube_rbac.KubeUser(wanted_user, groups), None

    def _attributes(self, request: Request, endpoint: str, args: dict, user: kube_rbac.KubeUser) -> kube_rbac.Attributes:
        verb = self.ENDPOINT_VERBS.get(endpoint)
        if verb is None:  # discovery, version, OpenAPI: non-resource URLs
            return kube_rbac.Attributes(user, request.method.lower(), resource_request=False, path=request.path)
        if verb == "list" and _is_true(request.args.get("watch")):
            verb = "watch"
        plural = args.get("plural", "selfsubjectaccessreviews")
        namespace = args.get("namespace") or ""
        if plural == "namespaces" and not args.get("group") and args.get("name"):
            namespace = args["name"]  # RequestInfoFactory: /api/v1/namespaces/NAME is also in namespace NAME
        return kube_rbac.Attributes(
            user, verb, api_group=args.get("group", kube_rbac.AUTHORIZATION_GROUP if endpoint == "access_review" else ""),
            api_version=args.get("version", ""), resource=plural, subresource=args.get("subresource") or "",
            namespace=namespace, name=args.get("name") or "")

    def _iam_permitted(self, principal, permission: str) -> bool:
        """GKE's fallback: the account's IAM permission on the cluster (granted on its project)."""
        iam = getattr(self.world, "iam", None)
        if iam is None:
            return False
        cluster = f"projects/{self.world.project}/locations/{self.world.region}/clusters/{self.world.cluster_name}"
        return iam.permitted(principal, permission, cluster)

    def _seed_rbac(self) -> None:
        """The bootstrap policy every cluster has, and the operator as cluster-admin."""
        for obj in (*kube_rbac.bootstrap_policy(), kube_rbac.operator_binding(self.world.operator_email)):
            self.put_object(obj)

    def seed_terraform_rbac(self, variables: dict | None = None, directory=None) -> list[dict]:
        """Create (or replace) the RBAC objects deploy/terraform/kubernetes.tf (or another module
        `directory`) creates with `variables` (default: the world's); the namespaces they bind in must
        exist, as for `terraform apply`."""
        if variables is None:
            variables = self.world.terraform_vars or self.world.default_terraform_vars()
        objects = kube_rbac.terraform_rbac_objects(variables, self.world.project_number, directory)
        return [self.put_object(obj) for obj in objects]

    def put_object(self, obj: dict) -> dict:
        """Create or replace an object as `kubectl apply` by an administrator would (seeding, tests)."""
        group, _, version = obj["apiVersion"].rpartition("/")
        kind = next(k for k in self._kinds.values() if k.group == group and k.kind == obj["kind"])
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        namespace = meta.get("namespace") or ""
        with self._lock:
            if kind.namespaced and ("", namespace) not in self._objects["namespaces"]:
                raise ApiError(404, f'namespaces "{namespace}" not found', "NotFound",
                               {"name": namespace, "kind": "namespaces"})
            old = self._objects[kind.resource].get((namespace, meta.get("name", "")))
            self._admit(kind, version, obj, old)
            if old is None:
                return self._insert(kind, obj)
            for key in ("uid", "creationTimestamp", "generation"):
                meta[key] = old["metadata"][key]
            meta["resourceVersion"] = self._bump()
            self._objects[kind.resource][(namespace, meta["name"])] = obj
            return obj

    def delete_object(self, api_version: str, kind_name: str, name: str, namespace: str = "") -> None:
        group, _, _ = api_version.rpartition("/")
        kind = next(k for k in self._kinds.values() if k.group == group and k.kind == kind_name)
        with self._lock:
            self._objects[kind.resource].pop((namespace, name), None)
            self._bump()

    @route("POST", f"/apis/{kube_rbac.AUTHORIZATION_GROUP}/<version>/selfsubjectaccessreviews", "access_review")
    def _access_review(self, request: Request, version: str) -> Response:
        """SelfSubjectAccessReview: would the caller be allowed this? (what `kubectl auth can-i` asks)."""
        kind = self._kind(kube_rbac.AUTHORIZATION_GROUP, version, "selfsubjectaccessreviews", None)
        review = self._read_object(request, kind, version, None)
        spec = review.get("spec")
        if not isinstance(spec, dict):
            spec = {}
        resource, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if bool(resource) == bool(non_resource):
            raise self._invalid(kind, "", [cause("spec", "FieldValueInvalid",
                                                 "Invalid value: exactly one of nonResourceAttributes or "
                                                 "resourceAttributes must be specified")])
        principal, user = request.environ["sandbox.principal"], request.environ["sandbox.user"]
        if resource:
            attrs = kube_rbac.Attributes(
                user, str(resource.get("verb") or ""), api_group=str(resource.get("group") or ""),
                api_version=str(resource.get("version") or ""), resource=str(resource.get("resource") or ""),
                subresource=str(resource.get("subresource") or ""), namespace=str(resource.get("namespace") or ""),
                name=str(resource.get("name") or ""))
        else:
            attrs = kube_rbac.Attributes(user, str(non_resource.get("verb") or ""), resource_request=False,
                                         path=str(non_resource.get("path") or ""))
        with self._lock:
            decision = self.authorizer.decide(attrs, principal)
        status: dict[str, Any] = {"allowed": decision.allowed}
        if decision.reason:
            status["reason"] = decision.reason
        review["metadata"] = {"creationTimestamp": None}
        review["status"] = status
        return json_response(review, 201)

    def _seed(self) -> None:
        """What a fresh GKE cluster with Istio installed shows: system namespaces, default/kubernetes."""
        for name in SEED_NAMESPACES:
            namespace = {"metadata": {"name": name}}
            self._admit(self._kinds[("", "namespaces")], "v1", namespace, None)
            self._insert(self._kinds[("", "namespaces")], namespace)
        kubernetes = {
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 443}]},
        }
        self._admit(self._kinds[("", "services")], "v1", kubernetes, None)
        self._insert(self._kinds[("", "services")], kubernetes)

    # -- discovery

    def _kinds_in(self, group: str, version: str) -> list[Kind]:
        return [k for k in self._kinds.values() if k.group == group and version in k.versions]

    @route("GET", "/version", "version")
    def _version(self, request: Request) -> Response:
        return json_response(SERVER_VERSION)

    @route("GET", "/api", "core_versions")
    def _core_versions(self, request: Request) -> Response:
        return json_response({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}],
        })

    def _group_info(self, group: str) -> dict:
        versions = sorted({v for k in self._kinds.values() if k.group == group for v in k.versions},
                          key=version_priority)
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    @route("GET", "/apis", "groups")
    def _groups(self, request: Request) -> Response:
        groups = sorted({k.group for k in self._kinds.values() if k.group})
        return json_response({"kind": "APIGroupList", "apiVersion": "v1",
                              "groups": [self._group_info(g) for g in groups]})

    @route("GET", "/apis/<group>", "group")
    def _group(self, request: Request, group: str) -> Response:
        if not any(k.group == group for k in self._kinds.values()):
            raise ApiError(404, NOT_FOUND_MESSAGE, "NotFound")
        return json_response({"kind": "APIGroup", "apiVersion": "v1", **self._group_info(group)})

    @route("GET", API_ROOTS, "resources")
    def _resources(self, request: Request, version: str, group: str = "") -> Response:
        kinds = self._kinds_in(group, version)
        if not kinds:
            raise ApiError(404, NOT_FOUND_MESSAGE, "NotFound")
        resources = []
        for kind in kinds:
            entry = {"name": kind.plural, "singularName": kind.singular, "namespaced": kind.namespaced,
                     "kind": kind.kind, "verbs": list(kind.verbs)}
            if kind.short_names:
                entry["shortNames"] = list(kind.short_names)
            if kind.categories:
                entry["categories"] = list(kind.categories)
            resources.append(entry)
            if kind.status_subresource:
                resources.append({"name": f"{kind.plural}/status", "singularName": "", "namespaced": kind.namespaced,
                                  "kind": kind.kind, "verbs": ["get", "patch", "update"]})
        return json_response({"kind": "APIResourceList", "apiVersion": "v1",
                              "groupVersion": kind.api_version(version), "resources": resources})

    @route("GET", "/openapi/<path:rest>", "openapi")
    def _openapi(self, request: Request, rest: str) -> Response:
        """OpenAPI v3 (what `kubectl explain` and kubectl's fieldValidation check read) and v2."""
        return self.openapi.serve(request, rest)

    # -- object plumbing

    def _kind(self, group: str, version: str, plural: str, namespace: str | None,
              item: bool = False, subresource: str | None = None) -> Kind:
        """The kind a path names; 404 for unknown resources and for paths of the wrong scope."""
        kind = self._kinds.get((group, plural))
        if kind is not None and "get" not in kind.verbs and (item or subresource):
            raise ApiError(404, NOT_FOUND_MESSAGE, "NotFound")
        if (
            kind is None
            or version not in kind.versions
            or (namespace is not None and not kind.namespaced)
            or (item and kind.namespaced and namespace is None)
            or (subresource and not kind.status_subresource)
        ):
            raise ApiError(404, NOT_FOUND_MESSAGE, "NotFound")
        return kind

    def _stored(self, kind: Kind, namespace: str | None, name: str) -> dict:
        obj = self._objects[kind.resource].get((namespace or "", name))
        if obj is None:
            raise ApiError(404, f'{kind.resource} "{name}" not found', "NotFound", kind.details(name))
        return obj

    @staticmethod
    def _render(kind: Kind, obj: dict, version: str, in_list: bool = False) -> dict:
        """The stored object as the requested version shows it (core list items carry no type)."""
        out = copy.deepcopy(obj)
        if in_list and not kind.group:
            out.pop("apiVersion", None)
            out.pop("kind", None)
        else:
            out["apiVersion"] = kind.api_version(version)
        return out

    @staticmethod
    def _read_object(request: Request, kind: Kind, version: str, namespace: str | None) -> dict:
        """The request body as an object of `kind`, its type and namespace reconciled with the URL."""
        body = read_body(request, OBJECT_MEDIA_TYPES)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "BadRequest")
        expected = kind.api_version(version)
        if body.setdefault("apiVersion", expected) != expected:
            raise ApiError(400, f"the API version in the data ({body['apiVersion']}) does not match the "
                                f"expected API version ({expected})", "BadRequest")
        if body.setdefault("kind", kind.kind) != kind.kind:
            raise ApiError(400, f"the kind in the data ({body['kind']}) does not match the expected kind "
                                f"({kind.kind})", "BadRequest")
        if body.get("metadata") is None:
            body["metadata"] = {}
        meta = body["metadata"]
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object", "BadRequest")
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent "
                                    "on the request", "BadRequest")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        return body

    def _invalid(self, kind: Kind, name: str, causes: list[dict]) -> ApiError:
        lines = [f"{c['field']}: {c['message']}" for c in causes]
        summary = lines[0] if len(lines) == 1 else "[" + ", ".join(lines) + "]"
        return ApiError(422, f'{kind.qualified_kind} "{name}" is invalid: {summary}', "Invalid",
                        {**kind.details(name), "kind": kind.kind, "causes": causes})

    def _admit(self, kind: Kind, version: str, obj: dict, old: dict | None,
               field_validation: str = "Warn") -> dict[str, str]:
        """Defaulting, pruning and validation of a create or update; returns Warning headers.

        `field_validation` is the request's fieldValidation: unknown fields are dropped, and either
        refused (Strict, kubectl's default), reported as warnings (Warn, the API default) or not (Ignore).
        """
        meta = obj["metadata"]
        warnings: list[str] = []
        causes = self._metadata_causes(kind, meta)
        schema = kind.schemas.get(version)
        if schema is not None:
            unknown = schema.prune(obj)
            if unknown and field_validation == "Strict":
                raise ApiError(400, "strict decoding error: " + ", ".join(f'unknown field "{p}"' for p in unknown),
                               "BadRequest")
            if field_validation == "Warn":
                warnings += [f'unknown field "{p}"' for p in unknown]
            causes += schema.causes(obj)
        if kind.kind in RBAC_KINDS:
            causes += kube_rbac.rbac_causes(kind.kind, obj, old)
        if kind.kind == "Namespace":
            self._default_namespace(obj)
        elif kind.kind == "Service":
            causes += self._default_service(obj, old) + service_causes(obj["spec"])
        if causes:
            raise self._invalid(kind, meta.get("name") or "", causes)
        if not warnings:
            return {}
        return {"Warning": ", ".join('299 - "{}"'.format(w.replace('"', '\\"')) for w in warnings)}

    @staticmethod
    def _metadata_causes(kind: Kind, meta: dict) -> list[dict]:
        causes = []
        name = meta.get("name")
        if not name:
            causes.append(cause("metadata.name", "FieldValueRequired",
                                "Required value: name or generateName is required"))
        elif not isinstance(name, str) or kind.name_error(name):
            causes.append(cause("metadata.name", "FieldValueInvalid", f"Invalid value: {json.dumps(name)}: "
                                f"{kind.name_error(name) if isinstance(name, str) else 'must be a string'}"))
        for section in ("labels", "annotations"):
            entries = meta.get(section) or {}
            if not isinstance(entries, dict):
                causes.append(cause(f"metadata.{section}", "FieldValueTypeInvalid", "Invalid value: must be a map"))
                continue
            for key, value in entries.items():
                path = f"metadata.{section}"
                if qualified_name_error(key):
                    causes.append(cause(path, "FieldValueInvalid",
                                        f'Invalid value: "{key}": {qualified_name_error(key)}'))
                if not isinstance(value, str):
                    causes.append(cause(f"{path}.{key}", "FieldValueTypeInvalid", "Invalid value: must be a string"))
                elif section == "labels" and label_value_error(value):
                    causes.append(cause(path, "FieldValueInvalid",
                                        f'Invalid value: "{value}": {label_value_error(value)}'))
        return causes

    @staticmethod
    def _default_namespace(obj: dict) -> None:
        name = obj["metadata"].get("name") or ""
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {"phase": "Active"})

    def _default_service(self, obj: dict, old: dict | None) -> list[dict]:
        """Apiserver defaults for a Service; the cluster IP is allocated once and then immutable."""
        spec = obj.setdefault("spec", {})
        if not isinstance(spec, dict):
            raise ApiError(400, "spec must be an object", "BadRequest")
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        obj.setdefault("status", {"loadBalancer": {}})
        if spec["type"] == "ExternalName":
            return []
        previous = old["spec"].get("clusterIP") if old else None
        wanted = spec.get("clusterIP") or previous
        if previous and wanted != previous:
            return [cause("spec.clusterIP", "FieldValueInvalid", f'Invalid value: "{wanted}": field is immutable')]
        if not wanted:
            wanted = str(self._next_ip)
            self._next_ip += 1
        spec.update(clusterIP=wanted, clusterIPs=[wanted])
        if wanted != "None":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        return []

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _insert(self, kind: Kind, obj: dict) -> dict:
        """Stamp a new object's server-owned metadata and store it (the tail of every create)."""
        obj["apiVersion"], obj["kind"] = kind.api_version(kind.versions[0]), kind.kind
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1,
                    resourceVersion=self._bump())
        self._objects[kind.resource][(meta.get("namespace") or "", meta["name"])] = obj
        if kind.kind == "Namespace":  # the serviceaccount controller's work, done at once
            sa = {"metadata": {"name": "default", "namespace": meta["name"]}}
            self._insert(self._kinds[("", "serviceaccounts")], sa)
        return obj

    # -- verbs

    @route("GET", COLLECTIONS, "list")
    def _list(self, request: Request, version: str, plural: str, group: str = "",
              namespace: str | None = None) -> Response:
        kind = self._kind(group, version, plural, namespace)
        if "list" not in kind.verbs:
            raise ApiError(405, "the server does not allow this method on the requested resource", "MethodNotAllowed")
        if _is_true(request.args.get("watch")):
            raise ApiError(405, "watch is not supported by the sandbox API server", "MethodNotAllowed")
        labels = parse_selector(request.args.get("labelSelector", ""))
        fields = parse_selector(request.args.get("fieldSelector", ""), set_based=False)
        for _, key, _ in fields:
            if key not in FIELD_SELECTABLE:
                raise ApiError(400, f'field label not supported: "{key}"', "BadRequest")
        with self._lock:
            objects = self._objects[kind.resource]

            def selected(key: tuple[str, str]) -> bool:
                return selector_matches(labels, objects[key]["metadata"].get("labels") or {}) and \
                    selector_matches(fields, {"metadata.name": key[1], "metadata.namespace": key[0]})

            # A page starts right after the continue token's key and stops at the first match past the
            # limit: a chunked listing of N objects reads each once (paging.py).
            keys, token, remaining = kube_page(request, self._listing_order(kind.resource), selected, scope=namespace)
            page = [objects[key] for key in keys]
            list_meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
            if token is not None:
                list_meta["continue"] = token
                # ListMeta: "If the list request contained label or field selectors, then the number of
                # remaining items is unknown and the field will be left unset".
                if not labels and not fields:
                    list_meta["remainingItemCount"] = remaining
            # Shallow views of the stored objects, serialized before the lock is released.
            return json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version(version),
                                  "metadata": list_meta,
                                  "items": [self._list_item(kind, obj, version) for obj in page]})

    def _listing_order(self, resource: str) -> list[tuple[str, str]]:
        """The keys of one resource in listing order, kept until the next write (every write bumps the
        resourceVersion) or a change of count (lock held)."""
        cached = self._orders.get(resource)
        objects = self._objects[resource]
        if cached is None or cached[0] != self._rv or len(cached[1]) != len(objects):
            cached = self._orders[resource] = (self._rv, sorted(objects))
        return cached[1]

    @staticmethod
    def _list_item(kind: Kind, obj: dict, version: str) -> dict:
        """`_render(..., in_list=True)` without the deep copy: a shallow view, serialized under the lock."""
        out = dict(obj)
        if not kind.group:
            out.pop("apiVersion", None)
            out.pop("kind", None)
        else:
            out["apiVersion"] = kind.api_version(version)
        return out

    @route("POST", COLLECTIONS, "create")
    def _create(self, request: Request, version: str, plural: str, group: str = "",
                namespace: str | None = None) -> Response:
        kind = self._kind(group, version, plural, namespace)
        if kind.namespaced and namespace is None:
            raise ApiError(405, "the server does not allow this method on the requested resource", "MethodNotAllowed")
        obj = self._read_object(request, kind, version, namespace)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{secrets.token_hex(3)[:5]}"
        with self._lock:
            if kind.namespaced and ("", namespace) not in self._objects["namespaces"]:
                raise ApiError(404, f'namespaces "{namespace}" not found', "NotFound",
                               {"name": namespace, "kind": "namespaces"})
            if kind.status_subresource:
                obj.pop("status", None)  # status is the server's (or the /status subresource's) to set
            headers = self._admit(kind, version, obj, None, request.args.get("fieldValidation", "Warn"))
            if (namespace or "", meta["name"]) in self._objects[kind.resource]:
                raise ApiError(409, f'{kind.resource} "{meta["name"]}" already exists', "AlreadyExists",
                               kind.details(meta["name"]))
            if _dry_run(request):
                meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1,
                            resourceVersion=str(self._rv))
            else:
                self._insert(kind, obj)
            return json_response(self._render(kind, obj, version), 201, headers)

    @route("GET", OBJECTS + STATUSES, "get")
    def _get(self, request: Request, version: str, plural: str, name: str, group: str = "",
             namespace: str | None = None, subresource: str | None = None) -> Response:
        kind = self._kind(group, version, plural, namespace, item=True, subresource=subresource)
        with self._lock:
            return json_response(self._render(kind, self._stored(kind, namespace, name), version))

    @route("PUT", OBJECTS + STATUSES, "replace")
    def _replace(self, request: Request, version: str, plural: str, name: str, group: str = "",
                 namespace: str | None = None, subresource: str | None = None) -> Response:
        kind = self._kind(group, version, plural, namespace, item=True, subresource=subresource)
        body = self._read_object(request, kind, version, namespace)
        with self._lock:
            old = self._stored(kind, namespace, name)
            return self._update(request, kind, version, old, body, name, subresource)

    @route("PATCH", OBJECTS + STATUSES, "patch")
    def _patch(self, request: Request, version: str, plural: str, name: str, group: str = "",
               namespace: str | None = None, subresource: str | None = None) -> Response:
        kind = self._kind(group, version, plural, namespace, item=True, subresource=subresource)
        patch = read_body(request, PATCH_MEDIA_TYPES)
        with self._lock:
            old = self._stored(kind, namespace, name)
            current = self._render(kind, old, version)
            try:
                if request.mimetype == "application/json-patch+json":
                    patched = json_patch(current, patch)
                elif request.mimetype == "application/merge-patch+json":
                    patched = merge_patch(current, patch)
                else:
                    patched = merge_patch(current, strip_directives(patch))
            except PatchFailed as exc:
                raise ApiError(422, str(exc), "Invalid") from exc
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise ApiError(400, "the patched object is not a valid object", "BadRequest")
            if patched.get("apiVersion") != current["apiVersion"] or patched.get("kind") != kind.kind:
                raise ApiError(400, "a patch may not change apiVersion or kind", "BadRequest")
            if kind.namespaced and patched["metadata"].get("namespace") != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent "
                                    "on the request", "BadRequest")
            return self._update(request, kind, version, old, patched, name, subresource)

    def _update(self, request: Request, kind: Kind, version: str, old: dict, new: dict, name: str,
                subresource: str | None) -> Response:
        """The shared tail of PUT and PATCH: preconditions, status split, admission, commit."""
        old_meta = old["metadata"]
        if new["metadata"].get("name") != name:
            raise ApiError(400, f"the name of the object ({new['metadata'].get('name')}) does not match the name "
                                f"on the URL ({name})", "BadRequest")
        wanted_rv = new["metadata"].get("resourceVersion")
        if not wanted_rv and not kind.unconditional_update:
            raise self._invalid(kind, name, [cause("metadata.resourceVersion", "FieldValueInvalid",
                                                   "Invalid value: 0x0: must be specified for an update")])
        if wanted_rv and wanted_rv != old_meta["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {kind.resource} "{name}": the object has been '
                                "modified; please apply your changes to the latest version and try again",
                           "Conflict", kind.details(name))
        if subresource == "status":
            status = new.get("status")
            new = self._render(kind, old, version)
            new["status"] = status
        elif kind.status_subresource:
            new["status"] = copy.deepcopy(old.get("status"))
        if new.get("status") is None:
            new.pop("status", None)
        meta = new["metadata"]
        for key in ("uid", "creationTimestamp", "generation"):
            meta[key] = old_meta[key]
        headers = self._admit(kind, version, new, old, request.args.get("fieldValidation", "Warn"))
        if _content(new) != _content(old):
            meta["generation"] = old_meta["generation"] + 1
        if _dry_run(request):
            meta["resourceVersion"] = old_meta["resourceVersion"]
        else:
            meta["resourceVersion"] = self._bump()
            new["apiVersion"] = kind.api_version(kind.versions[0])
            self._objects[kind.resource][(old_meta.get("namespace") or "", name)] = new
        return json_response(self._render(kind, new, version), 200, headers)

    @route("DELETE", OBJECTS, "delete")
    def _delete(self, request: Request, version: str, plural: str, name: str, group: str = "",
                namespace: str | None = None) -> Response:
        kind = self._kind(group, version, plural, namespace, item=True)
        options = read_body(request, OBJECT_MEDIA_TYPES) if request.get_data() else {}
        preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
        with self._lock:
            obj = self._stored(kind, namespace, name)
            meta = obj["metadata"]
            for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                if preconditions.get(key) and preconditions[key] != meta[key]:
                    raise ApiError(409, f"Precondition failed: {label} in precondition: {preconditions[key]}, "
                                        f"{label} in object meta: {meta[key]}", "Conflict", kind.details(name))
            if not _dry_run(request):
                del self._objects[kind.resource][(namespace or "", name)]
                self._bump()
                if kind.kind == "Namespace":
                    for objects in self._objects.values():
                        for key in [k for k in objects if k[0] == name]:
                            del objects[key]
            rendered = self._render(kind, obj, version)
        if kind.group:  # custom resources answer with a Status; built-in kinds with the object
            return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "details": kind.details(name, uid=meta["uid"])})
        return json_response(rendered)


def render_status(err: ApiError) -> Response:
    """Errors as the apiserver sends them: a `Status` object that every Kubernetes client parses."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": err.message,
        "reason": err.reason if err.reason in STATUS_REASONS else REASON_BY_CODE.get(err.status, "Unknown"),
        "code": err.status,
    }
    if err.details:
        body["details"] = err.details
    return json_response(body, err.status)
