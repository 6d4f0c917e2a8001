"""What every request passes before any route runs (ASGI middlewares) and OpenAI-shaped errors.

`Guard`: the Host header must name this server (against DNS rebinding), a browser's cross-origin
request is refused unless its Origin is allowed (CORS), and with API keys every route but the
open ones needs one. `BodyLimit`: a request body over the cap gets 413, declared or streamed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from .metrics import Metrics

IMAGE_ROUTES = ("/v1/images/generations", "/v1/images/edits")
OPEN_ROUTES = ("/health", "/")  # no key needed: the page holds no data, it asks for the key


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error", code=code), status, headers=headers)


def hosts_for(bind_host: str, allowed: Iterable[str] = ()) -> set[str]:
    """The names a request's Host header may give: the bound host, `allowed`, and `localhost` with a
    loopback address. Binding every interface ("0.0.0.0", "::") also admits any IP address (see
    Guard). A "*" in `allowed` admits every name (behind a proxy that checks them)."""
    names = {bind_host.lower().strip("[]")} | {a.lower().strip("[]") for a in allowed}
    if names & {"127.0.0.1", "::1", "0.0.0.0", "::", ""}:  # every interface includes the loopback one
        names.add("localhost")
    if "localhost" in names:
        names |= {"127.0.0.1", "::1"}
    return names


def host_name(host_header: str) -> str:
    """"example.com:8000" -> "example.com", "[::1]:8000" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def key_digest(key: str) -> bytes:
    # Keys are compared as digests: equal lengths, so the comparison's time says nothing about the key.
    return hashlib.sha256(key.encode()).digest()


class Guard:
    """ASGI middleware, the outermost: refuses a request before anything reads its body.

    - Host: the header must name this server (`hosts`), else 421. A web page on another domain that
      re-resolves its name to 127.0.0.1 (DNS rebinding) sends its own name, so it is refused.
    - Origin: a browser's request from another origin (an Origin header that is not this server's own
      scheme://host) is refused with 403, a "simple" form POST included, unless `cors_origins`
      allows it ("*": any); allowed ones get CORS headers, and their preflight (OPTIONS) an answer.
    - API keys: with `keys`, every route but /health and the page needs `Authorization: Bearer KEY`.
    It also counts every answer by route and status in `metrics`.
    """

    def __init__(self, app: Any, hosts: set[str], any_ip: bool, cors_origins: set[str], keys: list[str],
                 metrics: Metrics, routes: set[str]) -> None:
        self.app, self.hosts, self.any_ip, self.cors, self.metrics = app, hosts, any_ip, cors_origins, metrics
        self.keys = [key_digest(f"Bearer {k}") for k in keys]
        self.routes = routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"  # a bounded set of labels, whatever the paths asked
        status = 500
        cors_headers: list[tuple[bytes, bytes]] = []

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *cors_headers]}
            await send(message)

        t0 = time.perf_counter()
        image_route = route in IMAGE_ROUTES
        if image_route:
            self.metrics.in_progress.inc()
        try:
            headers = Headers(scope=scope)
            refusal = self.refusal(scope, headers)
            origin = headers.get("origin")
            if refusal is None and origin is not None and not self.same_origin(scope, headers):
                cors_headers = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                    refusal = Response(status_code=204, headers={
                        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                        "Access-Control-Allow-Headers": "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600"})
            if refusal is None:
                refusal = self.auth_refusal(path, headers)
            await (refusal or self.app)(scope, receive, counted_send)
        finally:
            if image_route:
                self.metrics.in_progress.dec()
                self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route, str(status)).inc()

    def same_origin(self, scope: dict, headers: Headers) -> bool:
        return headers.get("origin", "").lower() == f"{scope['scheme']}://{headers.get('host', '')}".lower()

    def refusal(self, scope: dict, headers: Headers) -> Response | None:
        """A response refusing the request's Host or Origin, or None when both are fine."""
        name = host_name(headers.get("host", ""))
        if not ("*" in self.hosts or name in self.hosts or (self.any_ip and is_ip(name))):
            return error_response(421, f"this server does not answer for host {name!r}; start it with "
                                       "--allowed-host to add a name", "invalid_host")
        origin = headers.get("origin")
        if origin is None or self.same_origin(scope, headers) or "*" in self.cors or origin in self.cors:
            return None
        return error_response(403, f"requests from origin {origin!r} are refused; start the server with "
                                   "--cors-origin to allow one", "origin_refused")

    def auth_refusal(self, path: str, headers: Headers) -> Response | None:
        if not self.keys or path in OPEN_ROUTES:
            return None
        given = key_digest(headers.get("authorization", ""))
        ok = False
        for key in self.keys:  # every key is compared, so the time says nothing about which matched
            ok |= hmac.compare_digest(given, key)
        if ok:
            return None
        return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")


class BodyLimit:
    """ASGI middleware: answer 413 once a request body passes `limit` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        response = JSONResponse(error_body(f"the request body is over {self.limit} bytes", "invalid_request_error",
                                           code="request_too_large"), status_code=413)
        await response({"type": "http"}, None, send)


class _BodyTooLarge(Exception):
    pass
