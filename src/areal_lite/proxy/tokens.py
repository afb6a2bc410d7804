"""Proxy: the token-level door, for agents that build their own prompts (no chat API).

    POST /v1/tokens/generate   session key
        {"input_ids": [int, ...], "max_new_tokens"?, "temperature"?, "top_p"?, "top_k"?,
         "stop_token_ids"?: [int, ...]}
     -> {"id", "output_ids", "logprobs", "versions", "finish_reason", "parent_id"}

The completion is recorded in the session's interaction tree like a chat completion: the
engine's exact token ids, logprobs and weight versions. Its parent is the longest earlier
completion of the session whose prompt + output tokens start `input_ids`, so an agent
that appends to its previous turn's tokens builds a chain, and export, turn discount and
rewards by completion id (`id`) work unchanged. `stop_token_ids` defaults to the chat
template's stop tokens (eos); sampling defaults are the run's `rollout.sampling`.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from areal_lite.engine.base import EngineError
from areal_lite.proxy.app import ProxyServer, _json_body
from areal_lite.proxy.chat import ChatCompletions, engine_api_error
from areal_lite.proxy.chat_request import _num
from areal_lite.proxy.http import ApiError, ProxyRequest, ProxyResponse, json_response
from areal_lite.proxy.sessions import Session
from areal_lite.types import CompletionNode, GenerateRequest, SamplingParams

ROUTE = "/v1/tokens/generate"


def _int_list(body: dict, key: str, vocab_hint: str) -> list[int]:
    value = body.get(key)
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise ApiError(400, f"'{key}' must be a list of non-negative token ids ({vocab_hint})",
                       param=key)
    return value


def find_parent(session: Session, input_ids: list[int]) -> str | None:
    """The longest recorded completion whose prompt + output tokens start `input_ids`."""
    best, best_len = None, 0
    for node in session.cache.nodes:
        n = len(node.prompt_ids) + len(node.output_ids)
        if best_len < n <= len(input_ids) and input_ids[:len(node.prompt_ids)] == node.prompt_ids \
                and input_ids[len(node.prompt_ids):n] == node.output_ids:
            best, best_len = node.id, n
    return best


class TokenGenerate:
    """`POST /v1/tokens/generate` over the chat endpoint's engine, defaults and sessions."""

    def __init__(self, chat: ChatCompletions) -> None:
        self.chat = chat

    async def handle(self, session: Session, body: object) -> ProxyResponse:
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        input_ids = _int_list(body, "input_ids", "the prompt, already tokenized")
        if not input_ids:
            raise ApiError(400, "'input_ids' must not be empty", param="input_ids")
        sampling = self._sampling(session, body, len(input_ids))
        rid = "tok-" + secrets.token_hex(12)
        parent_id = find_parent(session, input_ids)
        session.num_requests += 1
        session.num_inflight += 1
        try:
            res = await self.chat.engine.generate(GenerateRequest(
                rid=rid, input_ids=input_ids, sampling=sampling, session_id=session.id))
        except EngineError as e:
            raise engine_api_error(e) from None
        finally:
            session.num_inflight -= 1
        if not session.ended:  # the episode may have ended (timed out) while we generated
            session.cache.add(CompletionNode(
                id=rid, response_id=rid, parent_id=parent_id, prompt_ids=input_ids,
                output_ids=res.output_ids, logprobs=res.logprobs, versions=res.versions,
                finish_reason=res.finish_reason, max_new_tokens=sampling.max_new_tokens))
        return json_response({"id": rid, "output_ids": res.output_ids, "logprobs": res.logprobs,
                              "versions": res.versions, "finish_reason": res.finish_reason,
                              "parent_id": parent_id})

    def _sampling(self, session: Session, body: dict, prompt_len: int) -> SamplingParams:
        d, limit = self.chat.defaults, self.chat.engine.max_context_len
        room = limit - prompt_len
        max_new = _num(body, "max_new_tokens", min(d.max_new_tokens, max(room, 1)), 1, 1 << 20, int)
        if max_new > room:
            raise ApiError(400, f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) "
                           f"exceeds the model's context of {limit} tokens",
                           code="context_length_exceeded", param="input_ids")
        stops = (tuple(_int_list(body, "stop_token_ids", "token ids that end the generation"))
                 if "stop_token_ids" in body else tuple(self.chat.renderer.stop_token_ids))
        sampling = SamplingParams(
            max_new_tokens=max_new, temperature=_num(body, "temperature", d.temperature, 0, 2),
            top_p=_num(body, "top_p", d.top_p, 1e-9, 1), top_k=_num(body, "top_k", d.top_k, -1, 1 << 30, int),
            stop_token_ids=stops)
        if sampling.top_k == 0:
            raise ApiError(400, "'top_k' must be -1 (whole vocabulary) or >= 1, got 0", param="top_k")
        return replace(sampling, temperature=0.0) if session.greedy else sampling


def mount_tokens(proxy: ProxyServer) -> None:
    """Serve `POST /v1/tokens/generate` on `proxy`, session key required."""
    tokens = TokenGenerate(proxy.chat)

    async def handle(req: ProxyRequest, path: str) -> ProxyResponse:
        if path != ROUTE or req.method != "POST":
            raise ApiError(404, f"unknown route {req.method} {req.path}", code="not_found")
        return await tokens.handle(proxy._session_for(req), _json_body(req))

    proxy.mounts[ROUTE] = handle
