"""Who may do what in the emulated GKE cluster: authentication, RBAC, and GKE's IAM fallback.

Authentication, as GKE does it for a Google OAuth access token: the Kubernetes user is the account's
email when the token carries the `userinfo.email` scope, else the account's numeric unique id
(kubernetes/kubernetes#58141: "userinfo.email is used to authenticate to GKE APIs with gserviceaccount
email instead of numeric uniqueID"; GKE's RBAC guide, "Forbidden error for service accounts on VM
instances"). Every such user is in the group `system:authenticated`.

Authorization, in GKE's order (GKE RBAC guide: "GKE first checks the RBAC policy; if there is none,
GKE checks IAM permissions"): the RBAC authorizer over the Roles, ClusterRoles, RoleBindings and
ClusterRoleBindings stored in the cluster (rbac.authorization.k8s.io/v1 semantics: verbs, apiGroups,
resources with `res/sub` and `*/sub` subresources, resourceNames, nonResourceURLs with trailing `*`),
then the account's IAM permissions `container.<resource>.<verb>` on the cluster's project, custom
resources as `container.thirdPartyObjects.<verb>` (as the GKE 403s name them, e.g. "Required
\\"container.thirdPartyObjects.update\\" permission" for a patch of a custom object).

A refusal is kube-apiserver's Forbidden Status (responsewriters.forbiddenMessage + errors.NewForbidden),
with GKE's reason appended: `namespaces "x" is forbidden: User "1133..." cannot get resource
"namespaces" in API group "" in the namespace "x": requires one of ["container.namespaces.get"]
permission(s) in Cloud IAM or a Kubernetes RBAC role with verb "get" for resource "namespaces".`

The cluster starts with the bootstrap policy every cluster has (cluster-admin bound to system:masters;
system:discovery, system:basic-user and system:public-info-viewer for every authenticated user), the
sandbox operator bound to cluster-admin, and the RBAC objects deploy/terraform/kubernetes.tf creates,
evaluated through terraform.py with the sandbox's variables: one source of truth.

Impersonation (`kubectl --as`) needs the `impersonate` verb on users/groups (kube.py).
Not emulated (README, sandbox limits): aggregated ClusterRoles (aggregationRule), the escalate/bind
checks on writes of roles and bindings, and SubjectAccessReview for other users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .web import ApiError

RBAC_GROUP = "rbac.authorization.k8s.io"
AUTHORIZATION_GROUP = "authorization.k8s.io"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
MASTERS = "system:masters"
# Qualified resource names of the RBAC kinds, as the emulator stores them.
ROLES, CLUSTER_ROLES = f"roles.{RBAC_GROUP}", f"clusterroles.{RBAC_GROUP}"
ROLE_BINDINGS, CLUSTER_ROLE_BINDINGS = f"rolebindings.{RBAC_GROUP}", f"clusterrolebindings.{RBAC_GROUP}"

# API groups whose kinds GKE names by their own IAM resource; every other group is a custom resource.
BUILT_IN_GROUPS = {"", RBAC_GROUP, AUTHORIZATION_GROUP, "apps", "batch", "authentication.k8s.io",
                   "apiextensions.k8s.io", "networking.k8s.io", "policy", "storage.k8s.io"}
# IAM spells resources in lowerCamelCase (container.serviceAccounts.create, container.clusterRoles.get).
IAM_RESOURCE = {
    "serviceaccounts": "serviceAccounts", "roles": "roles", "clusterroles": "clusterRoles",
    "rolebindings": "roleBindings", "clusterrolebindings": "clusterRoleBindings",
    "selfsubjectaccessreviews": "selfSubjectAccessReviews", "customresourcedefinitions": "customResourceDefinitions",
}
# Kubernetes verb -> IAM verb: a patch needs `update`, deletecollection `delete`.
IAM_VERB = {"patch": "update", "deletecollection": "delete", "watch": "list"}


@dataclass(frozen=True)
class KubeUser:
    name: str
    groups: tuple[str, ...] = (AUTHENTICATED,)


def kube_user(principal) -> KubeUser:
    """GKE's user for a Google access token: email with userinfo.email, else the numeric unique id."""
    return KubeUser(principal.kube_username)


