"""Small HTTP toolkit shared by the sandbox emulators: routing, fault injection, threaded server.

Every emulator declares its routes on its handlers (`@route("GET", "/v1/.../<name>", "things.get")`)
and serves them through one `RoutedApp` (werkzeug routing underneath); handlers take
`(request, **path_vars)` and return a `Response` or raise `ApiError`, which each emulator renders in
its own API's error format (Google JSON error or Kubernetes Status). Every emulator that suffers
faults consults one `FaultInjector` the same way, in `RoutedApp`; paging is in paging.py.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import random
import socket
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

# Google's canonical gRPC status names by HTTP status, as the real JSON errors carry them.
GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """An error answer: HTTP status, human message, and an API-specific reason word."""

    def __init__(self, status: int, message: str, reason: str | None = None, details: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.details = details


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json", headers=headers)


def google_error(err: ApiError) -> Response:
    """The JSON error body Google REST APIs return (google.api_core parses `error.message`/`status`)."""
    status_name = err.reason or GOOGLE_STATUS.get(err.status, "UNKNOWN")
    body = {
        "error": {
            "code": err.status,
            "message": err.message,
            "status": status_name,
            "errors": [{"message": err.message, "domain": "global",
                        "reason": getattr(err, "error_reason", None) or status_name}],
        }
    }
    if isinstance(err.details, list):  # google.rpc details, e.g. ErrorInfo of a scope refusal
        body["error"]["details"] = err.details
    return json_response(body, err.status)


def read_json(request: Request) -> Any:
    raw = request.get_data(cache=True)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from exc


# --- routing -------------------------------------------------------------------------------------

ROUTES_ATTR = "_sandbox_routes"
ROUTE_KEY = "sandbox.route"  # environ: (endpoint, path variables) of the matched route, set once per call
FAULT_KEY = "sandbox.fault"  # environ: the FaultRule drawn for the call, or None


def route(methods: str | tuple[str, ...], templates: str | tuple[str, ...], endpoint: str, **options):
    """Declare, on the handler itself, that it answers API method `endpoint` for HTTP `methods` ("*": any) on each
    path template (werkzeug rule syntax: `<zone>`, `<path:rest>`; `options` go to its `Rule`, e.g.
    `defaults`). Stack several on one handler. The handler is called as `handler(request, **path_vars)`."""
    methods = () if methods == "*" else (methods,) if isinstance(methods, str) else tuple(methods)
    templates = (templates,) if isinstance(templates, str) else tuple(templates)

    def mark(handler):
        # Decorators apply bottom-up: prepend, so the routes keep the order they are written in.
        declared = [(methods, template, endpoint, options) for template in templates]
        setattr(handler, ROUTES_ATTR, declared + list(getattr(handler, ROUTES_ATTR, [])))
        return handler

    return mark


def declared_routes(owner) -> list[tuple[tuple[str, ...], str, str, dict, Callable[..., Response]]]:
    """Every `@route` of `owner`'s class (and its bases), in the order written, with the bound handler."""
    found, seen = [], set()
    for cls in reversed(type(owner).__mro__):
        for name, attr in vars(cls).items():
            if name in seen or not hasattr(attr, ROUTES_ATTR):
                continue
            seen.add(name)
            handler = getattr(owner, name)
            found += [(methods, template, endpoint, options, handler)
                      for methods, template, endpoint, options in getattr(attr, ROUTES_ATTR)]
    return found


def matched_route(environ: dict) -> tuple[str, dict] | None:
    """The (endpoint, path variables) a RoutedApp matched for this call; None if no route matched."""
    return environ.get(ROUTE_KEY)


def injected_fault(request: Request) -> "FaultRule | None":
    """The fault drawn for this call (a handler acts on `partial` ones itself, e.g. hiding a zone)."""
    return request.environ.get(FAULT_KEY)


