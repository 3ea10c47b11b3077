"""`make demo`: the join story on a fresh sandbox, told step by step, then torn down.

Everything goes through the same paths a person would use: `meshjoin sandbox` verbs (real Compute
client → emulator → audit sink → real Pub/Sub emulator → the event function under
functions-framework), then reads back with kubectl and the Secret Manager client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import client

console = Console()
MESHJOIN = client.MESHJOIN


def sh(env: dict, *argv: str) -> str:
    result = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def status_of(env: dict, state_dir: str, name: str) -> dict:
    body = json.loads(sh(env, MESHJOIN, "sandbox", "vm", name, "--json", "--state-dir", state_dir))
    return client.status_of(body), body


def wait_state(env, state_dir, name, states, timeout=30.0) -> tuple[dict, dict, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        status, body = status_of(env, state_dir, name)
        if status.get("state") in states:
            return status, body, time.monotonic() - start
        time.sleep(0.25)
    raise SystemExit(f"{name} did not reach {states} within {timeout}s")

def _key_matches_leaf(certs: Path) -> bool:
    """Whether the VM's key.pem holds the private half of the leaf in its cert-chain.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key((certs / "key.pem").read_bytes(), password=None)
        leaf = x509.load_pem_x509_certificates((certs / "cert-chain.pem").read_bytes())[0]
    except (OSError, ValueError):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)



