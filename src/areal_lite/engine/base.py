"""The engine boundary: what the proxy and the trainer may ask of an inference engine.

The proxy only ever sees this Protocol, so it never learns whether tokens come from
SGLang servers over HTTP or from the in-process torch engine.

Exceptions::

    EngineError                  any failure the engine reports
    ├── EngineUnavailable        no server reachable / engine closed  (proxy: 503)
    ├── ContextLengthExceeded    prompt + max_new_tokens too long     (proxy: 400)
    ├── EngineRejected           the engine refused a value of the    (proxy: 400)
    │                            request; the client's fault: never
    │                            retried elsewhere, no server blamed
    └── GenerationAborted        the server aborted the request: its partial output
                                 is not a finished completion (its episode fails)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol, runtime_checkable

from areal_lite.engine.stats import EngineStats
from areal_lite.types import GenerateRequest, GenerateResult, TokenChunk


class EngineError(RuntimeError):
    """The engine could not produce a completion."""


class EngineUnavailable(EngineError):
    """No inference server could be reached (or the engine is closed)."""


class ContextLengthExceeded(EngineError):
    """The prompt plus max_new_tokens does not fit the model's context."""


_ADDRESS = re.compile(
    r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+"  # a URL
    r"|\[[0-9a-fA-F:.]+\](?::\d+)?"  # [IPv6]:port
    # host:port, where the host looks like one: dotted, localhost, or a node name with a
    # digit or a dash and a 4-5 digit port ("gpu-node-1:30001"); not "top_k:40", "step:12"
    r"|\b(?:localhost|[\w-]+(?:\.[\w-]+)+):\d{2,5}\b"
    r"|\b[a-zA-Z][\w]*(?:-[\w]+|\d)+:\d{4,5}\b")
MAX_REJECTION_CHARS = 500  # of the engine's message kept (SGLang may echo the whole prompt)


def scrub_addresses(text: str) -> str:
    """`text` with URLs and host:port pairs replaced by `<engine>` (clients never learn
    where the engine runs), cut to MAX_REJECTION_CHARS."""
    text = _ADDRESS.sub("<engine>", text)
    if len(text) > MAX_REJECTION_CHARS:
        text = text[:MAX_REJECTION_CHARS] + "..."
    return text


class EngineRejected(EngineError):
    """The engine refused a value of the request (an out-of-range sampling parameter, a
    token id outside its vocabulary): the client's fault, so the proxy answers 400 and
    no other server is tried. `message` is the engine's own, scrubbed of internal
    addresses (`scrub_addresses`); `server` says which engine refused, for logs only."""

    def __init__(self, message: str, server: str | None = None) -> None:
        self.message = scrub_addresses(message)
        self.server = server
        super().__init__(f"{server} rejected the request: {self.message}" if server
                         else self.message)

    def __reduce__(self):  # pickles as constructed (exceptions pickle `args` by default)
        return type(self), (self.message, self.server)


class GenerationAborted(EngineError):
    """The server aborted the request for a reason that resubmitting would not fix
    (`/abort_request`, a server-side limit). Never export the partial output."""


@runtime_checkable
class SessionAware(Protocol):
    """An engine that keeps per-episode state (routing bindings, aborts seen)."""

    def end_session(self, session_id: str) -> str | None:
        """Forget the episode; returns why one of its requests was aborted, if one was."""
        ...


@runtime_checkable
class Engine(Protocol):
    """Token-in, token-out generation with pause, weight swap and versions.

    Contract:
    - `generate` returns when the request finishes; `stream` yields `TokenChunk`s
      with the *new* tokens as they are sampled and ends with one chunk whose
      `finish_reason` is set. Concatenating the chunks equals `generate`'s result.
    - Logprobs are of the sampled token under the temperature-1 distribution of the
      weights that sampled it; `versions` names those weights per token.
    - While paused, requests in flight stop between tokens and new requests wait;
      after `resume` they continue (with new weights if they were swapped).
    - Cancelling a `generate`/`stream` task aborts the request on the engine.
    """

    @property
    def version(self) -> int:
        """Current weight version (starts at 0, +1 per update)."""
        ...

    @property
    def max_context_len(self) -> int:
        """Prompt + output tokens one request may hold."""
        ...

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the work totals since start (engine/stats.py); the trainer logs
        the difference between two snapshots as `engine/*`."""
        ...

    async def generate(self, req: GenerateRequest) -> GenerateResult: ...

    def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def update_weights(
        self,
        named_tensors: Mapping[str, object] | Iterable[tuple[str, object]],
        version: int,
    ) -> None:
        """Install new weights (call between pause and resume) and set the version."""
        ...

    async def close(self) -> None: ...
