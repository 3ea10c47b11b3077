"""The emulated API server's OpenAPI documents, for `kubectl explain` and kubectl's own checks.

kubectl (1.27+) reads OpenAPI v3: `GET /openapi/v3` lists one document per group-version
(`{"paths": {"apis/networking.istio.io/v1": {"serverRelativeURL": "/openapi/v3/apis/...?hash=..."}}}`),
and each document carries `components.schemas` (marked with `x-kubernetes-group-version-kind`, which
`kubectl explain` looks up) and `paths` (whose PATCH operations, marked the same way, list the query
parameters: kubectl checks there that the server supports `fieldValidation` before leaving validation
to the server). The custom kinds' schemas are the CRDs' own openAPIV3Schema, as the apiserver
publishes them; the built-in kinds get outlines of their fields (the sandbox does not ship the
Kubernetes API's full schema: README, sandbox limits).

OpenAPI v2 stays an empty protobuf document, so nothing uses v2 for client-side validation.
"""

from __future__ import annotations

import copy
import hashlib
import json

from werkzeug.wrappers import Request, Response

from .web import ApiError

OBJECT_META_REF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
API_VERSION_DOC = ("APIVersion defines the versioned schema of this representation of an object. Servers should "
                   "convert recognized schemas to the latest internal value, and may reject unrecognized values.")
KIND_DOC = ("Kind is a string value representing the REST resource this object represents. Servers may infer "
            "this from the endpoint the client submits requests to. Cannot be updated. In CamelCase.")
METADATA_DOC = "Standard object's metadata."

OBJECT_META = {
    "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects "
                   "users must create.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "generateName": {"type": "string", "description": "GenerateName is an optional prefix, used by the server, "
                                                          "to generate a unique name ONLY IF the Name field has not "
                                                          "been provided."},
        "namespace": {"type": "string", "description": "Namespace defines the space within which each name must be "
                                                       "unique."},
        "labels": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "Map of string keys and values that can be used to organize and categorize "
                                  "(scope and select) objects."},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Annotations is an unstructured key value map stored with a resource."},
        "uid": {"type": "string", "description": "UID is the unique in time and space value for this object."},
        "resourceVersion": {"type": "string", "description": "An opaque value that represents the internal version "
                                                             "of this object."},
        "generation": {"type": "integer", "format": "int64",
                       "description": "A sequence number representing a specific generation of the desired state."},
        "creationTimestamp": {"type": "string", "format": "date-time",
                              "description": "CreationTimestamp is a timestamp representing the server time when "
                                             "this object was created."},
    },
}

_RULE = {"type": "object", "description": "PolicyRule holds information that describes a policy rule.",
         "required": ["verbs"], "properties": {
             name: {"type": "array", "items": {"type": "string"}, "description": doc} for name, doc in (
                 ("verbs", "Verbs is a list of Verbs that apply to ALL the ResourceKinds contained in this rule. "
                           "'*' represents all verbs."),
                 ("apiGroups", "APIGroups is the name of the APIGroup that contains the resources."),
                 ("resources", "Resources is a list of resources this rule applies to. '*' represents all resources."),
                 ("resourceNames", "ResourceNames is an optional white list of names that the rule applies to."),
                 ("nonResourceURLs", "NonResourceURLs is a set of partial urls that a user should have access to."))}}
_SUBJECTS = {"type": "array", "description": "Subjects holds references to the objects the role applies to.",
             "items": {"type": "object", "required": ["kind", "name"], "properties": {
                 "kind": {"type": "string", "description": 'Kind of object being referenced: "User", "Group", '
                                                           'or "ServiceAccount".'},
                 "apiGroup": {"type": "string", "description": "APIGroup holds the API group of the referenced "
                                                               "subject."},
                 "name": {"type": "string", "description": "Name of the object being referenced."},
                 "namespace": {"type": "string", "description": "Namespace of the referenced object."}}}}
_ROLE_REF = {"type": "object", "required": ["apiGroup", "kind", "name"],
             "description": "RoleRef can reference a Role in the current namespace or a ClusterRole in the global "
                            "namespace. This field is immutable.",
             "properties": {k: {"type": "string", "description": f"{k} of the referenced role."}
                            for k in ("apiGroup", "kind", "name")}}

