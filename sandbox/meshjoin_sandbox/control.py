"""Control plane of the sandbox itself (not a Google API): health and fault injection.

`POST /faults {"emulator": "compute", "method": "instances.aggregatedList", "status": 503, "count": 1}`
makes the next `count` calls of that method answer `status`; `DELETE /faults` forgets pending ones.
The body may also carry `kind` (error | latency | timeout | drop | partial), `probability`, `seconds`,
`after` (drop: status | close | timeout) and `principal` (any | product): see `web.FaultRule`;
`emulator` is compute, secretmanager or kube. `GET /faults` answers each emulator's rules and its
counts of calls and injected faults per API method.
`POST /rotate-ca` rotates the plug-in CA to a new root (see rotation.py).
`POST /vm-metadata {"zone", "name"}` starts (once per VM) a metadata server with that VM's own view on a
free loopback port and answers its `{"host": "127.0.0.1:PORT"}`, the GCE_METADATA_HOST of a VM agent.
`POST /vm-root {"zone", "name"}` answers the VM's fake root `{"root": DIR}`; `POST /run-startup` runs its
startup script now, as `sudo google_metadata_script_runner startup` would (guest.py).
`GET /stats` answers the requests each server answered, by API method; `DELETE /stats` zeroes them.
`POST /seed` creates a fleet of already-registered VMs in one call (benchmarks; see seed.py).
`POST /token {"email", "scopes": [...]}` answers `{"token"}`: an access token of that account with those
scopes (default cloud-platform), as a metadata server or gcloud would mint it; IAM decides the rest.
"""

from __future__ import annotations

import threading

from .metadata import MetadataEmulator
from .world import CLOUD_PLATFORM
from .web import ApiError, FaultInjector, RoutedApp, json_response, read_json, route, serve


class ControlEmulator:
    def __init__(self, world):
        self.world = world
        self.app = RoutedApp(self)
        self._vm_servers: dict[tuple[str, str, str], object] = {}
        self._vm_servers_lock = threading.Lock()

    @route("GET", "/healthz", "healthz")
    def healthz(self, request):
        return json_response({"ok": True, "emulators": sorted(self.world.emulators)})

    @route("POST", "/token", "token")
    def token(self, request):
        body = read_json(request)
        scopes = body.get("scopes") or [CLOUD_PLATFORM]
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ApiError(400, "scopes must be a list of strings")
        return json_response({"token": self.world.issue_token(str(body.get("email", "")), scopes)})

    def _injectors(self) -> dict[str, FaultInjector]:
        """Every emulator that suffers faults, by its name in the world (compute, compute@P, kube, ...)."""
        return {name: emulator.faults for name, emulator in sorted(self.world.emulators.items())
                if isinstance(getattr(emulator, "faults", None), FaultInjector)}

    @route("DELETE", "/faults", "clear_faults")
    def clear_faults(self, request):
        for faults in self._injectors().values():
            faults.clear()
        return json_response({"ok": True})

    @route("POST", "/rotate-ca", "rotate_ca")
    def rotate_ca(self, request):
        """A new root + intermediate, added as new versions of the four plug-in CA secrets."""
        from .rotation import rotate_plugin_ca

        return json_response(rotate_plugin_ca(self.world))

    def _vm(self, request) -> tuple[str, str, str]:
        """The VM a body names: {"zone", "name", "project"} (project: the host's unless given)."""
        body = read_json(request)
        zone, name = body.get("zone") or self.world.zone, body.get("name", "")
        project = body.get("project") or self.world.project
        if self.world.compute_for(project).instance(zone, name) is None:
            raise ApiError(404, f"no VM {project}/{zone}/{name}")
        return zone, name, project

    @route("POST", "/vm-metadata", "vm_metadata")
    def vm_metadata(self, request):
        zone, name, project = self._vm(request)
        guests = self.world.guests_for(project)
        if guests is not None:  # one server per VM, shared with its startup script
            return json_response({"host": guests.metadata_host(zone, name)})
        with self._vm_servers_lock:  # one server per VM: asking again answers the same port
            server = self._vm_servers.get((project, zone, name))
            if server is None:
                server = serve(MetadataEmulator(self.world, instance=(zone, name),
                                                compute=self.world.compute_for(project)).app,
                               "127.0.0.1", 0, name=f"metadata-{name}")
                self._vm_servers[(project, zone, name)] = server
        return json_response({"host": f"127.0.0.1:{server.server_port}"})

    @route("POST", "/vm-root", "vm_root")
    def vm_root(self, request):
        zone, name, project = self._vm(request)
        return json_response({"root": str(self.world.guests_for(project).root(zone, name))})

    @route("POST", "/run-startup", "run_startup")
    def run_startup(self, request):
        """`sudo google_metadata_script_runner startup` on a running VM."""
        zone, name, project = self._vm(request)
        status = self.world.compute_for(project).instance(zone, name)["status"]
        if status != "RUNNING":
            raise ApiError(409, f"VM {zone}/{name} is {status}, not RUNNING: nothing runs on it")
        return json_response(self.world.guests_for(project).run_startup(zone, name, "manual"))

    @route("POST", "/faults", "faults")
    def faults(self, request):
        body = read_json(request)
        faults = self._injectors().get(body.get("emulator", ""))
        if faults is None:
            raise ApiError(400, f"no emulator with faults named {body.get('emulator')!r}")
        rule = faults.add({k: v for k, v in body.items() if k != "emulator"})
        return json_response({"ok": True, "rule": rule.method})

    @route("GET", "/faults", "fault_stats")
    def fault_stats(self, request):
        return json_response({name: faults.stats() for name, faults in self._injectors().items()})

    @route("GET", "/stats", "stats")
    def stats(self, request):
        from .stats import snapshot

        return json_response(snapshot())

    @route("DELETE", "/stats", "clear_stats")
    def clear_stats(self, request):
        from .stats import snapshot

        return json_response(snapshot(reset=True))

    @route("POST", "/seed", "seed")
    def seed(self, request):
        from .seed import seed_fleet

        return json_response(seed_fleet(self.world, read_json(request)))
