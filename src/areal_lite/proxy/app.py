"""Proxy: the OpenAI- and Anthropic-compatible front door of the rollout engine.

Routes (same handlers over TCP and in process):

    GET  /v1/models                        any session key or the admin key
    POST /v1/chat/completions              session key -> that session's tree only
    POST /v1/messages                      the same, Anthropic Messages API (messages.py)
    POST /v1/responses                     the same, OpenAI Responses API (responses.py)
    POST /admin/sessions                   admin key: start a session -> {session_id, api_key}
    POST /admin/sessions/{id}/reward       admin key: {"reward": x, "completion_id": optional}
    POST /admin/sessions/{id}/end          admin key: end it, export -> {"samples": [...]}
    GET  /admin/stats                      admin key: counters

Errors are OpenAI-shaped JSON (Anthropic-shaped on /v1/messages): 400 malformed body
(naming the field), 401 any key that is not valid for the route (the same reply whatever
the key is), 404 unknown route or session, 413 body too large, 408 body too slow, 502/503
the engine failed (no internal detail in the reply). The key is checked from the headers
before the body is read (`authorize`). Session keys arrive as `Authorization: Bearer` or
`x-api-key`. Engine failures are logged once per kind with a traceback, then counted.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import httpx2
import msgspec
from aiohttp import web

from areal_lite.engine.base import Engine
from areal_lite.proxy.chat import ChatCompletions, ChatDefaults
from areal_lite.proxy.http import (
    ApiError,
    InProcessTransport,
    ProxyRequest,
    ProxyResponse,
    json_response,
    make_aiohttp_app,
)
from areal_lite.proxy.messages import Messages, anthropic_error_response
from areal_lite.proxy.render import ChatRenderer
from areal_lite.proxy.responses import Responses
from areal_lite.proxy.sessions import Session, SessionTable
from areal_lite.types import Sample

log = logging.getLogger(__name__)

Exporter = Callable[[Session], list[Sample]]


class ProxyServer:
    """Owns the sessions, the chat endpoint and (while entered) a loopback TCP server.

    `async with ProxyServer(...) as proxy:` listens on `host:port` (port 0 picks a free
    one); `proxy.base_url` is the `/v1` URL for agents, `proxy.http_client()` an
    in-process `httpx2.AsyncClient` for inline agents.
    """

    def __init__(self, *, engine: Engine, renderer: ChatRenderer, exporter: Exporter,
                 host: str = "127.0.0.1", port: int = 0, model_name: str = "default",
                 tool_parser: str = "none", reasoning: bool = False,
                 defaults: ChatDefaults = ChatDefaults(), max_request_mb: float = 16,
                 body_timeout_s: float = 30.0, idle_timeout_s: float = 30.0,
                 render_offload_chars: int = 1 << 16) -> None:
        self.sessions = SessionTable()
        self.body_timeout_s = body_timeout_s  # a request body must arrive within this
        self.idle_timeout_s = idle_timeout_s  # a connection without a request is closed
        # big renders run here, one at a time, so they never stall the loop
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="proxy-render")
        self.engine = engine
        self.exporter = exporter
        self.model_name = model_name
        self.host, self.port = host, port
        self.max_request_bytes = int(max_request_mb * (1 << 20))
        self.chat = ChatCompletions(engine=engine, renderer=renderer, sessions=self.sessions,
                                    defaults=defaults, model_name=model_name,
                                    tool_parser=tool_parser, reasoning=reasoning,
                                    offload_chars=render_offload_chars,
                                    render_pool=self._render_pool)
        self.messages = Messages(self.chat)
        self.responses = Responses(self.chat)
        self.num_errors: dict[int, int] = {}  # HTTP status -> count of error replies
        self.num_failures: dict[str, int] = {}  # 5xx kind (route, message, type) -> count
        self._admin_key = self.sessions.admin_key.encode()
        # path prefix -> handler(req, path): routes other modules add (tokens.py, online.py)
        self.mounts: dict[str, Callable[[ProxyRequest, str], Awaitable[ProxyResponse]]] = {}
        self._runner: web.AppRunner | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> ProxyServer:
        app = make_aiohttp_app(self.dispatch, refuse=self.refuse, reject=self.reject,
                               max_request_bytes=self.max_request_bytes,
                               body_timeout_s=self.body_timeout_s)
        # keepalive_timeout also bounds a connection that never completes its headers;
        # a refused request's unread body is drained (never stored) for at most
        # `lingering_time`, so its client reads the reply instead of a reset
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.idle_timeout_s,
                                     lingering_time=min(2.0, self.body_timeout_s))
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._render_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def http_client(self, **kwargs) -> httpx2.AsyncClient:
        """An httpx2 client whose requests are served in process (no socket)."""
        transport = InProcessTransport(self.dispatch, refuse=self.refuse, reject=self.reject,
                                       max_request_bytes=self.max_request_bytes)
        return httpx2.AsyncClient(transport=transport, **kwargs)

    # --- dispatch --------------------------------------------------------------------

    async def dispatch(self, req: ProxyRequest) -> ProxyResponse:
        try:
            resp = await self._route(req)
        except ApiError as e:
            if e.engine_error is not None:
                self._log_failure(f"{req.path}: {e.message}", e.engine_error)
            resp = error_response(req.path, e)
        except Exception as e:  # a bug in a handler must not kill the server; report 500
            self._log_failure(f"handler failed on {req.method} {req.path}", e)
            resp = error_response(req.path, ApiError(500, "internal proxy error",
                                                     type="server_error"))
        return self.count(resp)

    def refuse(self, req: ProxyRequest) -> ProxyResponse | None:
        """The reply to a request its headers already disqualify, or None."""
        err = self.authorize(req)
        return None if err is None else self.reject(req.path, err)

    def reject(self, path: str, err: ApiError) -> ProxyResponse:
        return self.count(error_response(path, err))

    def count(self, resp: ProxyResponse) -> ProxyResponse:
        if resp.status >= 400:
            self.num_errors[resp.status] = self.num_errors.get(resp.status, 0) + 1
        return resp

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """The first failure of each kind with its traceback; the rest are counted
        (`stats()["failures"]`), so a failing engine does not flood the log."""
        kind = f"{what} ({type(exc).__name__})"
        n = self.num_failures[kind] = self.num_failures.get(kind, 0) + 1
        if n == 1:
            log.error("proxy: %s; further failures of this kind are only counted "
                      "(/admin/stats)", kind, exc_info=exc)

    def authorize(self, req: ProxyRequest) -> ApiError | None:
        """Refuse a request from its headers alone (before its body is read): None when
        its key may use its route."""
        path = req.path.rstrip("/")
        key = req.bearer()
        if path.startswith("/admin/") or (path == "/v1/models" and self._is_admin(key)):
            return None if self._is_admin(key) else _bad_key()
        if path.startswith("/v1/") and (not key or self.sessions.by_key(key) is None):
            return _bad_key()
        return None

    def _is_admin(self, key: str | None) -> bool:
        return key is not None and hmac.compare_digest(key.encode(), self._admin_key)

    async def _route(self, req: ProxyRequest) -> ProxyResponse:
        err = self.authorize(req)
        if err is not None:
            raise err
        path = req.path.rstrip("/")
        for prefix, handler in self.mounts.items():
            if path.startswith(prefix):
                return await handler(req, path)
        if path == "/v1/chat/completions" and req.method == "POST":
            session = self._session_for(req)
            return await self.chat.handle(session, _json_body(req))
        if path == "/v1/messages" and req.method == "POST":
            session = self._session_for(req)
            return await self.messages.handle(session, _json_body(req))
        if path == "/v1/responses" and req.method == "POST":
            session = self._session_for(req)
            return await self.responses.handle(session, _json_body(req))
        if path == "/v1/models" and req.method == "GET":
            return json_response({"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "areal-lite", "max_model_len": self.engine.max_context_len}]})
        if path.startswith("/admin/"):
            return await self._admin(req, path)
        raise ApiError(404, f"unknown route {req.method} {req.path}", code="not_found")

    def _session_for(self, req: ProxyRequest) -> Session:
        key = req.bearer()
        session = self.sessions.by_key(key) if key else None
        if session is None:  # ended while its body was read
            raise _bad_key()
        return session

    # --- admin -----------------------------------------------------------------------

    async def _admin(self, req: ProxyRequest, path: str) -> ProxyResponse:
        parts = path.split("/")  # ["", "admin", "sessions", id, verb]
        if path == "/admin/stats" and req.method == "GET":
            return json_response(self.stats())
        if path == "/admin/sessions" and req.method == "POST":
            session = self.sessions.start()
            return json_response({"session_id": session.id, "api_key": session.key})
        if len(parts) == 5 and parts[2] == "sessions" and req.method == "POST":
            session = self.sessions.by_id(parts[3])
            if session is None:
                raise ApiError(404, f"unknown session {parts[3]!r}", code="not_found")
            if parts[4] == "reward":
                set_reward_from_body(session, _json_body(req))
                return json_response({"ok": True})
            if parts[4] == "end":
                samples = self.exporter(self.sessions.end(session.id))
                return ProxyResponse(status=200, body=msgspec.json.encode({"samples": samples}))
        raise ApiError(404, f"unknown admin route {req.method} {req.path}", code="not_found")

    def stats(self) -> dict:
        return {"sessions_live": len(self.sessions), "sessions_started": self.sessions.num_started,
                "prefix_breaks": self.sessions.num_prefix_breaks,
                "errors": {str(k): v for k, v in self.num_errors.items()},
                "failures": dict(self.num_failures)}


def set_reward_from_body(session: Session, body: object) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    reward = body.get("reward")
    if isinstance(reward, int) and not isinstance(reward, bool) and abs(reward) < 1 << 1000:
        reward = float(reward)  # ints past float range (309+ digits) are not finite numbers
    if not isinstance(reward, float) or not math.isfinite(reward):
        raise ApiError(400, f"'reward' must be a finite number, got {reward!r:.50}",
                       param="reward")
    key = body.get("completion_id")
    try:
        if key is None:
            session.cache.set_last_reward(float(reward))
        else:
            session.cache.set_reward(str(key), float(reward))
    except (KeyError, ValueError) as e:
        raise ApiError(400, str(e).strip("'\""), param="completion_id") from None


def _bad_key() -> ApiError:
    return ApiError(401, "invalid API key for this route", code="invalid_api_key")


def error_response(path: str, e: ApiError) -> ProxyResponse:
    """The error in the shape the caller's SDK parses: Anthropic's on /v1/messages."""
    if path.rstrip("/").startswith("/v1/messages"):
        return anthropic_error_response(e)
    return e.response()


def _json_body(req: ProxyRequest) -> object:
    if not req.body:
        raise ApiError(400, "request body is empty; expected JSON")
    try:
        return msgspec.json.decode(req.body)
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is JSON nested too deeply") from None
