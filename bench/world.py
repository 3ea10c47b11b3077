"""One sandbox for one benchmark section: started with the real launcher, reached like a person would.

VMs boot without running their startup script: each VM's agent is played by the bench over the same
wire (bench/agent.py), and a real agent booting beside it would hand in a second key.

The bench talks to the emulators as an operator (admin token, plain HTTP) to create VMs and read
results, and to the control plane for request counts (`/stats`) and bulk seeding (`/seed`). The
product is driven either in-process (a `Runtime` on the sandbox's settings) or as real processes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Re-exported: the benchmarks import these from here.
from meshjoin_sandbox.client import SandboxClient, entry_instance, metadata_items, status_of, wait_for  # noqa: F401

SA_DOMAIN = "meshjoin-sandbox.iam.gserviceaccount.com"
# The bench fleet runs as one bound account (replicas of one workload): thousands of per-VM bindings would not
# fit in an environment variable, and the bench measures throughput, not isolation.
BENCH_ACCOUNT = f"bench@{SA_DOMAIN}"
BENCH_BINDINGS = [{"gsa": BENCH_ACCOUNT, "namespace": "default", "serviceAccount": "default", "apps": ["bench"]}]


class World(SandboxClient):
    """The shared sandbox client (start/stop, control plane, request counts, status), plus the bench's own:
    the product wired to the sandbox in this process, and Compute as an operator over plain HTTP."""

    @classmethod
    def open(cls, label: str = "bench", function_env: dict[str, str] | None = None,
             compute_subnet: str | None = None) -> "World":
        """A fresh sandbox in a temporary directory (removed by `close()`), its VMs booting without their agent."""
        state_dir = Path(tempfile.mkdtemp(prefix=f"meshjoin-{label}-"))
        function_env = {"MESHJOIN_IDENTITY_BINDINGS": json.dumps(BENCH_BINDINGS), **(function_env or {})}
        return cls.start(state_dir, function_env, in_process=True, compute_subnet=compute_subnet,
                         run_startup_scripts=False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()

    # --- settings and clients for the product ------------------------------------------------------

    def settings(self, **overrides):
        from meshjoin.settings import Settings

        return Settings.from_env({**self.env_vars, **overrides})

    def runtime(self, **overrides):
        """The product's own wiring, authenticated with the functions' token (as the metadata server hands out)."""
        from google.oauth2.credentials import Credentials

        from meshjoin.runtime import Runtime

        return Runtime(self.settings(**overrides), Credentials(self.cfg.sa_token))

    # --- compute as an operator --------------------------------------------------------------------

    def compute_url(self, zone: str | None = None) -> str:
        return f"{self.cfg.url('compute')}/compute/v1/projects/{self.project}/zones/{zone or self.zone}"

    def create_vm(self, name: str, labels: dict[str, str], *, service_account: str | None = None,
                  metadata: dict[str, str] | None = None, event: bool = True, session=None) -> dict:
        body = {"name": name, "labels": labels,
                "serviceAccounts": [{"email": service_account or BENCH_ACCOUNT}],
                "metadata": {"items": [{"key": k, "value": v} for k, v in (metadata or {}).items()]}}
        headers = {} if event else {"X-Sandbox-No-Event": "1"}
        response = (session or self.http).post(self.compute_url() + "/instances", json=body, headers=headers,
                                                timeout=60)
        response.raise_for_status()
        return response.json()

    def create_vms(self, names: list[str], labels: dict[str, str], *, event: bool = True,
                   workers: int = 8) -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda n: self.create_vm(n, labels, event=event), names))

    def delete_vm(self, name: str, event: bool = True) -> None:
        headers = {} if event else {"X-Sandbox-No-Event": "1"}
        response = self.http.delete(self.compute_url() + f"/instances/{name}", headers=headers, timeout=60)
        response.raise_for_status()

    def vm(self, name: str, zone: str | None = None) -> dict | None:
        """The instance over REST (the client's default asks the CLI: a process per read); None if there is none.
        So `status(name)` and `metadata(name)` cost one request here."""
        response = self.http.get(self.compute_url(zone) + f"/instances/{name}", timeout=60)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def get_vm(self, name: str) -> dict:
        response = self.http.get(self.compute_url() + f"/instances/{name}", timeout=60)
        response.raise_for_status()
        return response.json()

    def list_vms(self, label_filter: str = "") -> list[dict]:
        out, token = [], None
        url = f"{self.cfg.url('compute')}/compute/v1/projects/{self.project}/aggregated/instances"
        while True:
            params = {"maxResults": 500, **({"filter": label_filter} if label_filter else {}),
                      **({"pageToken": token} if token else {})}
            response = self.http.get(url, params=params, timeout=120)
            response.raise_for_status()
            body = response.json()
            for scoped in body.get("items", {}).values():
                out += scoped.get("instances", [])
            token = body.get("nextPageToken")
            if not token:
                return out

    # --- secret manager as an operator -----------------------------------------------------------------

    def secret_versions(self, secret_id: str) -> list[dict]:
        url = f"{self.cfg.url('secretmanager')}/v1/projects/{self.project}/secrets/{secret_id}/versions"
        response = self.http.get(url, timeout=60)
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return response.json().get("versions", [])

