"""One client of a running sandbox, for the end-to-end tests (tests/e2e/conftest.py) and the benchmarks
(bench/world.py): starting and stopping it, running the CLIs a person runs against it (meshjoin, gcloud,
kubectl, with `source STATE_DIR/env`), reading what meshjoin wrote (a VM's metadata and `meshjoin-status`,
the WorkloadEntries, the functions' logs), the control plane, and waiting for a condition.

It reads the sandbox only from the outside: STATE_DIR/sandbox.json and STATE_DIR/env (what `sandbox up`
writes), the processes' logs, the CLIs and the emulators' HTTP APIs (as the operator, admin token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import requests

from . import launcher
from .config import SandboxConfig

# The CLI of the environment this runs in (the venv's console script, beside its python).
MESHJOIN = str(Path(sys.executable).with_name("meshjoin"))
STATUS_KEY = "meshjoin-status"
# The annotation meshjoin puts on each WorkloadEntry it registers: which VM the entry speaks for.
INSTANCE_ANNOTATION = "meshjoin.dev/instance"
# Which emulator answers which server name in the control plane's /stats, and what the reports call it.
API_OF = {"compute": "compute", "secretmanager": "secretmanager", "kube": "kubernetes", "container": "container",
          "metadata": "metadata"}
CERT_FILES = ("key.pem", "key.next.pem", "cert-chain.pem", "root-cert.pem")

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.2,
             what: str = "condition") -> T:
    """Poll until `predicate()` returns something truthy; return it, or fail saying what we waited for."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --- what meshjoin wrote, decoded once ------------------------------------------------------------------


def metadata_items(instance: dict | None) -> dict[str, str]:
    """A Compute instance's (REST JSON) metadata items as key -> value."""
    return {i["key"]: i.get("value", "") for i in (instance or {}).get("metadata", {}).get("items", [])}


def decode_status(raw: str | None) -> dict:
    """`meshjoin-status` as a dict; {} when the VM has none. The one place tests and benchmarks parse it:
    strict on purpose (what meshjoin wrote must be JSON; a test that forges a status writes its own)."""
    return json.loads(raw) if raw else {}


def status_of(instance: dict | None) -> dict:
    """The decoded `meshjoin-status` of a Compute instance (REST JSON)."""
    return decode_status(metadata_items(instance).get(STATUS_KEY))


def entry_instance(entry: dict) -> str | None:
    """The VM a WorkloadEntry speaks for, by meshjoin's annotation (None for an entry meshjoin did not make)."""
    return (entry.get("metadata", {}).get("annotations") or {}).get(INSTANCE_ANNOTATION)


def up_command(state_dir: Path, function_env: dict[str, str] | None = None,
               up_args: Iterable[str] = ()) -> list[str]:
    """The `meshjoin sandbox up` command line for these function settings and further arguments."""
    extra = [arg for k, v in (function_env or {}).items() for arg in ("--function-env", f"{k}={v}")]
    return [MESHJOIN, "sandbox", "up", "--state-dir", str(state_dir), *extra, *up_args]


