"""Records that pipeline stages hand each other: proxy -> engine -> cache -> export.

Everything here is a plain msgspec Struct with no behaviour beyond trivial helpers,
so every stage can be tested without the others.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    """How to sample one completion (the subset every engine supports)."""

    max_new_tokens: int = 128  # tokens to generate at most; 0 = score the prompt only
    temperature: float = 1.0  # < 1e-6 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # -1 = whole vocabulary
    stop_token_ids: tuple[int, ...] = ()  # generation ends when one is sampled (kept in output)
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text (engines that decode)
    ignore_eos: bool = False  # True disables all token-based stopping
    seed: int | None = None  # per-request sampling seed; None = engine's RNG

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6


class GenerateRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Token-in request to an inference engine."""

    rid: str  # unique request id (used for abort and logging)
    input_ids: list[int]  # full prompt, already rendered and tokenized
    sampling: SamplingParams
    session_id: str | None = None  # episode id, for session-affine routing


class TokenChunk(msgspec.Struct, kw_only=True):
    """Tokens produced since the previous chunk of a streamed generation.

    A stream ends with exactly one chunk whose `finish_reason` is set (it may carry
    tokens too).
    """

    output_ids: list[int]  # new tokens
    logprobs: list[float]  # one per new token, log p(token) at temperature 1
    versions: list[int]  # one per new token, weight version that sampled it
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    matched_stop: int | str | None = None  # stop token id or stop string that ended it


class GenerateResult(msgspec.Struct, kw_only=True):
    """A finished generation: what the engine sampled, token for token."""

    output_ids: list[int]  # sampled tokens, including the stop token if one ended it
    logprobs: list[float]  # one per output token
    versions: list[int]  # one per output token
    finish_reason: str  # "stop" | "length" | "abort"
    matched_stop: int | str | None = None
    prompt_tokens: int = 0  # len(input_ids)
    cached_tokens: int = 0  # prompt tokens served from a prefix cache, when known

    @classmethod
    def from_chunks(cls, chunks: list[TokenChunk], prompt_tokens: int) -> GenerateResult:
        """Concatenate the chunks of one stream into a result."""
        out = cls(output_ids=[], logprobs=[], versions=[], finish_reason="abort",
                  prompt_tokens=prompt_tokens)
        for c in chunks:
            out.output_ids.extend(c.output_ids)
            out.logprobs.extend(c.logprobs)
            out.versions.extend(c.versions)
            if c.finish_reason is not None:
                out.finish_reason = c.finish_reason
                out.matched_stop = c.matched_stop
        return out


class Span(msgspec.Struct, kw_only=True):
    """One completion's sampled tokens inside a `tree` sample, with its own reward."""

    start: int  # first position of the span in the sample's input_ids
    end: int  # one past its last position (end - start = the completion's output tokens)
    reward: float  # discounted reward R(node) of this completion
    raw_reward: float  # its reward as assigned, before discount (0.0 when none was given)
    completion_id: str  # the completion these tokens came from
    max_new_tokens: int = 0  # sampling limit of that completion's request; 0 = unknown


class Sample(msgspec.Struct, kw_only=True):
    """One training sample exported from an episode's interaction tree.

    `spans` is set by the `tree` export only: then each span is one advantage unit with
    its own reward (and `reward` is the leaf's, unused by the advantages); otherwise the
    sample is one unit with `reward`.
    """

    input_ids: list[int]  # prompt + sampled tokens (concat: the whole root-to-leaf path)
    loss_mask: list[int]  # 1 where the token was sampled by the policy and is trained
    logprobs: list[float]  # behaviour logprob per token (0.0 where loss_mask is 0)
    versions: list[int]  # weight version per token (-1 where not sampled)
    reward: float  # discounted reward of the completion (concat: of the leaf)
    raw_reward: float  # reward as assigned, before discount (0.0 when none was given)
    episode_id: str = ""  # the session that produced it
    completion_ids: list[str] = []  # completions this sample covers (concat: root..leaf)
    max_new_tokens: int = 0  # sampling limit of its last completion's request; 0 = unknown
    spans: list[Span] = []  # tree: the trained completions, in path order; else empty


class CompletionNode(msgspec.Struct, kw_only=True):
    """One sampled completion of an episode, as the proxy records it in the cache.

    Prefix-stable invariant: when `parent_id` is set, `prompt_ids` starts with the
    parent's `prompt_ids + output_ids` (the child continues the parent's exact tokens).
    """

    id: str  # unique in its session: response id, or "{response_id}/{i}" for choice i of n>1
    response_id: str  # the id the client saw (`response.id`); rewards may be keyed by it
    parent_id: str | None  # the completion this one continues, None for a root
    prompt_ids: list[int]  # full prompt tokens sent to the engine
    output_ids: list[int]  # sampled tokens (incl. the stop token when one ended it)
    logprobs: list[float]  # one per output token
    versions: list[int]  # weight version per output token
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""  # decoded prompt + output, used by the proxy for prefix matching
    max_new_tokens: int = 0  # output tokens the request allowed (its max_tokens, fit); 0 = unknown