def main() -> int:
    state_dir = tempfile.mkdtemp(prefix="meshjoin-demo-")
    env = dict(os.environ)
    console.rule("[bold]meshjoin demo: a labelled VM joins the mesh")
    console.print(f"Starting the sandbox in {state_dir} (Pub/Sub emulator, functions, Compute/Secret Manager/"
                  "GKE/Kubernetes/metadata emulators)...")
    sh(env, MESHJOIN, "sandbox", "up", "--state-dir", state_dir)
    env.update(line.removeprefix("export ").split("=", 1) for line in
               Path(state_dir, "env").read_text().splitlines() if line.startswith("export "))
    env = {k: v.strip("'") for k, v in env.items()}
    try:
        console.print("\n[bold]1.[/] Create [cyan]orders-1[/] with labels mesh=join, mesh-namespace=apps, "
                      "mesh-service-account=orders, mesh-app=orders and metadata mesh-ports=http:8080,grpc:9090")
        created = time.monotonic()
        sh(env, MESHJOIN, "sandbox", "create-vm", "orders-1", "--label", "mesh=join", "--label",
           "mesh-namespace=apps", "--label", "mesh-service-account=orders", "--label", "mesh-app=orders",
           "--metadata", "mesh-ports=http:8080,grpc:9090",
           "--service-account", "orders@meshjoin-sandbox.iam.gserviceaccount.com", "--state-dir", state_dir)
        status, body, _ = wait_state(env, state_dir, "orders-1", {"waiting", "joined", "denied", "error"})
        elapsed = time.monotonic() - created
        if status["state"] == "waiting":
            # meshjoin did its part; the VM booted before meshjoin wrote its startup-script (as on GCE), so
            # its agent has not run. Do what the status says, as the VM's owner would.
            console.print(f"  state=[bold cyan]waiting[/] after {elapsed:.1f}s: {status['reason']}")
            console.print("  [bold]meshjoin sandbox run-startup orders-1[/] (= sudo google_metadata_script_runner "
                          "startup on the VM): the real agent runs in the VM's own root")
            sh(env, MESHJOIN, "sandbox", "run-startup", "orders-1", "--state-dir", state_dir)
            status, body, _ = wait_state(env, state_dir, "orders-1", {"joined", "denied", "error"}, timeout=60.0)
        joined_after = time.monotonic() - created
        done = f"joined (its agent confirmed) {joined_after:.1f}s" if status["state"] == "joined" else \
            f"not joined ({status['state']}) after {joined_after:.1f}s"
        table = Table(title=f"orders-1 {done} after `create-vm` started; meshjoin's part took {elapsed:.1f}s "
                            "(audit event → Pub/Sub → function)")
        table.add_column("fact")
        table.add_column("value")
        table.add_row("state", status["state"])
        table.add_row("identity", status.get("identity", ""))
        table.add_row("address", body["networkInterfaces"][0]["networkIP"])
        table.add_row("WorkloadEntry", status.get("workloadEntry", ""))
        table.add_row("certificate serial", status.get("certSerial", ""))
        table.add_row("certificate not after", status.get("certNotAfter", ""))
        table.add_row("certified key (made on the VM)", status.get("keyId", ""))
        console.print(table)
        root = Path(sh(env, MESHJOIN, "sandbox", "vm-root", "orders-1", "--state-dir", state_dir).strip())
        certs = sorted(p.name for p in (root / "etc" / "certs").glob("*.pem")) if (root / "etc" / "certs").is_dir() else []
        console.print(f"In the VM's own root ({root}): etc/certs holds {', '.join(certs) or 'nothing'}; "
                      f"key.pem is the key of the certificate meshjoin signed: "
                      f"[bold]{'yes' if _key_matches_leaf(root / 'etc' / 'certs') else 'NO'}[/]")
        if status["state"] != "joined":
            raise SystemExit(f"orders-1 did not join: {status.get('state')}: {status.get('reason')}")
        console.print("\n[bold]kubectl get workloadentries -A[/] (real kubectl, KUBECONFIG from the env file):")
        console.print(sh(env, "kubectl", "get", "workloadentries", "-A", "-o", "wide") or "  (none yet)\n")
        if status["state"] == "joined":
            console.print("[bold]kubectl get service orders -n apps[/]:")
            console.print(sh(env, "kubectl", "get", "service", "orders", "-n", "apps"))
        metadata = {i["key"]: i["value"] for i in body["metadata"]["items"]}
        console.print("[bold]cluster.env[/] written into instance metadata (meshjoin-cluster-env), first lines:")
        console.print("".join(metadata["meshjoin-cluster-env"].splitlines(keepends=True)[:6]))
        leaks = [k for k, v in metadata.items() if "PRIVATE KEY" in v]
        console.print(f"Private key in any metadata value: [bold]{'YES: ' + str(leaks) if leaks else 'no'}[/]")

        console.print("\n[bold]2.[/] Create [cyan]sneaky-1[/], running as the same bound account but asking for "
                      "namespace istio-system (labels only choose among the account's bindings)")
        sh(env, MESHJOIN, "sandbox", "create-vm", "sneaky-1", "--label", "mesh=join", "--label",
           "mesh-namespace=istio-system", "--service-account", "orders@meshjoin-sandbox.iam.gserviceaccount.com",
           "--state-dir", state_dir)
        status, _, _ = wait_state(env, state_dir, "sneaky-1", {"waiting", "joined", "denied", "error"})
        console.print(f"  state=[bold red]{status['state']}[/]: {status['reason']}")

        console.print("\n[bold]3.[/] Remove the label from orders-1 (setLabels → audit event → leave)")
        sh(env, MESHJOIN, "sandbox", "set-labels", "orders-1", "--remove", "mesh", "--state-dir", state_dir)
        status, _, _ = wait_state(env, state_dir, "orders-1", {"left"})
        console.print(f"  state={status['state']}: {status['reason']}")
        console.print(sh(env, "kubectl", "get", "workloadentries", "-A") or "  (no WorkloadEntries left)\n")
        log = Path(state_dir, "logs", "events_fn.log").read_text().splitlines()
        outcomes = [json.loads(line) for line in log if line.startswith("{")]
        console.print("[bold]The event function's log (one JSON line per event):[/]")
        for entry in outcomes[-8:]:
            console.print(f"  {entry['severity']:<8} {entry.get('outcome', ''):<12} {entry['message'][:100]}")
    finally:
        sh(env, MESHJOIN, "sandbox", "down", "--state-dir", state_dir)
        console.rule("sandbox down; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())