class SandboxClient:
    """A sandbox that `sandbox up` started in `state_dir`, seen from outside."""

    def __init__(self, state_dir: Path, *, stop_with_cli: bool = True):
        self.state_dir = Path(state_dir)
        self.env_vars: dict[str, str] = launcher.read_env_file(self.state_dir / "env")
        self.config: dict[str, Any] = json.loads((self.state_dir / "sandbox.json").read_text())
        self.cfg = SandboxConfig.load(self.state_dir)
        self.project: str = self.config["project"]
        self.zone: str = self.config["zone"]
        self.up_seconds: float | None = None
        self._stop_with_cli = stop_with_cli
        # One keep-alive session with the operator's token for the emulators' HTTP APIs (made here, before any
        # thread shares it).
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.cfg.admin_token}"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)

    # --- start and stop --------------------------------------------------------------------------

    @classmethod
    def start(cls, state_dir: Path, function_env: dict[str, str] | None = None, *, up_args: Iterable[str] = (),
              in_process: bool = False, compute_subnet: str | None = None, run_startup_scripts: bool = True,
              timeout: float = 120.0) -> "SandboxClient":
        """Start a sandbox in `state_dir` and return its client (stop it with `stop()` or `with`).

        By default through the real CLI, `meshjoin sandbox up` (the end-to-end tests' way: the command a person
        runs, `up_args` passed on). `in_process=True` calls the launcher in this process instead, for what the
        CLI does not offer (`compute_subnet`, `run_startup_scripts=False`: the benchmarks' worlds)."""
        state_dir = Path(state_dir)
        started = time.monotonic()
        if in_process:
            if up_args:
                raise ValueError("up_args are CLI arguments: start without in_process=True to pass them")
            launcher.up(state_dir, function_env=function_env, compute_subnet=compute_subnet, timeout=timeout,
                        run_startup_scripts=run_startup_scripts)
        else:
            if compute_subnet is not None or not run_startup_scripts:
                raise ValueError("compute_subnet and run_startup_scripts=False need in_process=True "
                                 "(`meshjoin sandbox up` has no such options)")
            up = subprocess.run(up_command(state_dir, function_env, up_args), capture_output=True, text=True,
                                timeout=timeout)
            if up.returncode != 0:
                raise launcher.SandboxError(f"meshjoin sandbox up failed: {up.stdout}{up.stderr}")
        client = cls(state_dir, stop_with_cli=not in_process)
        client.up_seconds = time.monotonic() - started
        return client

    def stop(self) -> None:
        """Stop every process of the sandbox, the way it was started (CLI or launcher)."""
        self.http.close()
        if self._stop_with_cli:
            subprocess.run([MESHJOIN, "sandbox", "down", "--state-dir", str(self.state_dir)], capture_output=True,
                           timeout=60)
        else:
            launcher.down(self.state_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the environment and the CLIs a person runs ----------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The process environment a person gets after `source DIR/env`."""
        return {**os.environ, **self.env_vars}

    def process_env(self) -> dict[str, str]:
        """The environment of a function process in this sandbox: `source DIR/env` without the caller's own
        MESHJOIN_* settings (so a developer's shell cannot change what the product reads)."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("MESHJOIN_")}, **self.env_vars}

    def meshjoin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([MESHJOIN, *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"meshjoin {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Any command (gcloud, kubectl, ...) in the sandbox's environment."""
        result = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {result.stdout}{result.stderr}")
        return result

    # --- a VM's metadata and meshjoin's status, through the sandbox's CLI -------------------------

    def vm(self, name: str, zone: str | None = None) -> dict | None:
        """The instance as the Compute API returns it (`meshjoin sandbox vm NAME --json`); None if there is none."""
        result = self.meshjoin("sandbox", "vm", name, "--json", *(["--zone", zone] if zone else []), check=False)
        if result.returncode != 0:
            if "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def metadata(self, name: str, zone: str | None = None) -> dict[str, str]:
        return metadata_items(self.vm(name, zone))

    def status(self, name: str, zone: str | None = None) -> dict:
        return decode_status(self.metadata(name, zone).get(STATUS_KEY))

    # --- Kubernetes, through kubectl ---------------------------------------------------------------

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
        return [e for e in self.entries() if entry_instance(e) == name]

    # --- the functions' logs and messages ------------------------------------------------------------

    def log_path(self, name: str = "events_fn") -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def function_log(self, name: str = "events_fn") -> list[dict]:
        return launcher.json_lines(self.log_path(name).read_text(errors="replace"))

    def raw_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.state_dir / "logs").glob("*.log"))

    def logged(self, instance: str, outcome: str) -> list[dict]:
        return [e for e in self.function_log() if e.get("instance") == instance and e.get("outcome") == outcome]

    def publish(self, payload: dict | str) -> None:
        """An operator message on the events topic, with real gcloud."""
        message = payload if isinstance(payload, str) else json.dumps(payload)
        self.run("gcloud", "pubsub", "topics", "publish", self.env_vars["MESHJOIN_EVENTS_TOPIC"],
                 "--message", message)

    def ca_file(self, name: str) -> Path:
        return Path(self.config["ca_dir"]) / name

    # --- the VM's side ---------------------------------------------------------------------------------

    def confirm(self, name: str, zone: str | None = None) -> str:
        """Run the VM's own agent, as its owner would (`sudo google_metadata_script_runner startup`): the
        sandbox runs the real startup-script in the VM's fake root; it makes the VM's key, sends its CSR
        through guest attributes, nudges meshjoin, installs the certificate meshjoin signs and reports it.
        Blocks while a boot run of the agent is still going (one run at a time per VM)."""
        args = ["sandbox", "run-startup", name] + (["--zone", zone] if zone else [])
        result = self.meshjoin(*args, check=False)
        assert result.returncode == 0, f"the agent on {name} failed: {result.stdout}{result.stderr}"
        return result.stdout

    def vm_root(self, name: str, zone: str | None = None) -> Path:
        """The VM's fake root (what `meshjoin sandbox vm-root NAME` prints)."""
        return Path(self.meshjoin("sandbox", "vm-root", name, *(["--zone", zone] if zone else [])).stdout.strip())

    def certs(self, name: str, zone: str | None = None) -> dict[str, str]:
        """The files in the VM's /etc/certs (empty strings for missing ones)."""
        directory = self.vm_root(name, zone) / "etc" / "certs"
        return {f: (directory / f).read_text() if (directory / f).exists() else "" for f in CERT_FILES}

    def join_confirmed(self, name: str, zone: str | None = None, timeout: float = 20.0) -> dict:
        """Wait until meshjoin did its part (waiting), confirm as the agent would, wait until joined."""
        wait_for(lambda: (self.status(name, zone).get("state") in ("waiting", "joined")), timeout=timeout,
                 what=f"{name} delivered")
        if self.status(name, zone).get("state") == "waiting":
            self.confirm(name, zone)  # the boot run may have missed the bootstrap (written after boot)
        return wait_for(lambda: (s := self.status(name, zone)).get("state") == "joined" and s, timeout=timeout,
                        what=f"{name} joined")

    # --- the emulators' HTTP APIs, as the operator (admin token) ---------------------------------------

    def url(self, name: str) -> str:
        return self.cfg.url(name)

    def control(self, method: str, path: str, body=None) -> dict:
        response = self.http.request(method, self.url("control") + path, json=body, timeout=600)
        response.raise_for_status()
        return response.json()

    def reset_stats(self) -> None:
        self.control("DELETE", "/stats")

    def stats(self) -> Counter:
        """Requests answered since the last reset, as `api method` → count (control plane excluded)."""
        out: Counter = Counter()
        for server, counts in self.control("GET", "/stats").items():
            api = API_OF.get(server)
            if api is None:
                continue
            for method, count in counts.items():
                out[f"{api} {method}"] += count
        return out

    def kube(self, method: str, path: str, body=None) -> requests.Response:
        # verify per request: a session's `verify` loses to REQUESTS_CA_BUNDLE from the environment
        return self.http.request(method, f"https://127.0.0.1:{self.cfg.ports['kube']}{path}", json=body,
                                 verify=self.cfg.kube_ca_file, timeout=120)
