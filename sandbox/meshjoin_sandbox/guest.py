"""The guest inside each sandbox VM: its own fake root, its own metadata server, its startup script,
and the guest attributes only it can write.

GCE's guest environment runs `startup-script` (the instance's item, else the project's) as root at
every boot and at no other time (`sudo google_metadata_script_runner startup` runs it by hand). The
sandbox does the same at each boot the Compute emulator reports (lifecycle.py): `bash SCRIPT` as the
sandbox's user (root in CI) with `MESHJOIN_ROOT=STATE_DIR/vms/ZONE/NAME/root`, `GCE_METADATA_HOST` =
that VM's own metadata server, and PATH shims for what would change the host (systemctl, dpkg,
useradd, chown, logger...; each records its calls in `log/`). The script's output goes to the VM's
`serial.log`, like the serial console (one timestamped line per line of output, as GCE's runner logs it);
a failing script is logged there and never breaks anything else.

systemd, for one unit: `systemctl start|restart meshjoin-watch.service` in a guest runs that unit's
`ExecStart` (read from the unit file in the VM's root, the program mapped into the root) as a background
process in the VM's environment, restarted after `RestartSec` when `Restart=always|on-failure` says so, its
output timestamped into `serial.log`; `restart` ends the previous process first; once `systemctl enable`d,
each later boot starts it too (before the startup script, as multi-user.target would). The sandbox ends the unit's
processes (and a startup script still running) when the VM stops, is reset or deleted, and when the sandbox
shuts down. Every other systemctl call is only recorded (no real services run).

Guest attributes: GCE's metadata server accepts `PUT instance/guest-attributes/NS/KEY` from the VM
(when `enable-guest-attributes=TRUE` in instance or project metadata), nothing outside the VM can set
them, and `instances.getGuestAttributes` reads them. The published write rate limit is 10 writes a
minute per VM with bursts of 3 a second; both are kept (minute scaled by the time factor).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
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
# The one unit the sandbox runs for real; `systemctl start|restart` of it asks the guest's systemd stand-in
# (MESHJOIN_SANDBOX_SYSTEMD, a loopback URL of this VM's) to launch it.
SUPERVISED_UNITS = ("meshjoin-watch.service",)
UNIT_STOP_SECONDS = 2.0  # SIGTERM, then SIGKILL after this (systemd's TimeoutStopSec is 90 s)

SHIMS = {
    "systemctl": 'echo "$*" >> "$LOG/systemctl"\n'
                 'case "$1 ${2:-}" in\n'
                 '  "enable meshjoin-watch.service") mkdir -p "$LOG/enabled" && touch "$LOG/enabled/$2" ;;\n'
                 '  "disable meshjoin-watch.service") rm -f "$LOG/enabled/$2" ;;\n'
                 '  "start meshjoin-watch.service" | "restart meshjoin-watch.service")\n'
                 '    if [ -n "${MESHJOIN_SANDBOX_SYSTEMD:-}" ]; then\n'
                 '      exec curl -sf -X POST --data-binary "$1 $2" "$MESHJOIN_SANDBOX_SYSTEMD" -o /dev/null 9>&-\n'
                 '    fi ;;\n'
                 'esac',
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

    def __init__(self, world, base_dir: Path | str, extra_env: dict[str, str] | None = None, project: str | None = None):
        self.world = world
        # The sandbox project whose VMs these are (one Guests per project; None: the host's).
        host = getattr(world, "project", None)
        self.project = project or host
        self.base_dir = Path(base_dir)
        self.extra_env = dict(extra_env or {})
        self._servers: dict[tuple[str, str], object] = {}
        self._servers_lock = threading.Lock()
        self._run_locks: dict[tuple[str, str], threading.Lock] = {}
        self.boots: dict[tuple[str, str], int] = {}
        self._procs_lock = threading.Lock()
        self._units: dict[tuple[str, str, str], UnitProcess] = {}
        self._scripts: dict[tuple[str, str], subprocess.Popen] = {}
        self._systemd = None
        world.emulators["guests" if self.project == host else f"guests@{self.project}"] = self

    @property
    def compute(self):
        return self.world.compute_for(self.project)

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
                server = serve(MetadataEmulator(self.world, instance=(zone, name), compute=self.compute).app,
                               "127.0.0.1", 0, name=f"metadata-{name}")
                self._servers[(zone, name)] = server
        return f"127.0.0.1:{server.server_port}"

    def boot(self, zone: str, name: str) -> None:
        """Called when the VM reaches RUNNING by a boot: run the startup script on its own thread."""
        self.boots[(zone, name)] = self.boots.get((zone, name), 0) + 1
        threading.Thread(target=self._boot, args=(zone, name), daemon=True, name=f"guest-boot-{name}").start()

    def _boot(self, zone: str, name: str) -> None:
        """systemd starts the enabled units (`systemctl enable` in an earlier boot), the runner the script."""
        for unit in SUPERVISED_UNITS:
            if (self.vm_dir(zone, name) / "log" / "enabled" / unit).exists():
                try:
                    self.unit_action(zone, name, unit, "start")
                except ValueError as exc:
                    _append(self.vm_dir(zone, name) / "serial.log", f"{_stamp()} systemd: {exc}\n")
        self.run_startup(zone, name, "boot")

    def run_startup(self, zone: str, name: str, why: str = "manual") -> dict:
        """Run `startup-script` (instance item, else project item) once, as the script runner does.

        Answers {"ran", "returncode", "serial_log"}; one run at a time per VM.
        """
        compute = self.compute
        lock = self._run_locks.setdefault((zone, name), threading.Lock())
        with lock:
            if compute.instance(zone, name) is None:  # deleted before its boot got this far
                return {"ran": False, "returncode": None, "serial_log": ""}
            script = compute.metadata_value(zone, name, "startup-script")
            vm = self.vm_dir(zone, name)
            root = self.root(zone, name)
            serial = vm / "serial.log"
            if script is None:
                _append(serial, f"{_stamp()} google_metadata_script_runner: no startup scripts to run ({why}).\n")
                return {"ran": False, "returncode": None, "serial_log": str(serial)}
            path = vm / "startup-script"
            path.write_text(script)
            _append(serial, f"{_stamp()} google_metadata_script_runner: starting startup scripts ({why}).\n")
            env = self.env(zone, name)
            code = self._run_script(zone, name, ["bash", str(path)], env, root, serial)
            _append(serial, f"{_stamp()} google_metadata_script_runner: startup-script exit status {code}\n")
            return {"ran": True, "returncode": code, "serial_log": str(serial)}

    def env(self, zone: str, name: str) -> dict[str, str]:
        """The environment the VM's startup script and units run in."""
        vm = self.vm_dir(zone, name)
        return {**guest_env(self.root(zone, name), vm / "bin", self.metadata_host(zone, name), self.extra_env),
                "MESHJOIN_SANDBOX_SYSTEMD": f"{self._systemd_url()}/{zone}/{name}"}

    def _run_script(self, zone: str, name: str, argv: list[str], env: dict, root: Path, serial: Path) -> int:
        """Run one startup script to its end (or the VM's halt), its output timestamped into the serial log."""
        try:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(root), start_new_session=True)
        except OSError as exc:
            _append(serial, f"startup-script could not run: {exc}\n")
            return -1
        with self._procs_lock:
            self._scripts[(zone, name)] = proc
        timer = threading.Timer(SCRIPT_TIMEOUT, _end_group, (proc,))
        timer.daemon = True
        timer.start()
        pump = _pump(proc, serial, "google_metadata_script_runner: startup-script: ")
        try:
            code = proc.wait()
            pump.join(1.0)  # a background child of the script may keep the pipe open: the runner moves on
            return code
        finally:
            timer.cancel()
            with self._procs_lock:
                if self._scripts.get((zone, name)) is proc:
                    del self._scripts[(zone, name)]

    # ---- systemd's part, for SUPERVISED_UNITS only ---------------------------------------------------------

    def _systemd_url(self) -> str:
        """The loopback endpoint the systemctl shims call (one for all VMs, started on first use)."""
        with self._procs_lock:
            if self._systemd is None:
                self._systemd = serve(self._systemd_app, "127.0.0.1", 0, name="guest-systemd")
            return f"http://127.0.0.1:{self._systemd.server_port}/units"

    def _systemd_app(self, environ, start_response):
        parts = environ.get("PATH_INFO", "").strip("/").split("/")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        action, _, unit = environ["wsgi.input"].read(length).decode(errors="replace").partition(" ")
        status, body = "200 OK", {"ok": True}
        if environ.get("REQUEST_METHOD") != "POST" or len(parts) != 3 or parts[0] != "units":
            status, body = "404 Not Found", {"error": "POST /units/ZONE/NAME with 'start|restart UNIT'"}
        else:
            try:
                body = self.unit_action(parts[1], parts[2], unit, action)
            except ValueError as exc:
                status, body = "400 Bad Request", {"error": str(exc)}
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    def unit_action(self, zone: str, name: str, unit: str, action: str) -> dict:
        """`systemctl start|restart UNIT` inside the VM: launch the unit's ExecStart (restart: end it first)."""
        if unit not in SUPERVISED_UNITS or action not in ("start", "restart"):
            raise ValueError(f"the sandbox runs only 'start|restart' of {', '.join(SUPERVISED_UNITS)}")
        compute = self.compute
        instance = compute.instance(zone, name)
        if instance is None or instance["status"] != "RUNNING":
            raise ValueError(f"VM {zone}/{name} is not running")
        with self._procs_lock:
            current = self._units.get((zone, name, unit))
            if action == "start" and current is not None and current.active():
                return {"unit": unit, "pid": current.pid, "started": False}
            self._units.pop((zone, name, unit), None)
        if current is not None:
            current.stop()
        root = self.root(zone, name)
        service = read_unit(root, unit)
        process = UnitProcess(unit, service, self.env(zone, name), root, self.vm_dir(zone, name) / "serial.log")
        with self._procs_lock:
            self._units[(zone, name, unit)] = process
        process.start()
        return {"unit": unit, "pid": process.pid, "started": True}

    def unit_pids(self, zone: str, name: str) -> dict[str, int]:
        """The main process of each running unit of a VM (tests and tools)."""
        with self._procs_lock:
            units = {unit: p for (z, n, unit), p in self._units.items() if (z, n) == (zone, name)}
        return {unit: p.pid for unit, p in units.items() if p.active()}

    def halt(self, zone: str, name: str) -> None:
        """The VM stops, resets or is deleted: everything running in its guest ends now."""
        with self._procs_lock:
            units = [self._units.pop(key) for key in [k for k in self._units if k[:2] == (zone, name)]]
            script = self._scripts.get((zone, name))
        for unit in units:
            unit.stop()
        if script is not None:
            _end_group(script)

    def shutdown(self) -> None:
        """The sandbox ends: no guest process outlives it (all VMs halt at once, within the launcher's grace)."""
        with self._procs_lock:
            vms = {key[:2] for key in self._units} | set(self._scripts)
        halts = [threading.Thread(target=self.halt, args=vm, daemon=True) for vm in vms]
        for thread in halts:
            thread.start()
        for thread in halts:
            thread.join(2 * UNIT_STOP_SECONDS + 1)
        if self._systemd is not None:
            self._systemd.shutdown()