# Outlines of the built-in kinds: their own fields, one level deep, with the API reference's summary.
BUILT_IN_FIELDS: dict[str, tuple[str, dict]] = {
    "Namespace": ("Namespace provides a scope for Names. Use of multiple namespaces is optional.", {
        "spec": {"type": "object", "description": "Spec defines the behavior of the Namespace.",
                 "properties": {"finalizers": {"type": "array", "items": {"type": "string"},
                                               "description": "Finalizers is an opaque list of values that must be "
                                                              "empty to permanently remove object from storage."}}},
        "status": {"type": "object", "description": "Status describes the current status of a Namespace.",
                   "properties": {"phase": {"type": "string", "description": "Phase is the current lifecycle phase "
                                                                              "of the namespace."}}}}),
    "Service": ("Service is a named abstraction of software service (for example, mysql) consisting of local port "
                "(for example 3306) that the proxy listens on, and the selector that determines which pods will "
                "answer requests sent through the proxy.", {
        "spec": {"type": "object", "description": "Spec defines the behavior of a service.", "properties": {
            "selector": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "Route service traffic to pods with label keys and values matching this "
                                        "selector."},
            "ports": {"type": "array", "description": "The list of ports that are exposed by this service.",
                      "items": {"type": "object", "required": ["port"], "properties": {
                          "name": {"type": "string", "description": "The name of this port within the service."},
                          "port": {"type": "integer", "format": "int32",
                                   "description": "The port that will be exposed by this service."},
                          "protocol": {"type": "string", "description": 'The IP protocol for this port: "TCP", '
                                                                        '"UDP", or "SCTP".'},
                          "targetPort": {"x-kubernetes-int-or-string": True,
                                         "description": "Number or name of the port to access on the pods "
                                                        "targeted by the service."}}}},
            "type": {"type": "string", "description": "type determines how the Service is exposed: ClusterIP, "
                                                      "ExternalName, NodePort, LoadBalancer."},
            "clusterIP": {"type": "string", "description": "clusterIP is the IP address of the service, "
                                                           "allocated by the master."}}},
        "status": {"type": "object", "description": "Most recently observed status of the service."}}),
    "ServiceAccount": ("ServiceAccount binds together: a name, understood by users, and perhaps by peripheral "
                       "systems, for an identity; a principal that can be authenticated and authorized; a set of "
                       "secrets.", {
        "automountServiceAccountToken": {"type": "boolean", "description": "Whether pods running as this service "
                                                                           "account should have an API token "
                                                                           "automatically mounted."}}),
    "Role": ("Role is a namespaced, logical grouping of PolicyRules that can be referenced as a unit by a "
             "RoleBinding.", {"rules": {"type": "array", "items": _RULE,
                                        "description": "Rules holds all the PolicyRules for this Role"}}),
    "ClusterRole": ("ClusterRole is a cluster level, logical grouping of PolicyRules that can be referenced as a "
                    "unit by a RoleBinding or ClusterRoleBinding.",
                    {"rules": {"type": "array", "items": _RULE,
                               "description": "Rules holds all the PolicyRules for this ClusterRole"}}),
    "RoleBinding": ("RoleBinding references a role, but does not contain it.  It can reference a Role in the same "
                    "namespace or a ClusterRole in the global namespace.",
                    {"subjects": _SUBJECTS, "roleRef": _ROLE_REF}),
    "ClusterRoleBinding": ("ClusterRoleBinding references a ClusterRole, but not contain it.",
                           {"subjects": _SUBJECTS, "roleRef": _ROLE_REF}),
    "SelfSubjectAccessReview": ("SelfSubjectAccessReview checks whether or the current user can perform an action.",
                                {"spec": {"type": "object", "description": "Spec holds information about the request "
                                                                           "being evaluated."},
                                 "status": {"type": "object", "description": "Status is filled in by the server and "
                                                                             "indicates whether the request is "
                                                                             "allowed or not"}}),
}

FIELD_VALIDATION = {
    "name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
    "description": "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) "
                   "containing unknown or duplicate fields. Valid values are: Ignore, Warn, Strict.",
}
DRY_RUN = {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True},
           "description": "When present, indicates that modifications should not be persisted."}


