"""Rollout stage: gym-style environments and token-level agents, in the same tree.

An environment is any object with (the gymnasium signatures, awaited):

    async def reset(self, seed=None, options=None) -> (observation, info)
    async def step(self, action) -> (observation, reward, terminated, truncated, info)

Two workflows drive one, each an ordinary agent workflow (`run(data, **kwargs)`), so
export, turn discount and grouping never know which kind produced an episode:

- `ChatEnvWorkflow`: a chat agent. Observations become user turns, the model's reply is
  the action; each turn's `step` reward is keyed by that turn's completion id.
- `TokenEnvWorkflow`: a token-level agent that builds its own prompts and calls the
  proxy's `POST /v1/tokens/generate` (`TokenClient`): each turn's prompt is the previous
  prompt + sampled tokens + the next user turn's tokens, so the turns form one chain in
  the tree with the engine's exact ids, logprobs and versions.

The environment is made per episode by `env` (a class, a factory, or a dotted path) with
`env_kwargs`, and reset with `seed=data.get("seed")` and `options=data` (the dataset row).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from areal_lite.rollout.agent import _import_dotted


@runtime_checkable
class Environment(Protocol):
    """An async gym-style environment (see the module docstring)."""

    async def reset(self, seed: int | None = None,
                    options: dict | None = None) -> tuple[Any, dict]: ...

    async def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]: ...


@dataclass(slots=True)
class TokenCompletion:
    """One token-level generation, as recorded in the session's tree."""

    id: str  # completion id: key rewards by it
    output_ids: list[int]  # sampled tokens (incl. the stop token when one ended it)
    logprobs: list[float]  # one per output token
    versions: list[int]  # weight version per output token
    finish_reason: str  # "stop" | "length" | "abort"
    parent_id: str | None  # the earlier completion this one continues, if any


class TokenClient:
    """Token ids in, token ids out, through the proxy with this episode's session key."""

    def __init__(self, base_url: str, api_key: str, http_client: Any = None,
                 timeout_s: float = 600.0) -> None:
        self.url = base_url.rstrip("/") + "/tokens/generate"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self._client, self._own = http_client, http_client is None
        self.timeout_s = timeout_s

    async def generate(self, input_ids: list[int], **sampling: Any) -> TokenCompletion:
        """Sampling keys: max_new_tokens, temperature, top_p, top_k, stop_token_ids."""
        if self._client is None:
            import httpx2

            self._client = httpx2.AsyncClient(timeout=self.timeout_s)
        resp = await self._client.post(self.url, headers=self.headers,
                                       json={"input_ids": list(input_ids), **sampling})
        if resp.status_code != 200:
            raise RuntimeError(f"token generate failed ({resp.status_code}): {resp.text}")
        return TokenCompletion(**resp.json())

    async def aclose(self) -> None:
        if self._own and self._client is not None:
            await self._client.aclose()
            self._client = None


def make_env(env: Any, env_kwargs: dict | None) -> Environment:
    """Build one episode's environment from a class, factory or dotted path."""
    factory = _import_dotted(env) if isinstance(env, str) else env
    if not callable(factory):
        raise ValueError(f"env must be a class, a factory or a dotted path, got {env!r}")
    made = factory(**dict(env_kwargs or {}))
    if not isinstance(made, Environment):
        raise ValueError(f"env {env!r} made {type(made).__name__}, which lacks "
                         "`async reset(seed, options)` / `async step(action)`")
    return made


async def _maybe_close(env: Any) -> None:
    close = getattr(env, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result


class _EnvWorkflow:
    def __init__(self, env: Any, env_kwargs: dict | None = None, max_turns: int = 4,
                 max_tokens: int = 256, model: str = "default") -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.env, self.env_kwargs = env, dict(env_kwargs or {})
        self.max_turns, self.max_tokens, self.model = max_turns, max_tokens, model

    async def run(self, data: dict, **kwargs: Any) -> dict[str, float]:
        env = make_env(self.env, self.env_kwargs)
        try:
            observation, _ = await env.reset(seed=data.get("seed"), options=data)
            return await self.episode(env, str(observation), **kwargs)
        finally:
            await _maybe_close(env)


class ChatEnvWorkflow(_EnvWorkflow):
    """A chat agent on an environment: observations are user turns, replies are actions."""

    async def episode(self, env: Environment, observation: str, **kwargs: Any) -> dict[str, float]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        messages, rewards = [{"role": "user", "content": observation}], {}
        for _ in range(self.max_turns):
            resp = await client.chat.completions.create(model=self.model, messages=messages,
                                                        max_tokens=self.max_tokens)
            reply = resp.choices[0].message.content or ""
            observation, reward, terminated, truncated, _ = await env.step(reply)
            rewards[resp.id] = float(reward)
            if terminated or truncated:
                break
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": str(observation)}]
        return rewards


class TokenEnvWorkflow(_EnvWorkflow):
    """A token-level agent on an environment: it renders its own prompts (the model's chat
    template, extended turn by turn at the token level) and generates token ids.

    `model_path` names the tokenizer (the run's `actor.path`).
    """

    def __init__(self, env: Any, model_path: str, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.model_path = model_path
        self._tokenizer = None

    def __getstate__(self) -> dict:  # subprocess mode: the worker loads its own tokenizer
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from areal_lite.models import load_tokenizer, resolve_model_dir

            self._tokenizer = load_tokenizer(resolve_model_dir(self.model_path))
        return self._tokenizer

    async def episode(self, env: Environment, observation: str, **kwargs: Any) -> dict[str, float]:
        tok = self.tokenizer
        client = TokenClient(kwargs["base_url"], kwargs["api_key"], kwargs.get("http_client"))
        input_ids = tok.apply_chat_template([{"role": "user", "content": observation}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        next_turn = NextTurn(tok)
        rewards: dict[str, float] = {}
        try:
            for _ in range(self.max_turns):
                out = await client.generate(input_ids, max_new_tokens=self.max_tokens)
                action = tok.decode(out.output_ids, skip_special_tokens=True)
                observation, reward, terminated, truncated, _ = await env.step(action)
                rewards[out.id] = float(reward)
                if terminated or truncated:
                    break
                input_ids = input_ids + out.output_ids + next_turn(out.output_ids, str(observation))
        finally:
            await client.aclose()
        return rewards


class NextTurn:
    """Tokens that follow an assistant reply to open the next user turn and the next
    assistant turn, derived once from the chat template (so they match what the template
    would render around a reply: e.g. ChatML's "\\n<|im_start|>user\\n...")."""

    _MARK = "\x00REPLY\x00"

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": self._MARK}]
        head = tokenizer.apply_chat_template(base, tokenize=False)
        self._tail = head[head.rindex(self._MARK) + len(self._MARK):]  # "<|im_end|>\n"
        self._head, self._base = head, base
        self._eos = tokenizer.eos_token or ""

    def __call__(self, output_ids: list[int], user_text: str) -> list[int]:
        full = self.tok.apply_chat_template([*self._base, {"role": "user", "content": user_text}],
                                            add_generation_prompt=True, tokenize=False)
        if not full.startswith(self._head):
            raise ValueError("the chat template renders history differently once a turn "
                             "follows; render the whole prompt yourself for this model")
        tail = self._tail
        ended = bool(output_ids) and self.tok.decode(output_ids[-1:]) == self._eos
        if ended and tail.startswith(self._eos):
            tail = tail[len(self._eos):]  # the sampled stop token already closed the reply
        return self.tok.encode(tail + full[len(self._head):], add_special_tokens=False)
