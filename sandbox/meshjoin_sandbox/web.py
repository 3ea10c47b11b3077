"""Small HTTP toolkit shared by the sandbox emulators (werkzeug routing + threaded server).

Every emulator is a WSGI app built from a `werkzeug.routing.Map`; handlers take
`(request, **url_args)` and return a `Response` or raise `ApiError`, which each emulator
renders in its own API's error format (Google JSON error or Kubernetes Status).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map
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
            "errors": [{"message": err.message, "domain": "global", "reason": status_name}],
        }
    }
    return json_response(body, err.status)


def read_json(request: Request) -> Any:
    raw = request.get_data(cache=True)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from exc


class RoutedApp:
    """A WSGI app: a werkzeug Map whose endpoints are bound methods, plus an error renderer."""

    def __init__(
        self,
        url_map: Map,
        handlers: dict[str, Callable[..., Response]],
        render_error: Callable[[ApiError], Response] = google_error,
        before: Callable[[Request, str], None] | None = None,
    ):
        self.url_map = url_map
        self.handlers = handlers
        self.render_error = render_error
        self.before = before

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
            if self.before is not None:
                self.before(request, endpoint)
            response = self.handlers[endpoint](request, **args)
        except ApiError as err:
            response = self.render_error(err)
        except HTTPException as exc:  # e.g. werkzeug's own RequestRedirect
            response = exc.get_response(environ)
        return response(environ, start_response)


def serve(app, host: str, port: int, ssl_context=None, name: str = "http") -> BaseWSGIServer:
    """Start a threaded HTTP/1.1 server for `app` in a daemon thread and return it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(host, port, app, threaded=True, ssl_context=ssl_context)
    thread = threading.Thread(target=server.serve_forever, name=f"serve-{name}", daemon=True)
    thread.start()
    return server
