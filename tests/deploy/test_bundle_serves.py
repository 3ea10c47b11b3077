"""The staged bundles as Cloud Functions builds them: a fresh venv gets `pip install -r
requirements.txt` of the bundle and nothing else (no editable meshjoin, no dev tools), then
functions-framework serves each entry point from the bundle directory and answers a real Pub/Sub
push. Deployed without an Eventarc trigger, the functions run with the HTTP signature type, so
that is what is passed here: the @cloud_event decorator must win, as it does in production.

Slow (a venv install, ~20-60 s depending on the package cache), hence its own module.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from datetime import datetime, timezone
from pathlib import Path

import pytest

from .conftest import load_deploy_script

package = load_deploy_script("package")
pytestmark = pytest.mark.timeout(900)

PROJECT = "deploy-test-project"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bundle")
    bundles = package.package(root / "functions")
    requirements = {name: (path / "requirements.txt").read_text() for name, path in bundles.items()}
    assert len(set(requirements.values())) == 1, "one venv stands for both bundles only if their pins agree"
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # This venv's pip installs into the fresh one (faster than bootstrapping pip there), from the
    # bundle's requirements.txt alone, through whatever index pip is configured with.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-compile", "--quiet",
         "--disable-pip-version-check", "-r", str(bundles["events"] / "requirements.txt")],
        capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, f"pip install -r requirements.txt failed:\n{result.stdout}{result.stderr[-3000:]}"
    listing = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "list", "--format=json"],
                             capture_output=True, text=True, timeout=120, check=True)
    installed = {d["name"].lower() for d in json.loads(listing.stdout)}
    assert "meshjoin" not in installed and "pytest" not in installed
    return {"bundles": bundles, "bin": env_dir / "bin", "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def push_body(payload: dict) -> bytes:
    """A raw Pub/Sub push, as a push subscription delivers it."""
    return json.dumps({
        "message": {
            "data": base64.b64encode(json.dumps(payload).encode()).decode(),
            "messageId": "4242",
            "publishTime": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "attributes": {},
        },
        "subscription": f"projects/{PROJECT}/subscriptions/meshjoin-test-push",
    }).encode()


class Served:
    def __init__(self, fresh: dict, name: str):
        self.port = free_port()
        self.log = fresh["root"] / f"{name}.log"
        bundle = fresh["bundles"][name]
        env = {
            "PATH": f"{fresh['bin']}:/usr/bin:/bin",
            "HOME": str(fresh["root"]),  # no gcloud application-default credentials
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MESHJOIN_PROJECT": PROJECT,
            "MESHJOIN_CLUSTER": f"projects/{PROJECT}/locations/us-central1/clusters/mesh",
            # Credentials, if a code path asks, fail fast instead of waiting for 169.254.169.254.
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
        }
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(fresh["bin"] / "functions-framework"), "--source", str(bundle / "main.py"),
                 "--target", package.FUNCTIONS[name], "--signature-type", "http",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=bundle, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"functions-framework exited {self.proc.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"functions-framework did not listen within 60 s:\n{self.output()}")

    def post(self, body: bytes) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def served(fresh):
    started = []

    def start(name: str) -> Served:
        server = Served(fresh, name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def log_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def test_event_function_answers_a_push_from_the_bundle(served):
    server = served("events")
    # An operator message naming another project: decoded, checked against the settings, acked.
    status = server.post(push_body({"project": "someone-else", "zone": "us-central1-a", "instance": "vm-1"}))
    output = server.output()
    assert status == 200, output
    assert any(line.get("outcome") == "rejected" for line in log_lines(output)), output
    # A malformed message is acked too (redelivery cannot fix it), not crashed on.
    assert server.post(push_body({"hello": "world"})) == 200, server.output()
    assert "Traceback" not in server.output()


def test_maintenance_function_answers_a_tick_from_the_bundle(served):
    server = served("maintenance")
    status = server.post(push_body({"source": "cloud-scheduler", "job": "meshjoin-sweep"}))
    output = server.output()
    # The sweep reaches for Google credentials, which this machine does not have: it gets as far
    # as that (every module it needs imported), and no further.
    assert "ModuleNotFoundError" not in output and "ImportError" not in output, output
    assert status == 200 or "DefaultCredentialsError" in output, output
