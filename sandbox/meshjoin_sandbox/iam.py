"""IAM as Google evaluates it, for the sandbox's emulators, derived from deploy/terraform.

Allow policies only: a principal may call a method on a resource if some binding on that resource
or an ancestor (the project, a secret for its versions, the service account for actAs) names the
principal, its role holds the method's permission, and the binding's condition (CEL, evaluated
with cel-python) is true for the resource. Where bindings come from:

- deploy/terraform, evaluated by terraform.py with the sandbox's variables:
  google_project_iam_custom_role, google_project_iam_member (with `condition`),
  google_secret_manager_secret_iam_member and google_service_account_iam_member;
- Secret Manager's setIamPolicy at run time (the emulator keeps each secret's policy);
- the operator (`World.operator_email`) is roles/owner of the project.

Secret Manager evaluates conditions against `projects/NUMBER/secrets/ID[/versions/V]`, whatever
form the request used, so the sandbox does too. No deny policies, no organisation policies, no
propagation delay (README, "Sandbox limits").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .terraform import TerraformError, default_terraform_dir, load_terraform
from .web import ApiError
from .world import CLOUD_PLATFORM, Principal

OWNER = "roles/owner"

# Predefined roles the Terraform module or the product grant, with their real permission lists
# (https://cloud.google.com/iam/docs/roles-permissions/container, .../secretmanager, .../iam).
PREDEFINED_ROLES: dict[str, frozenset[str]] = {
    "roles/container.clusterViewer": frozenset({
        "container.clusters.get", "container.clusters.list",
        "resourcemanager.projects.get", "resourcemanager.projects.list",
    }),
    "roles/secretmanager.secretAccessor": frozenset({"secretmanager.versions.access"}),
    "roles/secretmanager.viewer": frozenset({
        "secretmanager.locations.get", "secretmanager.locations.list", "secretmanager.secrets.get",
        "secretmanager.secrets.getIamPolicy", "secretmanager.secrets.list", "secretmanager.versions.get",
        "secretmanager.versions.list", "resourcemanager.projects.get", "resourcemanager.projects.list",
    }),
    "roles/iam.serviceAccountUser": frozenset({
        "iam.serviceAccounts.actAs", "iam.serviceAccounts.get", "iam.serviceAccounts.list",
        "resourcemanager.projects.get", "resourcemanager.projects.list",
    }),
    "roles/iam.serviceAccountTokenCreator": frozenset({
        "iam.serviceAccounts.get", "iam.serviceAccounts.getAccessToken", "iam.serviceAccounts.getOpenIdToken",
        "iam.serviceAccounts.implicitDelegation", "iam.serviceAccounts.list", "iam.serviceAccounts.signBlob",
        "iam.serviceAccounts.signJwt", "resourcemanager.projects.get",
    }),
}

# The OAuth scopes each API accepts (besides cloud-platform): the API's own scope for any method,
# its read-only scopes for reads (https://developers.google.com/identity/protocols/oauth2/scopes).
_READ_ONLY_PLATFORM = "https://www.googleapis.com/auth/cloud-platform.read-only"
API_SCOPES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "compute": (frozenset({"https://www.googleapis.com/auth/compute"}),
                frozenset({"https://www.googleapis.com/auth/compute.readonly", _READ_ONLY_PLATFORM})),
    "secretmanager": (frozenset(), frozenset()),
    "container": (frozenset(), frozenset({_READ_ONLY_PLATFORM})),
}
SERVICE_NAMES = {"compute": "compute.googleapis.com", "secretmanager": "secretmanager.googleapis.com",
                 "container": "container.googleapis.com"}


class IamDenied(ApiError):
    """A 403 in the dialect of the API that refused (message, Compute's `errors[].reason`, details)."""

    def __init__(self, message: str, error_reason: str = "forbidden", details: list | None = None):
        super().__init__(403, message, "PERMISSION_DENIED", details)
        self.error_reason = error_reason


def scope_error(service: str, method: str) -> IamDenied:
    """Google's answer to a token whose scopes do not cover the API (ACCESS_TOKEN_SCOPE_INSUFFICIENT)."""
    return IamDenied("Request had insufficient authentication scopes.", "insufficientPermissions", [{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
        "domain": "googleapis.com",
        "metadata": {"service": SERVICE_NAMES.get(service, service), "method": method},
    }])


def check_scopes(principal: Principal, service: str, method: str, read_only: bool) -> None:
    """403 unless the token carries cloud-platform or a scope of this API (read-only ones for reads)."""
    own, reads = API_SCOPES[service]
    accepted = {CLOUD_PLATFORM} | own | (reads if read_only else set())
    if not accepted & principal.scopes:
        raise scope_error(service, method)


def denial(permission: str, resource: str) -> IamDenied:
    """The refusing API's own 403 for a missing permission.

    Secret Manager names the resource as the request did (project id or number, `latest` kept), e.g.
    "Permission 'secretmanager.versions.access' denied for resource
    'projects/my-proj/secrets/x/versions/latest' (or it may not exist)." as reported in
    googleapis/python-secret-manager#389 and GoogleCloudPlatform/java-docs-samples#6571.
    """
    if permission.startswith("compute."):
        return IamDenied(f"Required '{permission}' permission for '{resource}'")
    if permission.startswith("secretmanager."):
        return IamDenied(f"Permission '{permission}' denied for resource '{resource}' (or it may not exist).",
                         "PERMISSION_DENIED")
    if permission.startswith("container."):
        return IamDenied(f'Required "{permission}" permission(s) for "{resource}".', "PERMISSION_DENIED")
    if permission == "iam.serviceAccounts.actAs":
        email = resource.rsplit("/", 1)[-1]
        return IamDenied(f"The user does not have access to service account '{email}'. Ask a project owner "
                         "to grant you the iam.serviceAccountUser role on the service account")
    return IamDenied(f"Permission '{permission}' denied on '{resource}'.", "PERMISSION_DENIED")


@dataclass(frozen=True)
class Binding:
    """One member holding one role on one resource, maybe under a condition."""

    resource: str  # projects/P, projects/P/secrets/S or projects/P/serviceAccounts/EMAIL (P = the id)
    role: str
    member: str
    condition: str | None = None
    source: str = ""  # the Terraform address, "setIamPolicy" or "operator"


class _Conditions:
    """CEL conditions compiled once (cel-python), evaluated with `resource.name/type/service`."""

    def __init__(self):
        self._programs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def holds(self, expression: str, resource_name: str, resource_type: str, service: str) -> bool:
        import celpy

        with self._lock:
            program = self._programs.get(expression)
            if program is None:
                env = celpy.Environment()
                try:
                    program = env.program(env.compile(expression))
                except Exception as exc:  # cel-python raises its own CELParseError etc.
                    raise TerraformError(f"cannot compile IAM condition `{expression}`: {exc}") from exc
                self._programs[expression] = program
        activation = {"resource": celpy.json_to_cel(
            {"name": resource_name, "type": resource_type, "service": service})}
        result = program.evaluate(activation)
        if not isinstance(result, (bool, celpy.celtypes.BoolType)):  # an error value, a string...
            raise ApiError(500, f"IAM condition `{expression}` did not evaluate to a bool: {result!r}")
        return bool(result)


class IamPolicy:
    """Roles and bindings of the sandbox's project; `permitted` / `check` answer as Google would."""

    def __init__(self, project: str, project_number: str, roles: dict[str, frozenset[str]],
                 bindings: Iterable[Binding],
                 runtime_bindings: Callable[[str], list[Binding]] | None = None,
                 numbers: dict[str, str] | None = None):
        self.project = project
        self.project_number = project_number
        # Every sandbox project's number -> id, so a resource named by number finds its bindings.
        self._ids = {number: pid for pid, number in (numbers or {project: project_number}).items()}
        self.roles = {**PREDEFINED_ROLES, **roles}
        self.bindings = list(bindings)
        # Bindings stored by the emulators at run time (a secret's setIamPolicy), by resource.
        self.runtime_bindings = runtime_bindings or (lambda resource: [])
        self._conditions = _Conditions()

    # ---- built from Terraform ------------------------------------------------------------------

    @classmethod
    def from_terraform(cls, world, directory: Path | None = None, variables: dict | None = None) -> "IamPolicy":
        directory = directory or default_terraform_dir()
        variables = variables if variables is not None else (world.terraform_vars or world.default_terraform_vars())
        model = load_terraform(directory, variables, project_number=world.project_number)
        project = world.project
        projects = getattr(world, "projects", None) or {project: world.project_number}
        roles: dict[str, frozenset[str]] = {}
        for role in model.resources("google_project_iam_custom_role"):
            role_project = role.get("project") or model.provider_project()
            roles[f"projects/{role_project}/roles/{role['role_id']}"] = frozenset(role["permissions"])
        # The operator owns every project of the sandbox (its gcloud works in each).
        bindings = [Binding(f"projects/{p}", OWNER, f"user:{world.operator_email}", source="operator") for p in projects]
        for grant in model.resources("google_project_iam_member"):
            bindings.append(Binding(f"projects/{grant['project']}", grant["role"], grant["member"],
                                    _condition(grant), grant["_address"]))
        for grant in model.resources("google_secret_manager_secret_iam_member"):
            secret_project = grant.get("project") or model.provider_project()
            secret = grant["secret_id"].rsplit("/", 1)[-1]  # secret_id may be the id or the full name
            bindings.append(Binding(f"projects/{secret_project}/secrets/{secret}", grant["role"], grant["member"],
                                    _condition(grant), grant["_address"]))
        for grant in model.resources("google_service_account_iam_member"):
            account = grant["service_account_id"]
            if not account.startswith("projects/"):
                raise TerraformError(f"{grant['_address']}: service_account_id {account!r} is not a full name")
            if account.startswith("projects/-/serviceAccounts/"):  # IAM infers the project from the email
                email = account.rsplit("/", 1)[-1]
                owner = world.account_project(email) if hasattr(world, "account_project") else project
                account = f"projects/{owner}/serviceAccounts/{email}"
            bindings.append(Binding(account, grant["role"], grant["member"], _condition(grant), grant["_address"]))
        functions = f"serviceAccount:{world.service_account}"
        if not any(b.member == functions for b in bindings):
            raise TerraformError(f"deploy/terraform grants nothing to {functions}: the sandbox's functions account "
                                 "must be the module's google_service_account.functions")
        unknown = {b.role for b in bindings} - set(roles) - set(PREDEFINED_ROLES) - {OWNER}
        if unknown:
            raise TerraformError(f"roles granted by Terraform that the sandbox does not know: {sorted(unknown)} "
                                 "(add their permissions to iam.PREDEFINED_ROLES)")
        policy = cls(project, world.project_number, roles, bindings, numbers=projects)
        policy.runtime_bindings = lambda resource: _runtime_bindings(world, resource)
        return policy

    # ---- decisions -----------------------------------------------------------------------------

    def permitted(self, principal: Principal, permission: str, resource: str) -> bool:
        resource = self._canonical(resource)
        for binding in self._applicable(resource):
            if not _member_matches(binding.member, principal):
                continue
            if binding.role == OWNER:
                allowed = True
            else:
                allowed = permission in self.roles.get(binding.role, frozenset())
            if allowed and (binding.condition is None or self._condition_holds(binding.condition, resource)):
                return True
        return False

    def check(self, principal: Principal, permission: str, resource: str, shown_as: str | None = None) -> None:
        """Raise the refusing API's 403 unless permitted; the message names `shown_as` (default `resource`)."""
        if not self.permitted(principal, permission, resource):
            raise denial(permission, shown_as or resource)

    def grants_of(self, email: str) -> list[Binding]:
        """Every static binding naming `email` (for people reading what the sandbox enforces)."""
        return [b for b in self.bindings if b.member.split(":", 1)[-1] == email]

    # ---- internals -----------------------------------------------------------------------------

    def _canonical(self, resource: str) -> str:
        """projects/NUMBER/... → projects/ID/... (bindings are keyed by project id)."""
        parts = resource.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == "projects" and parts[1] in self._ids:
            parts[1] = self._ids[parts[1]]
        return "/".join(parts)

    def _applicable(self, resource: str) -> list[Binding]:
        """Bindings on the resource and its ancestors: project → secret → version, project → account."""
        parts = resource.split("/")
        scopes = {"/".join(parts[:2])}
        if len(parts) >= 4 and parts[2] in ("secrets", "serviceAccounts"):
            scopes.add("/".join(parts[:4]))
        found = [b for b in self.bindings if b.resource in scopes]
        for scope in sorted(scopes):
            if scope.count("/") == 3:
                found.extend(self.runtime_bindings(scope))
        return found

    def _condition_holds(self, expression: str, resource: str) -> bool:
        parts = resource.split("/")
        if len(parts) >= 4 and parts[2] == "secrets":
            # Secret Manager names resources by project number in IAM checks.
            name = "/".join(["projects", self.project_number] + parts[2:])
            kind = "secretmanager.googleapis.com/SecretVersion" if "versions" in parts else \
                "secretmanager.googleapis.com/Secret"
            return self._conditions.holds(expression, name, kind, "secretmanager.googleapis.com")
        service = {"zones": "compute.googleapis.com", "locations": "container.googleapis.com",
                   "serviceAccounts": "iam.googleapis.com"}.get(parts[2] if len(parts) > 2 else "", "")
        return self._conditions.holds(expression, resource, "", service)


def _condition(grant: dict) -> str | None:
    blocks = grant.get("condition") or []
    if len(blocks) > 1:
        raise TerraformError(f"{grant['_address']}: more than one condition block")
    return blocks[0]["expression"] if blocks else None


def _member_matches(member: str, principal: Principal) -> bool:
    if member == "allAuthenticatedUsers" or member == "allUsers":
        return True
    return member in (f"serviceAccount:{principal.email}", f"user:{principal.email}")


def _runtime_bindings(world, resource: str) -> list[Binding]:
    """A secret's own IAM policy, as setIamPolicy stored it in the Secret Manager emulator."""
    parts = resource.split("/")
    if len(parts) != 4 or parts[2] != "secrets":
        return []
    emulator = world.emulators.get("secretmanager")
    policy = emulator.iam_policy(parts[3]) if emulator is not None else None
    if not policy:
        return []
    return [Binding(resource, b["role"], member, (b.get("condition") or {}).get("expression"), "setIamPolicy")
            for b in policy.get("bindings", []) for member in b.get("members", [])]