def read_unit(root: Path, unit: str) -> dict[str, str]:
    """The [Service] settings of a unit file in the VM's root (the few the sandbox honours)."""
    path = root / "etc" / "systemd" / "system" / unit
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"Unit {unit} not found ({exc.strerror}).") from exc
    service, section = {}, ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            service[key.strip()] = value.strip()
    if not service.get("ExecStart", "").startswith("/"):
        raise ValueError(f"Unit {unit} has no absolute ExecStart.")
    return service


class UnitProcess:
    """One running service: its ExecStart in the VM's root, restarted as its Restart= says, until stopped."""

    def __init__(self, unit: str, service: dict[str, str], env: dict[str, str], root: Path, serial: Path):
        argv = shlex.split(service["ExecStart"])
        program = Path(argv[0])
        if ".." in program.parts:
            raise ValueError(f"Unit {unit}: ExecStart must name a program inside the VM")
        self.argv = [str(root / str(program).lstrip("/")), *argv[1:]]
        self.unit, self.env, self.root, self.serial = unit, env, root, serial
        self.restart = service.get("Restart", "no")
        try:
            self.restart_sec = float(service.get("RestartSec", "0.1").rstrip("s") or 0.1)
        except ValueError:
            self.restart_sec = 0.1
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"unit-{unit}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5.0)

    def active(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=str(self.root), start_new_session=True)
            except OSError as exc:
                _append(self.serial, f"{_stamp()} systemd: {self.unit}: failed to execute {self.argv[0]}: {exc}\n")
                self._started.set()
                return
            self._started.set()
            pump = _pump(self.proc, self.serial, f"{self.unit.removesuffix('.service')}[{self.proc.pid}]: ")
            code = self.proc.wait()
            _kill_group(self.proc)  # KillMode=control-group: the main process gone, the rest of the unit goes
            pump.join(1.0)
            if self._stopping.is_set():
                return
            _append(self.serial, f"{_stamp()} systemd: {self.unit}: main process exited, status {code}\n")
            if not (self.restart == "always" or (self.restart == "on-failure" and code != 0)):
                return
            if self._stopping.wait(self.restart_sec):
                return

    def stop(self) -> None:
        self._stopping.set()
        if self.proc is not None:
            _end_group(self.proc)
        self._thread.join(UNIT_STOP_SECONDS + 1)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process's whole group (it leads its own session), SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, UNIT_STOP_SECONDS), (signal.SIGKILL, UNIT_STOP_SECONDS)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        _kill_group(proc)  # the leader is gone; its children may linger: kill what is left
        break
    deadline = time.monotonic() + UNIT_STOP_SECONDS  # and only answer once the group is really gone
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc: subprocess.Popen, serial: Path, prefix: str) -> threading.Thread:
    thread = threading.Thread(target=_copy_lines, args=(proc.stdout, serial, prefix), daemon=True, name="guest-out")
    thread.start()
    return thread


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _copy_lines(stream, serial: Path, prefix: str) -> None:
    """Each line a process writes, timestamped into the serial log as it arrives."""
    for raw in iter(stream.readline, b""):
        _append(serial, f"{_stamp()} {prefix}{raw.decode(errors='replace').rstrip()}\n")
    stream.close()


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(text)