class RoutedApp:
    """A WSGI app built from the `@route`-decorated handlers of one emulator, plus its error renderer.

    The path is matched once per call (werkzeug `Map`): the handler gets the path variables as keyword
    arguments, `before` and `limiter` find them in `request.url_args`, stats.py in `matched_route`.
    With a `FaultInjector` (`inject_faults`), every call that passed `before` and `limiter` first draws
    a fault for its API method name (`method_name(endpoint, path_vars)`, the endpoint by default) and
    suffers it. A `limiter` (set as an attribute, see quota.py) is charged after `before` and may refuse.
    """

    limiter: Callable[[Request, str], None] | None = None
    faults: "FaultInjector | None" = None

    def __init__(
        self,
        owner,
        render_error: Callable[[ApiError], Response] = google_error,
        before: Callable[[Request, str], None] | None = None,
        converters: dict | None = None,
        strict_slashes: bool = True,
    ):
        rules, self.handlers = [], {}
        for methods, template, endpoint, options, handler in declared_routes(owner):
            rules.append(Rule(template, endpoint=endpoint, methods=list(methods) or None, **options))
            if self.handlers.setdefault(endpoint, handler) is not handler:
                raise ValueError(f"endpoint {endpoint!r} is routed to two handlers")
        self.url_map = Map(rules, converters=converters, strict_slashes=strict_slashes)
        self.render_error = render_error
        self.before = before
        self.method_name: Callable[[str, dict], str] = lambda endpoint, args: endpoint

    @property
    def endpoints(self) -> list[str]:
        """The API methods this app answers, in the order they are declared."""
        return list(self.handlers)

    def inject_faults(self, world, methods: list[str] | None = None,
                      method_name: Callable[[str, dict], str] | None = None) -> "FaultInjector":
        """Give this app a fault injector over `methods` (default: its endpoints) and return it;
        `method_name(endpoint, path_vars)` names a call's API method when endpoints are not names
        of their own (the Kubernetes API's `PLURAL.VERB`)."""
        self.faults = FaultInjector(world, methods if methods is not None else self.endpoints)
        if method_name is not None:
            self.method_name = method_name
        return self.faults

    def __call__(self, environ, start_response):
        request = Request(environ)
        adapter = self.url_map.bind_to_environ(environ)
        try:
            try:
                endpoint, args = adapter.match()
            except NotFound as exc:
                raise ApiError(404, f"no such path: {request.path}") from exc
            except MethodNotAllowed as exc:
                raise ApiError(405, f"method {request.method} not allowed on {request.path}") from exc
            environ[ROUTE_KEY] = (endpoint, args)
            request.url_args = args  # the `before` hook authorizes per resource
            if self.before is not None:
                self.before(request, endpoint)
            if self.limiter is not None:
                self.limiter(request, endpoint)
            fault = None
            if self.faults is not None:
                fault = self.faults.draw(self.method_name(endpoint, args), request)
                environ[FAULT_KEY] = fault  # handlers may act on it (e.g. a partial listing)
            if fault is not None:
                self.faults.before_call(fault)
            response = self.handlers[endpoint](request, **args)
            if fault is not None and response.status_code < 400:
                self.faults.after_call(fault, environ)
        except ApiError as err:
            response = self.render_error(err)
        except HTTPException as exc:  # e.g. werkzeug's own RequestRedirect
            response = exc.get_response(environ)
        return response(environ, start_response)


class FaultyEmulator:
    """What every emulator with a `faults` injector offers the rest of the sandbox and its tests."""

    faults: "FaultInjector"

    def clear_faults(self) -> None:
        self.faults.clear()

    def fail_next(self, method: str, status: int, count: int = 1) -> None:
        """Make the next `count` calls of API method `method` (e.g. "instances.aggregatedList") answer `status`."""
        self.faults.add({"method": method, "status": status, "count": count})


# --- fault injection ------------------------------------------------------------------------------

FAULT_KINDS = ("error", "latency", "timeout", "drop", "partial")
DROP_AFTER = ("status", "close", "timeout")


