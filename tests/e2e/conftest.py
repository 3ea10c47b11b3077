"""One sandbox for the end-to-end tests: started with the real `meshjoin sandbox up`, used through
the real CLIs and client libraries, stopped (and checked to be gone) at the end of the session."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshjoin_sandbox.launcher import json_lines, read_env_file

REPO = Path(__file__).resolve().parents[2]
MESHJOIN = str(Path(sys.executable).with_name("meshjoin"))


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` returns something truthy; return it, or fail saying what we waited for."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Sandbox:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env_vars = read_env_file(state_dir / "env")
        self.config = json.loads((state_dir / "sandbox.json").read_text())
        self.project = self.config["project"]
        self.zone = self.config["zone"]

    @property
    def env(self) -> dict[str, str]:
        """The process environment a person gets after `source DIR/env`."""
        return {**os.environ, **self.env_vars}

    def meshjoin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([MESHJOIN, *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"meshjoin {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {result.stdout}{result.stderr}")
        return result

    # --- observations through the real clients ---------------------------------------------------

    def vm(self, name: str, zone: str | None = None) -> dict | None:
        result = self.meshjoin("sandbox", "vm", name, "--json", *(["--zone", zone] if zone else []), check=False)
        if result.returncode != 0:
            if "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def metadata(self, name: str, zone: str | None = None) -> dict[str, str]:
        vm = self.vm(name, zone) or {}
        return {i["key"]: i.get("value", "") for i in vm.get("metadata", {}).get("items", [])}

    def status(self, name: str, zone: str | None = None) -> dict:
        raw = self.metadata(name, zone).get("meshjoin-status")
        return json.loads(raw) if raw else {}

    def kubectl_json(self, *args: str) -> dict | None:
        result = self.run("kubectl", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def entries(self) -> list[dict]:
        return self.kubectl_json("get", "workloadentries", "-A")["items"]

    def entries_for(self, name: str) -> list[dict]:
        return [e for e in self.entries() if e["metadata"]["annotations"].get("meshjoin.dev/instance") == name]

    def secret_payload(self, version_name: str) -> dict:
        result = self.meshjoin("sandbox", "access-secret", version_name)
        return json.loads(result.stdout)

    def function_log(self, name: str = "events_fn") -> list[dict]:
        return json_lines((self.state_dir / "logs" / f"{name}.log").read_text(errors="replace"))

    def raw_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.state_dir / "logs").glob("*.log"))

    def logged(self, instance: str, outcome: str) -> list[dict]:
        return [e for e in self.function_log() if e.get("instance") == instance and e.get("outcome") == outcome]

    def publish(self, payload: dict | str) -> None:
        message = payload if isinstance(payload, str) else json.dumps(payload)
        self.run("gcloud", "pubsub", "topics", "publish", self.env_vars["MESHJOIN_EVENTS_TOPIC"],
                 "--message", message)

    def ca_file(self, name: str) -> Path:
        return Path(self.config["ca_dir"]) / name

    # --- the VM's side -----------------------------------------------------------------------------

    def confirm(self, name: str, zone: str | None = None, *, sidecar: str = "running") -> None:
        """What the VM's agent does after laying down its certificate (the agent tests run the real
        one): report through guest attributes on the VM's OWN metadata server, then nudge meshjoin.
        Needs a sandbox whose metadata server takes guest-attribute PUTs and whose Compute answers
        getGuestAttributes (the real APIs' shapes)."""
        import urllib.request

        zone = zone or self.zone
        serial = self.status(name, zone).get("certSerial")
        assert serial, f"{name} has no delivered certificate to confirm: {self.status(name, zone)}"
        args = ["sandbox", "vm-metadata", name] + (["--zone", zone] if zone != self.zone else [])
        host = self.meshjoin(*args).stdout.strip()
        report = {"agent-version": "e2e", "cert-serial": serial.upper(), "sidecar": sidecar,
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for key, value in report.items():
            time.sleep(0.4)  # as the agent paces itself: GCE allows bursts of 3 guest-attribute writes a second
            request = urllib.request.Request(
                f"http://{host}/computeMetadata/v1/instance/guest-attributes/meshjoin/{key}", data=value.encode(),
                method="PUT", headers={"Metadata-Flavor": "Google"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200, (key, answer.status)
        self.publish({"project": self.project, "zone": zone, "instance": name})

    def join_confirmed(self, name: str, zone: str | None = None, timeout: float = 20.0) -> dict:
        """Wait until meshjoin did its part (waiting), confirm as the agent would, wait until joined."""
        wait_for(lambda: (self.status(name, zone).get("state") in ("waiting", "joined")), timeout=timeout,
                 what=f"{name} delivered")
        if self.status(name, zone).get("state") == "waiting":
            self.confirm(name, zone)
        return wait_for(lambda: (s := self.status(name, zone)).get("state") == "joined" and s, timeout=timeout,
                        what=f"{name} joined")


SANDBOX_PROJECT = "meshjoin-sandbox"


def account(name: str) -> str:
    """The service account a test VM runs as: its own (one per VM, as the README recommends)."""
    return f"{name}@{SANDBOX_PROJECT}.iam.gserviceaccount.com"


def bound(name: str, namespace: str = "default", ksa: str = "default", apps: list[str] | None = None) -> dict:
    """An identity binding for the test VM `name`'s own account (its app defaults to its name)."""
    return {"gsa": account(name), "namespace": namespace, "serviceAccount": ksa, "apps": apps or [name]}


# Who may join in the end-to-end sandboxes: the sandbox's default (orders) plus each test VM's own account,
# bound as that test needs. A VM whose account is missing here is denied with nothing written.
E2E_BINDINGS = [
    {"gsa": account("orders"), "namespace": "apps", "serviceAccount": "orders", "apps": ["orders"]},
    *(bound(name) for name in ("plain-1", "flip-1", "gone-1", "lost-1", "dup-live", "dup-dead", "evil-1", "evil-2",
                               "cli-denied", "cli-missed", "m-lost", "m-gone", "m-renew", "m-rot", "m-fail",
                               "m-cap-1", "m-cap-2", "m-cap-3", "bad-ports", "lost-2", "inject-nl", "inject-q",
                               "inject-dq", "late-1", "gc-1")),
    bound("web-1", "apps", "web"), bound("cli-ok", "apps", "api"),
    *(bound(name, "apps", "default") for name in ("inject-ok", "agent-md", "agent-off", "agent-sum", "agent-leave",
                                                 "agent-symlink")),
    bound("agent-confirm", "apps", "confirm"), bound("agent-boot", "apps", "boot"), bound("agent-watch", "apps", "watch"), bound("agent-watch", "apps", "watch-b"),
]


def running_sandbox(state_dir: Path, function_env: dict[str, str] | None = None, bindings: list[dict] | None = None):
    """Context: `meshjoin sandbox up` with extra function settings, always `down` afterwards."""
    import contextlib

    function_env = {"MESHJOIN_IDENTITY_BINDINGS": json.dumps([*E2E_BINDINGS, *(bindings or [])]),
                    **(function_env or {})}

    @contextlib.contextmanager
    def manage():
        extra = [arg for k, v in (function_env or {}).items() for arg in ("--function-env", f"{k}={v}")]
        up = subprocess.run([MESHJOIN, "sandbox", "up", "--state-dir", str(state_dir), *extra],
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        try:
            yield Sandbox(state_dir)
        finally:
            subprocess.run([MESHJOIN, "sandbox", "down", "--state-dir", str(state_dir)], capture_output=True,
                           timeout=60)

    return manage()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Sandbox:
    with running_sandbox(tmp_path_factory.mktemp("sandbox")) as world:
        yield world


def b64(data: dict) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()