def schema_name(kind) -> str:
    """Definition names as the apiserver spells them: io.k8s.api.core.v1.Namespace, io.istio.networking.v1.X."""
    if kind.group == "":
        return f"io.k8s.api.core.{{version}}.{kind.kind}"
    if kind.group.endswith(".k8s.io"):
        return f"io.k8s.api.{kind.group.removesuffix('.k8s.io').split('.')[0]}.{{version}}.{kind.kind}"
    return ".".join(reversed(kind.group.split("."))) + f".{{version}}.{kind.kind}"


def _operation(kind, version: str, action: str, parameters: list) -> dict:
    return {
        "operationId": f"{action}{kind.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": kind.group, "version": version, "kind": kind.kind},
        "parameters": parameters,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{schema_name(kind).format(version=version)}"}}}}},
    }


class OpenApi:
    """Documents built once from the emulator's kinds; served as JSON (kubectl also accepts JSON)."""

    def __init__(self, kinds):
        self._documents: dict[str, bytes] = {}
        by_gv: dict[str, list] = {}
        for kind in kinds:
            for version in kind.versions:
                prefix = f"apis/{kind.group}/{version}" if kind.group else f"api/{version}"
                by_gv.setdefault(prefix, []).append((kind, version))
        for prefix, members in sorted(by_gv.items()):
            self._documents[prefix] = json.dumps(self._document(prefix, members), sort_keys=True).encode()
        self._index = json.dumps({"paths": {
            prefix: {"serverRelativeURL": f"/openapi/v3/{prefix}?hash={hashlib.sha512(doc).hexdigest()[:32].upper()}"}
            for prefix, doc in self._documents.items()}}).encode()

    def _document(self, prefix: str, members: list) -> dict:
        schemas = {OBJECT_META_REF: OBJECT_META}
        paths: dict[str, dict] = {}
        for kind, version in members:
            name = schema_name(kind).format(version=version)
            schemas[name] = self._schema(kind, version)
            if "create" not in kind.verbs:
                paths[f"/{prefix}/{kind.plural}"] = {"post": _operation(kind, version, "post", [DRY_RUN])}
                continue
            writes = [DRY_RUN, FIELD_VALIDATION]
            base = f"/{prefix}/namespaces/{{namespace}}/{kind.plural}" if kind.namespaced else f"/{prefix}/{kind.plural}"
            paths[base] = {"get": _operation(kind, version, "list", []), "post": _operation(kind, version, "post", writes)}
            paths[base + "/{name}"] = {
                "get": _operation(kind, version, "get", []),
                "put": _operation(kind, version, "put", writes),
                "patch": _operation(kind, version, "patch", writes),
                "delete": _operation(kind, version, "delete", [DRY_RUN]),
            }
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.4"},
                "paths": paths, "components": {"schemas": schemas}}

    @staticmethod
    def _schema(kind, version: str) -> dict:
        crd = kind.schemas.get(version)
        if crd is not None:
            schema = copy.deepcopy(crd.schema)  # its description, if any, is the CRD's own
        else:
            description, fields = BUILT_IN_FIELDS[kind.kind]
            schema = {"type": "object", "description": description, "properties": copy.deepcopy(fields)}
        schema.setdefault("properties", {}).update(
            apiVersion={"type": "string", "description": API_VERSION_DOC},
            kind={"type": "string", "description": KIND_DOC},
            metadata={"allOf": [{"$ref": f"#/components/schemas/{OBJECT_META_REF}"}], "default": {},
                      "description": METADATA_DOC},
        )
        schema["x-kubernetes-group-version-kind"] = [{"group": kind.group, "kind": kind.kind, "version": version}]
        return schema

    def serve(self, request: Request, rest: str) -> Response:
        rest = rest.strip("/")
        if rest == "v2":
            return Response(b"", content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
        if rest == "v3":
            return Response(self._index, content_type="application/json")
        document = self._documents.get(rest.removeprefix("v3/")) if rest.startswith("v3/") else None
        if document is None:
            raise ApiError(404, "the server could not find the requested resource", "NotFound")
        return Response(document, content_type="application/json")