@dataclass
class FaultRule:
    """One kind of trouble for the calls of the API methods matching `method` (fnmatch, `*` = all).

    - error: answer `status` (429, 500, 503, ...) without doing anything;
    - latency: wait `seconds`, then serve the call normally;
    - timeout: wait `seconds` (past the client's timeout), then answer 504; nothing is applied;
    - drop: apply the call, then lose the answer: `after` = "status" answers `status` (503),
      "close" resets the connection, "timeout" waits `seconds` and answers 504
      ("did it happen?");
    - partial: a listing leaves items out (the handler decides which; compute hides a zone).

    A rule fires for the next `count` matching calls (None = no limit) with `probability`;
    `principal` "product" limits it to calls made with the functions' own token, "any" to all.
    """

    method: str
    kind: str = "error"
    status: int = 503
    count: int | None = 1
    probability: float = 1.0
    seconds: float = 0.0
    after: str = "status"
    principal: str = "any"
    zone: str = ""  # partial: the zone to hide (default: any zone that has instances)
    mark: bool = True  # partial: report the hidden zone as unreachable (False: leave it out silently)
    injected: int = 0

    @classmethod
    def from_spec(cls, spec: dict, known: Callable[[str], bool]) -> "FaultRule":
        try:
            count = spec.get("count", None if "probability" in spec else 1)
            rule = cls(
                method=str(spec["method"]), kind=str(spec.get("kind", "error")),
                status=int(spec.get("status", 504 if spec.get("kind") == "timeout" else 503)),
                count=None if count is None else int(count), probability=float(spec.get("probability", 1.0)),
                seconds=float(spec.get("seconds", 0.0)), after=str(spec.get("after", "status")),
                principal=str(spec.get("principal", "any")), zone=str(spec.get("zone", "")),
                mark=bool(spec.get("mark", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(400, f"bad fault spec {spec!r}: {exc}") from exc
        problems = []
        if rule.kind not in FAULT_KINDS:
            problems.append(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if rule.after not in DROP_AFTER:
            problems.append(f"after must be one of {', '.join(DROP_AFTER)}")
        if not 0 <= rule.probability <= 1:
            problems.append("probability must be within [0, 1]")
        if rule.principal not in ("any", "product"):
            problems.append("principal must be 'any' or 'product'")
        if rule.kind in ("error", "drop") and not 400 <= rule.status <= 599:
            problems.append("status must be an HTTP error status")
        if not known(rule.method):
            problems.append(f"method {rule.method!r} matches no method of this API")
        if problems:
            raise ApiError(400, f"bad fault spec {spec!r}: " + "; ".join(problems))
        return rule

    def matches(self, method: str) -> bool:
        return fnmatch.fnmatchcase(method, self.method)


class FaultInjector:
    """The faults one emulator suffers, plus call and injection counters for the figures.

    Thread-safe; sleeps end early when the faults are cleared, so a stalled call never outlives a test.
    """

    def __init__(self, world, methods: Callable[[], list[str]] | list[str], seed: int | None = None):
        self.world = world
        self._methods = methods
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._random = random.Random(seed)
        self._wake = threading.Event()
        self.calls: dict[str, int] = {}
        self.injected: dict[str, dict[str, int]] = {}

    def methods(self) -> list[str]:
        return list(self._methods() if callable(self._methods) else self._methods)

    def known(self, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(m, pattern) for m in self.methods())

    def add(self, spec: dict) -> FaultRule:
        rule = FaultRule.from_spec(spec, self.known)
        with self._lock:
            if "seed" in spec:
                self._random.seed(spec["seed"])
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget every rule and wake the calls that are sleeping in one."""
        with self._lock:
            self._rules.clear()
            self._wake.set()
            self._wake = threading.Event()

    def reset_counters(self) -> None:
        with self._lock:
            self.calls.clear()
            self.injected.clear()

    def draw(self, method: str, request: Request) -> FaultRule | None:
        """Count the call and pick the first rule that fires for it (a rule's count is spent here)."""
        product = self._is_product(request)
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            for rule in self._rules:
                if not rule.matches(method) or (rule.principal == "product" and not product):
                    continue
                if rule.count is not None and rule.count <= 0:
                    continue
                if rule.probability < 1 and self._random.random() >= rule.probability:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                rule.injected += 1
                per_method = self.injected.setdefault(method, {})
                per_method[rule.kind] = per_method.get(rule.kind, 0) + 1
                return rule
        return None

    def _is_product(self, request: Request) -> bool:
        """Whether the functions' account made the call (whatever token the metadata server gave it)."""
        token = request.headers.get("Authorization", "").partition(" ")[2].strip()
        principal = self.world.principal_of(token) if hasattr(self.world, "principal_of") else None
        return principal is not None and principal.email == getattr(self.world, "service_account", None)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            wake = self._wake
        wake.wait(seconds)

    def before_call(self, rule: FaultRule) -> None:
        if rule.kind == "latency":
            self.sleep(rule.seconds)
        elif rule.kind == "timeout":
            self.sleep(rule.seconds)
            raise ApiError(rule.status, "Injected timeout (sandbox fault): the call was not applied.")
        elif rule.kind == "error":
            raise ApiError(rule.status, f"Injected failure (sandbox fault), status {rule.status}.")

    def after_call(self, rule: FaultRule, environ: dict) -> None:
        """A `drop`: the call was applied; now lose its answer."""
        if rule.kind != "drop":
            return
        if rule.after == "close":
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise ConnectionAbortedError("sandbox fault: connection dropped after the call was applied")
        if rule.after == "timeout":
            self.sleep(rule.seconds)
            raise ApiError(504, "Injected timeout after the call was applied (sandbox fault).")
        raise ApiError(rule.status, "Injected failure after the call was applied (sandbox fault).")

    def stats(self) -> dict:
        with self._lock:
            return {
                "calls": dict(sorted(self.calls.items())),
                "injected": {m: dict(k) for m, k in sorted(self.injected.items())},
                "rules": [asdict(r) for r in self._rules],
            }


def serve(app, host: str, port: int, ssl_context=None, name: str = "http") -> BaseWSGIServer:
    """Start a threaded HTTP/1.1 server for `app` in a daemon thread and return it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(host, port, app, threaded=True, ssl_context=ssl_context)
    thread = threading.Thread(target=server.serve_forever, name=f"serve-{name}", daemon=True)
    thread.start()
    return server
