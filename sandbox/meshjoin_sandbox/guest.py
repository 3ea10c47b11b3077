"""The guest inside each sandbox VM: its own fake root, its own metadata server, its startup script,
and the guest attributes only it can write.

GCE's guest environment runs `startup-script` (the instance's item, else the project's) as root at
every boot and at no other time (`sudo google_metadata_script_runner startup` runs it by hand). The
sandbox does the same at each boot the Compute emulator reports (lifecycle.py): `bash SCRIPT` as the
sandbox's user (root in CI) with `MESHJOIN_ROOT=STATE_DIR/vms/ZONE/NAME/root`, `GCE_METADATA_HOST` =
that VM's own metadata server, and PATH shims for what would change the host (systemctl, dpkg,
useradd, chown, logger...; each records its calls in `log/`). The script's output goes to the VM's
`serial.log`, like the serial console; a failing script is logged there and never breaks anything else.

Guest attributes: GCE's metadata server accepts `PUT instance/guest-attributes/NS/KEY` from the VM
(when `enable-guest-attributes=TRUE` in instance or project metadata), nothing outside the VM can set
them, and `instances.getGuestAttributes` reads them. The published write rate limit is 10 writes a
minute per VM with bursts of 3 a second; both are kept (minute scaled by the time factor).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .web import ApiError, serve

log = logging.getLogger("sandbox.guest")

PROXY_UID = 1337  # what the chown/id shims map istio-proxy to, so ownership stays real and checkable
SCRIPT_TIMEOUT = 600.0
IMAGE_SIDECAR_VERSION = "1.24.0-sandbox-image"

# Commands a startup script may run that would change the host: shimmed to record their calls in $LOG.
SHIMS = {
    "systemctl": 'echo "$*" >> "$LOG/systemctl"',
    "dpkg": 'echo "$*" >> "$LOG/dpkg"\n'
            'if [ "$1" = -i ]; then dpkg-deb -f "$2" Version > "$LOG/installed-version"; fi',
    "dpkg-query": '[ -f "$LOG/installed-version" ] || exit 1\nprintf "installed %s" "$(cat "$LOG/installed-version")"',
    "useradd": 'echo "$*" >> "$LOG/useradd"\ntouch "$LOG/user-exists"',
    "id": f'if {{ [ "$1" = -u ] || [ "$1" = -g ]; }} && [ "$2" = istio-proxy ]; then\n'
          f'  [ -f "$LOG/user-exists" ] && echo {PROXY_UID}; exit\nfi\nexec {{id}} "$@"',
    "chown": f'owner="$(echo "$1" | sed "s/istio-proxy/{PROXY_UID}/g")"\nshift\nexec {{chown}} "$owner" "$@"',
    "logger": 'echo "$*" >> "$LOG/journal"',
}


def install_shims(bin_dir: Path, log_dir: Path) -> None:
    """Write the PATH shims into `bin_dir`; their calls are recorded under `log_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    real = {"id": shutil.which("id") or "/usr/bin/id", "chown": shutil.which("chown") or "/bin/chown"}
    for tool, body in SHIMS.items():
        shim = bin_dir / tool
        shim.write_text(f"#!/bin/sh\nLOG={log_dir}\n" + body.replace("{id}", real["id"])
                        .replace("{chown}", real["chown"]) + "\n")
        shim.chmod(0o755)


def prepare_root(root: Path) -> None:
    """A stock image's few files the agent edits in place."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    hosts = root / "etc" / "hosts"
    if not hosts.exists():
        hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")


def guest_env(root: Path, bin_dir: Path, metadata_host: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a script runs in: the host's, minus sandbox/product settings, plus the VM's own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MESHJOIN_", "GCE_METADATA", "CLOUDSDK_"))}
    return {**base, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "MESHJOIN_ROOT": str(root),
            "GCE_METADATA_HOST": metadata_host, **(extra or {})}


class GuestAttributes:
    """Guest attributes per VM incarnation (instance id): namespace -> key -> value. Thread-safe."""

    PER_MINUTE = 10
    PER_SECOND = 3

    def __init__(self, time_factor: float = 1.0, clock=time.time):
        self._values: dict[str, dict[str, dict[str, str]]] = {}
        self._writes: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self.minute = 60.0 * time_factor
        self.clock = clock

    def put(self, instance_id: str, namespace: str, key: str, value: str) -> None:
        """A write from the VM itself; refused over the published rate limit."""
        now = self.clock()
        with self._lock:
            recent = [t for t in self._writes.get(instance_id, []) if now - t < self.minute]
            if len(recent) >= self.PER_MINUTE or sum(1 for t in recent if now - t < 1.0) >= self.PER_SECOND:
                self._writes[instance_id] = recent
                raise ApiError(429, "Too many guest attribute writes: at most 10 a minute and 3 a second per VM.")
            recent.append(now)
            self._writes[instance_id] = recent
            self._values.setdefault(instance_id, {}).setdefault(namespace, {})[key] = value

    def delete(self, instance_id: str, namespace: str, key: str) -> bool:
        with self._lock:
            return self._values.get(instance_id, {}).get(namespace, {}).pop(key, None) is not None

    def get(self, instance_id: str, variable_key: str) -> str | None:
        namespace, _, key = variable_key.partition("/")
        with self._lock:
            return self._values.get(instance_id, {}).get(namespace, {}).get(key)

    def namespaces(self, instance_id: str) -> dict[str, dict[str, str]]:
        with self._lock:
            return {ns: dict(keys) for ns, keys in self._values.get(instance_id, {}).items() if keys}

    def query(self, instance_id: str, query_path: str) -> list[dict]:
        """`queryPath`: "" (all), "NS/" (one namespace) or "NS/KEY" (one key), as getGuestAttributes."""
        namespace, _, key = query_path.partition("/")
        items = []
        for ns, keys in sorted(self.namespaces(instance_id).items()):
            if namespace and ns != namespace:
                continue
            items += [{"namespace": ns, "key": k, "value": v} for k, v in sorted(keys.items()) if not key or k == key]
        return items

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self._values.pop(instance_id, None)
            self._writes.pop(instance_id, None)


class Guests:
    """Every VM's guest side: fake roots under `base_dir`, per-VM metadata servers, the script runner."""

    def __init__(self, world, base_dir: Path | str, extra_env: dict[str, str] | None = None):
        self.world = world
        self.base_dir = Path(base_dir)
        self.extra_env = dict(extra_env or {})
        self._servers: dict[tuple[str, str], object] = {}
        self._servers_lock = threading.Lock()
        self._run_locks: dict[tuple[str, str], threading.Lock] = {}
        self.boots: dict[tuple[str, str], int] = {}
        world.emulators["guests"] = self

    def vm_dir(self, zone: str, name: str) -> Path:
        return self.base_dir / zone / name

    def root(self, zone: str, name: str) -> Path:
        """The VM's fake root (created with its shims on first use)."""
        vm = self.vm_dir(zone, name)
        prepare_root(vm / "root")
        if not (vm / "bin" / "systemctl").exists():
            install_shims(vm / "bin", vm / "log")
            # The sandbox's VM image has Istio's sidecar package baked in (what the README recommends for
            # fleets without a package URL); the dpkg shims record it, and no Envoy ever runs.
            (vm / "log" / "installed-version").write_text(IMAGE_SIDECAR_VERSION)
        return vm / "root"

    def metadata_host(self, zone: str, name: str) -> str:
        """HOST:PORT of the VM's own metadata server (one per VM, started on first use)."""
        from .metadata import MetadataEmulator

        with self._servers_lock:
            server = self._servers.get((zone, name))
            if server is None:
                server = serve(MetadataEmulator(self.world, instance=(zone, name)).app, "127.0.0.1", 0,
                               name=f"metadata-{name}")
                self._servers[(zone, name)] = server
        return f"127.0.0.1:{server.server_port}"

    def boot(self, zone: str, name: str) -> None:
        """Called when the VM reaches RUNNING by a boot: run the startup script on its own thread."""
        self.boots[(zone, name)] = self.boots.get((zone, name), 0) + 1
        threading.Thread(target=self.run_startup, args=(zone, name, "boot"), daemon=True,
                         name=f"guest-boot-{name}").start()

    def run_startup(self, zone: str, name: str, why: str = "manual") -> dict:
        """Run `startup-script` (instance item, else project item) once, as the script runner does.

        Answers {"ran", "returncode", "serial_log"}; one run at a time per VM.
        """
        compute = self.world.emulators["compute"]
        lock = self._run_locks.setdefault((zone, name), threading.Lock())
        with lock:
            if compute.instance(zone, name) is None:  # deleted before its boot got this far
                return {"ran": False, "returncode": None, "serial_log": ""}
            script = compute.metadata_value(zone, name, "startup-script")
            vm = self.vm_dir(zone, name)
            root = self.root(zone, name)
            serial = vm / "serial.log"
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if script is None:
                _append(serial, f"{stamp} google_metadata_script_runner: no startup scripts to run ({why}).\n")
                return {"ran": False, "returncode": None, "serial_log": str(serial)}
            path = vm / "startup-script"
            path.write_text(script)
            _append(serial, f"{stamp} google_metadata_script_runner: starting startup scripts ({why}).\n")
            env = guest_env(root, vm / "bin", self.metadata_host(zone, name), self.extra_env)
            try:
                with open(serial, "ab") as out:
                    result = subprocess.run(["bash", str(path)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=str(root), timeout=SCRIPT_TIMEOUT)
                code = result.returncode
            except (OSError, subprocess.SubprocessError) as exc:
                _append(serial, f"startup-script could not run: {exc}\n")
                code = -1
            _append(serial, f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                            f"google_metadata_script_runner: startup-script exit status {code}\n")
            return {"ran": True, "returncode": code, "serial_log": str(serial)}


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(text)
