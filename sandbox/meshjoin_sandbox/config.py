"""The sandbox's own configuration, written by `sandbox up` to STATE_DIR/sandbox.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PORT_NAMES = (
    "pubsub", "compute", "secretmanager", "container", "metadata", "kube", "control",
    "events_fn", "maintenance_fn",
)


def sandbox_terraform_vars(project: str, region: str, cluster_path: str, service_account: str) -> dict:
    """The variables a deployment of the sandbox's project would set (its terraform.tfvars)."""
    return {
        "project_id": project,
        "region": region,
        "cluster": cluster_path,
        "name": service_account.split("@", 1)[0].removesuffix("-functions"),
        # Who may join: what the functions run with (MESHJOIN_IDENTITY_BINDINGS, launcher.product_env)
        # and what actAs and the writer RBAC follow, from this one variable as in a deployment.
        # The sandbox's default binds the demo's account: orders@ may be apps/orders, app orders.
        "identity_bindings": [{"gsa": f"orders@{project}.iam.gserviceaccount.com", "namespace": "apps",
                               "serviceAccount": "orders", "apps": ["orders"]}],
        # The VMs reach istiod through the sandbox's east-west gateway address (MESHJOIN_ISTIOD_*; agent.tf
        # publishes the mesh config and hosts line from them, launcher.product_env hands them to the functions).
        "istiod_address": "istiod.istio-system.svc:15012",
        "istiod_ip": "10.128.15.250",
    }


# The host project and a second VM project (own number); `up(projects=...)` may hold more.
DEFAULT_PROJECTS = {"meshjoin-sandbox": "123456789012", "meshjoin-sandbox-2": "234567890123"}


@dataclass
class SandboxConfig:
    state_dir: str
    ports: dict[str, int]
    sa_token: str
    admin_token: str
    ca_dir: str
    kube_ca_file: str
    kube_cert_file: str
    kube_key_file: str
    crd_path: str
    project: str = "meshjoin-sandbox"
    project_number: str = "123456789012"
    region: str = "us-central1"
    zone: str = "us-central1-a"
    cluster_name: str = "mesh"
    service_account: str = "meshjoin-functions@meshjoin-sandbox.iam.gserviceaccount.com"
    events_topic: str = "meshjoin-events"
    schedule_topic: str = "meshjoin-schedule"
    dead_letter_topic: str = "meshjoin-dead-letter"
    ca_secrets: tuple[str, ...] = ("istio-ca-cert", "istio-ca-key", "istio-cert-chain", "istio-root-cert")
    app_namespaces: tuple[str, ...] = ("apps", "payments")
    # The Compute emulator's subnetwork: a /20 holds 4092 VMs, benchmarks seed 10,000.
    compute_subnet: str = "10.128.0.0/20"
    # Extra settings for the functions (e.g. a short cert TTL in a test), merged into their env.
    function_env: dict[str, str] = field(default_factory=dict)
    # VM lifecycle (lifecycle.py): seconds from insert/start to RUNNING (real GCE: ~10-60 s), from stop
    # to TERMINATED (real: up to ~90 s), and until a label/metadata operation is DONE (real: ~1-5 s).
    boot_seconds: float = 1.0
    stop_seconds: float = 0.5
    operation_seconds: float = 0.5
    # Scales quota windows and zoneOperations.wait's 2-minute hold (env MESHJOIN_SANDBOX_TIME_FACTOR).
    time_factor: float = 1.0
    # Extra environment for every VM's startup script (e.g. MESHJOIN_SIDECAR_URL of a local mirror).
    guest_env: dict[str, str] = field(default_factory=dict)
    # False: a VM's boot runs no startup script (its boot is still counted). For benchmark worlds, whose
    # VMs' agents are played over the same wire by the benchmark (bench/agent.py): a real agent booting
    # beside it would hand in a second key, and a thousand bash agents would compete with what is measured.
    run_startup_scripts: bool = True
    # The values deploy/terraform is evaluated with for the sandbox's IAM and RBAC
    # (project_id, region, cluster, name, identity_bindings, ...).
    terraform_vars: dict = field(default_factory=dict)
    # The person at the terminal (gcloud, kubectl, the CLI): project owner and cluster-admin.
    operator_email: str = "operator@example.com"
    # Every project the sandbox holds, id -> number (issue 16): the host (`project`) and further VM
    # projects, each with its own Compute emulator (VMs, quotas, common metadata, default compute
    # account, subnetwork), guests and audit log. Which of them meshjoin manages is Terraform's
    # `vm_projects` (terraform_vars), as in a deployment; by default only the host.
    projects: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROJECTS))

    def __post_init__(self) -> None:
        if not self.terraform_vars:
            self.terraform_vars = self.default_terraform_vars()
        self.projects = {self.project: self.project_number,
                         **{p: n for p, n in self.projects.items() if p != self.project}}

    @property
    def vm_projects(self) -> list[str]:
        """The projects meshjoin manages here: the host, then Terraform's `vm_projects`, each once."""
        return list(dict.fromkeys([self.project, *self.terraform_vars.get("vm_projects", [])]))

    def vms_dir(self, project: str | None = None) -> Path:
        """Where a project's VMs keep their fake roots: DIR/vms (host), DIR/projects/P/vms (others)."""
        state = Path(self.state_dir)
        return state / "vms" if project in (None, self.project) else state / "projects" / project / "vms"

    def subnet(self, project: str | None = None) -> str:
        """A project's subnetwork: the host's `compute_subnet`, 10.(200+i).0.0/20 for the i-th other one
        (separate VPCs whose addresses never collide, as one mesh needs)."""
        if project in (None, self.project):
            return self.compute_subnet
        return f"10.{200 + list(self.projects).index(project)}.0.0/20"

    def default_terraform_vars(self) -> dict:
        return sandbox_terraform_vars(self.project, self.region, self.cluster_path, self.service_account)

    @property
    def cluster_path(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/clusters/{self.cluster_name}"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def save(self) -> None:
        path = Path(self.state_dir) / "sandbox.json"
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path | str) -> "SandboxConfig":
        path = Path(state_dir) / "sandbox.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"no sandbox in {state_dir}: run `meshjoin sandbox up` first") from None
        data["ca_secrets"] = tuple(data["ca_secrets"])
        data["app_namespaces"] = tuple(data["app_namespaces"])
        return cls(**data)
