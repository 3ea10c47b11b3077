"""Control plane of the sandbox itself (not a Google API): health and fault injection.

`POST /faults {"emulator": "compute", "method": "instances.aggregatedList", "status": 503, "count": 1}`
makes the next `count` calls of that method answer `status`.
"""

from __future__ import annotations

from werkzeug.routing import Map, Rule

from .web import ApiError, RoutedApp, json_response, read_json


class ControlEmulator:
    def __init__(self, world):
        self.world = world
        url_map = Map([
            Rule("/healthz", endpoint="healthz", methods=["GET"]),
            Rule("/faults", endpoint="faults", methods=["POST"]),
        ])
        self.app = RoutedApp(url_map, {"healthz": self.healthz, "faults": self.faults})

    def healthz(self, request):
        return json_response({"ok": True, "emulators": sorted(self.world.emulators)})

    def faults(self, request):
        body = read_json(request)
        emulator = self.world.emulators.get(body.get("emulator", ""))
        if emulator is None or not hasattr(emulator, "fail_next"):
            raise ApiError(400, f"no emulator with faults named {body.get('emulator')!r}")
        emulator.fail_next(body["method"], int(body.get("status", 503)), int(body.get("count", 1)))
        return json_response({"ok": True})