@dataclass(frozen=True)
class Attributes:
    """What a request asks to do (k8s.io/apiserver authorizer.Attributes)."""

    user: KubeUser
    verb: str
    resource_request: bool = True
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def combined_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


# --- rule matching (k8s.io/component-helpers/auth/rbac/validation) -----------------------------------


def _has(values: Iterable[str] | None, wanted: str) -> bool:
    values = values or ()
    return "*" in values or wanted in values


def _resource_matches(rule: dict, combined: str, subresource: str) -> bool:
    for resource in rule.get("resources") or ():
        if resource in ("*", combined):
            return True
        if subresource and resource == f"*/{subresource}":
            return True
    return False


def _url_matches(rule: dict, path: str) -> bool:
    for url in rule.get("nonResourceURLs") or ():
        if url == "*" or url == path or (url.endswith("*") and path.startswith(url.rstrip("*"))):
            return True
    return False


def rule_allows(rule: dict, attrs: Attributes) -> bool:
    if not _has(rule.get("verbs"), attrs.verb):
        return False
    if not attrs.resource_request:
        return _url_matches(rule, attrs.path)
    names = rule.get("resourceNames") or ()
    return (
        _has(rule.get("apiGroups"), attrs.api_group)
        and _resource_matches(rule, attrs.combined_resource, attrs.subresource)
        and (not names or attrs.name in names)
    )


def subject_matches(subject: dict, user: KubeUser, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == user.name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{namespace}:{name}"
    return False


# --- the decision -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # why it was allowed (for SelfSubjectAccessReview), or GKE's hint when refused


class Authorizer:
    """RBAC over the stored objects, then GKE's IAM fallback.

    `objects(resource)` returns the emulator's {(namespace, name): object} for a qualified resource;
    `iam_permitted(principal, permission)` asks IAM about the cluster (None: no IAM fallback).
    """

    def __init__(self, objects: Callable[[str], dict], iam_permitted: Callable[[Any, str], bool] | None):
        self._objects = objects
        self._iam_permitted = iam_permitted

    def _rules_for(self, user: KubeUser, namespace: str):
        """(binding description, rules) of every binding that names `user` and applies here."""
        cluster_roles = self._objects(CLUSTER_ROLES)
        for (_, name), binding in sorted(self._objects(CLUSTER_ROLE_BINDINGS).items()):
            if any(subject_matches(s, user, "") for s in binding.get("subjects") or ()):
                ref = binding.get("roleRef") or {}
                role = cluster_roles.get(("", ref.get("name", ""))) if ref.get("kind") == "ClusterRole" else None
                if role is not None:
                    yield f'ClusterRoleBinding "{name}" of ClusterRole "{ref["name"]}"', role.get("rules") or ()
        if not namespace:
            return
        roles = self._objects(ROLES)
        for (ns, name), binding in sorted(self._objects(ROLE_BINDINGS).items()):
            if ns != namespace or not any(subject_matches(s, user, ns) for s in binding.get("subjects") or ()):
                continue
            ref = binding.get("roleRef") or {}
            if ref.get("kind") == "ClusterRole":
                role = cluster_roles.get(("", ref.get("name", "")))
            elif ref.get("kind") == "Role":
                role = roles.get((ns, ref.get("name", "")))
            else:
                role = None
            if role is not None:
                yield (f'RoleBinding "{name}" of {ref["kind"]} "{ref["name"]}" to User "{user.name}" '
                       f'in namespace "{ns}"'), role.get("rules") or ()

    def rbac_allows(self, attrs: Attributes) -> str | None:
        """The RBAC authorizer's reason when some bound rule allows the request, else None."""
        for where, rules in self._rules_for(attrs.user, attrs.namespace):
            if any(isinstance(rule, dict) and rule_allows(rule, attrs) for rule in rules):
                return f"RBAC: allowed by {where}"
        return None

    def decide(self, attrs: Attributes, principal: Any) -> Decision:
        reason = self.rbac_allows(attrs)
        if reason is not None:
            return Decision(True, reason)
        if not attrs.resource_request:
            return Decision(False, "")
        permission = iam_permission(attrs)
        if self._iam_permitted is not None and principal is not None and self._iam_permitted(principal, permission):
            return Decision(True, f'allowed by Cloud IAM permission "{permission}"')
        return Decision(False, gke_hint(attrs, permission))


def iam_permission(attrs: Attributes) -> str:
    """The IAM permission GKE asks for when RBAC is silent (GKE api-permissions; its 403 messages)."""
    if attrs.api_group in BUILT_IN_GROUPS:
        resource = IAM_RESOURCE.get(attrs.resource, attrs.resource)
    else:
        resource = "thirdPartyObjects"
    verb = IAM_VERB.get(attrs.verb, attrs.verb)
    if attrs.subresource == "status":
        verb = "getStatus" if verb in ("get", "list") else "updateStatus"
    return f"container.{resource}.{verb}"


def gke_hint(attrs: Attributes, permission: str) -> str:
    return (f'requires one of ["{permission}"] permission(s) in Cloud IAM or a Kubernetes RBAC role with verb '
            f'"{attrs.verb}" for resource "{attrs.combined_resource}".')


def forbidden(attrs: Attributes, reason: str) -> ApiError:
    """kube-apiserver's 403 (responsewriters.Forbidden), with the authorizers' reason appended."""
    user = attrs.user.name
    if not attrs.resource_request:
        message = f"forbidden: User {json.dumps(user)} cannot {attrs.verb} path {json.dumps(attrs.path)}"
        details: dict = {}
    else:
        what = (f"User {json.dumps(user)} cannot {attrs.verb} resource {json.dumps(attrs.combined_resource)} "
                f"in API group {json.dumps(attrs.api_group)} ")
        what += f"in the namespace {json.dumps(attrs.namespace)}" if attrs.namespace else "at the cluster scope"
        qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
        message = f"{qualified} {json.dumps(attrs.name)} is forbidden: {what}" if attrs.name \
            else f"{qualified} is forbidden: {what}"
        details = {k: v for k, v in (("name", attrs.name), ("group", attrs.api_group), ("kind", attrs.resource)) if v}
    if reason:
        message += f": {reason}"
    return ApiError(403, message, "Forbidden", details or None)


# --- the objects every cluster starts with ---------------------------------------------------------------

_BOOTSTRAP_META = {
    "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
    "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
}


def _cluster_role(name: str, rules: list[dict]) -> dict:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRole",
            "metadata": {"name": name, **json.loads(json.dumps(_BOOTSTRAP_META))}, "rules": rules}


def _cluster_role_binding(name: str, role: str, subjects: list[dict], meta: dict | None = None) -> dict:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, **json.loads(json.dumps(meta if meta is not None else _BOOTSTRAP_META))},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role}, "subjects": subjects}


def _group(name: str) -> dict:
    return {"apiGroup": RBAC_GROUP, "kind": "Group", "name": name}


def bootstrap_policy() -> list[dict]:
    """The default ClusterRoles and bindings kube-apiserver creates (plugin/pkg/auth/authorizer/rbac/
    bootstrappolicy), those a client can observe here: discovery and self-review for everyone."""
    get = ["get"]
    return [
        _cluster_role("cluster-admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                                        {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        _cluster_role("system:discovery", [{"nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz",
            "/version", "/version/"], "verbs": get}]),
        _cluster_role("system:basic-user", [
            {"apiGroups": [AUTHORIZATION_GROUP], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
             "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
        _cluster_role("system:public-info-viewer", [{"nonResourceURLs": [
            "/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": get}]),
        _cluster_role_binding("cluster-admin", "cluster-admin", [_group(MASTERS)]),
        _cluster_role_binding("system:discovery", "system:discovery", [_group(AUTHENTICATED)]),
        _cluster_role_binding("system:basic-user", "system:basic-user", [_group(AUTHENTICATED)]),
        _cluster_role_binding("system:public-info-viewer", "system:public-info-viewer",
                              [_group(AUTHENTICATED), _group(UNAUTHENTICATED)]),
    ]


OPERATOR_BINDING = "sandbox-operator-cluster-admin"


def operator_binding(email: str) -> dict:
    """The person at the terminal is cluster-admin (as the cluster's creator binds themself on GKE)."""
    return _cluster_role_binding(OPERATOR_BINDING, "cluster-admin",
                                 [{"apiGroup": RBAC_GROUP, "kind": "User", "name": email}],
                                 meta={"labels": {"app.kubernetes.io/managed-by": "meshjoin-sandbox"}})


# --- deploy/terraform/kubernetes.tf, as the kubernetes provider would create it --------------------------

# Terraform resource type -> Kubernetes kind; the provider's snake_case blocks -> the API's fields.
TERRAFORM_RBAC_TYPES = {
    "kubernetes_cluster_role_v1": "ClusterRole",
    "kubernetes_role_v1": "Role",
    "kubernetes_cluster_role_binding_v1": "ClusterRoleBinding",
    "kubernetes_role_binding_v1": "RoleBinding",
}
_RULE_FIELDS = {"api_groups": "apiGroups", "resources": "resources", "verbs": "verbs",
                "resource_names": "resourceNames", "non_resource_urls": "nonResourceURLs"}


def _one(blocks: Any, what: str) -> dict:
    if isinstance(blocks, list) and len(blocks) == 1 and isinstance(blocks[0], dict):
        return blocks[0]
    raise ValueError(f"expected exactly one {what} block, got {blocks!r}")


def terraform_object(kind: str, resource: dict) -> dict:
    """One evaluated Terraform resource instance (terraform.py's dict) as the Kubernetes object."""
    meta = _one(resource.get("metadata"), "metadata")
    obj: dict[str, Any] = {"apiVersion": f"{RBAC_GROUP}/v1", "kind": kind, "metadata": {
        key: meta[key] for key in ("name", "namespace", "labels", "annotations") if meta.get(key) is not None}}
    if kind in ("ClusterRole", "Role"):
        obj["rules"] = [{api: list(rule[tf]) for tf, api in _RULE_FIELDS.items() if rule.get(tf) is not None}
                        for rule in resource.get("rule") or ()]
    else:
        ref = _one(resource.get("role_ref"), "role_ref")
        obj["roleRef"] = {"apiGroup": ref.get("api_group", RBAC_GROUP), "kind": ref["kind"], "name": ref["name"]}
        obj["subjects"] = []
        for subject in resource.get("subject") or ():
            item = {"kind": subject["kind"], "name": subject["name"]}
            if subject.get("api_group"):
                item["apiGroup"] = subject["api_group"]
            elif subject["kind"] in ("User", "Group"):
                item["apiGroup"] = RBAC_GROUP
            if subject.get("namespace"):
                item["namespace"] = subject["namespace"]
            obj["subjects"].append(item)
    return obj


def terraform_rbac(model) -> list[dict]:
    """Every RBAC object the module creates (for_each/count expanded by terraform.py)."""
    return [terraform_object(kind, resource)
            for rtype, kind in TERRAFORM_RBAC_TYPES.items() for resource in model.resources(rtype)]


def terraform_rbac_objects(variables: dict, project_number: str | None = None, directory=None) -> list[dict]:
    """The RBAC objects `terraform apply` of deploy/terraform (or `directory`) creates with these variables."""
    from .terraform import default_terraform_dir, load_terraform

    return terraform_rbac(load_terraform(directory or default_terraform_dir(), variables, project_number=project_number))


def apply_terraform_rbac(cfg) -> None:
    """`sandbox up`'s `terraform apply` of kubernetes.tf: create each object over the Kubernetes API as
    the operator (replace it if it exists), after the app namespaces exist."""
    import requests

    base = f"https://127.0.0.1:{cfg.ports['kube']}/apis/{RBAC_GROUP}/v1"
    headers = {"Authorization": f"Bearer {cfg.admin_token}"}
    for obj in terraform_rbac_objects(cfg.terraform_vars, cfg.project_number):
        meta, plural = obj["metadata"], obj["kind"].lower() + "s"
        url = f"{base}/namespaces/{meta['namespace']}/{plural}" if meta.get("namespace") else f"{base}/{plural}"
        response = requests.post(url, json=obj, headers=headers, verify=cfg.kube_ca_file, timeout=10)
        if response.status_code == 409:
            response = requests.put(f"{url}/{meta['name']}", json=obj, headers=headers, verify=cfg.kube_ca_file,
                                    timeout=10)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"applying kubernetes.tf's {obj['kind']} {meta['name']}: "
                               f"{response.status_code} {response.text[:300]}")


# --- validation of RBAC objects (the parts a client can trip) ---------------------------------------------


def rbac_causes(kind: str, obj: dict, old: dict | None) -> list[dict]:
    def cause(field: str, reason: str, message: str) -> dict:
        return {"reason": reason, "message": message, "field": field}

    causes = []
    if kind in ("Role", "ClusterRole"):
        rules = obj.get("rules")
        if rules is None:
            obj["rules"] = rules = []
        if not isinstance(rules, list):
            return [cause("rules", "FieldValueTypeInvalid", "Invalid value: must be a list")]
        for index, rule in enumerate(rules):
            path = f"rules[{index}]"
            if not isinstance(rule, dict):
                causes.append(cause(path, "FieldValueTypeInvalid", "Invalid value: must be an object"))
                continue
            for key in ("verbs", "apiGroups", "resources", "resourceNames", "nonResourceURLs"):
                value = rule.get(key)
                if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    causes.append(cause(f"{path}.{key}", "FieldValueTypeInvalid", "Invalid value: must be a list of strings"))
            if not rule.get("verbs"):
                causes.append(cause(f"{path}.verbs", "FieldValueRequired", "Required value: verbs must contain at least one value"))
            if rule.get("nonResourceURLs"):
                if kind == "Role":
                    causes.append(cause(f"{path}.nonResourceURLs", "FieldValueInvalid",
                                        "Invalid value: namespaced rules cannot apply to non-resource URLs"))
                if rule.get("apiGroups") or rule.get("resources"):
                    causes.append(cause(f"{path}.nonResourceURLs", "FieldValueInvalid",
                                        "Invalid value: rules cannot apply to both regular resources and non-resource URLs"))
            elif not rule.get("resources"):
                causes.append(cause(f"{path}.resources", "FieldValueRequired",
                                    "Required value: resource rules must supply at least one resource"))
            elif rule.get("apiGroups") is None:
                causes.append(cause(f"{path}.apiGroups", "FieldValueRequired",
                                    "Required value: resource rules must supply at least one api group"))
        return causes
    ref = obj.get("roleRef")
    if not isinstance(ref, dict) or not ref.get("name"):
        causes.append(cause("roleRef.name", "FieldValueRequired", "Required value"))
    else:
        allowed = ("ClusterRole",) if kind == "ClusterRoleBinding" else ("Role", "ClusterRole")
        if ref.get("kind") not in allowed:
            supported = ", ".join(f'"{k}"' for k in allowed)
            causes.append(cause("roleRef.kind", "FieldValueNotSupported",
                                f"Unsupported value: {json.dumps(ref.get('kind'))}: supported values: {supported}"))
        if ref.get("apiGroup") != RBAC_GROUP:
            causes.append(cause("roleRef.apiGroup", "FieldValueNotSupported",
                                f'Unsupported value: {json.dumps(ref.get("apiGroup"))}: supported values: "{RBAC_GROUP}"'))
        if old is not None and old.get("roleRef") != ref:
            causes.append(cause("roleRef", "FieldValueInvalid", f"Invalid value: {json.dumps(ref)}: cannot change roleRef"))
    subjects = obj.get("subjects") or []
    if not isinstance(subjects, list):
        return causes + [cause("subjects", "FieldValueTypeInvalid", "Invalid value: must be a list")]
    for index, subject in enumerate(subjects):
        path = f"subjects[{index}]"
        if not isinstance(subject, dict):
            causes.append(cause(path, "FieldValueTypeInvalid", "Invalid value: must be an object"))
            continue
        if not subject.get("name"):
            causes.append(cause(f"{path}.name", "FieldValueRequired", "Required value"))
        if subject.get("kind") not in ("User", "Group", "ServiceAccount"):
            causes.append(cause(f"{path}.kind", "FieldValueNotSupported",
                                f'Unsupported value: {json.dumps(subject.get("kind"))}: supported values: '
                                '"Group", "ServiceAccount", "User"'))
        elif subject["kind"] == "ServiceAccount" and kind == "ClusterRoleBinding" and not subject.get("namespace"):
            causes.append(cause(f"{path}.namespace", "FieldValueRequired", "Required value"))
    return causes
