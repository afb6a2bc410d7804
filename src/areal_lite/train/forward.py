"""Learner stage, forward side: micro-batches that share a prompt -> one prefix pass ->
logits only where a token is trained.

Two exact savings on the learner's forward (and so on its backward):

- **Shared prefix.** The samples of a GRPO group start with the same prompt (and a
  multi-turn episode's turns with the same history). `prefix_microbatches` sorts the
  samples so that rows sharing a prefix sit together, and cuts micro-batches whose rows
  share one; `trained_logprobs` then runs the decoder once over the prefix (batch 1),
  expands its key/value cache to the micro-batch (a view, no copy) and runs only the
  suffixes on top. Causal attention makes every hidden state identical to the full
  forward's; the gradient of the prefix reaches the weights through the expanded cache
  (summed over rows, as the full forward sums it).
- **Head at trained positions.** The LM head (576 x 49,152 for SmolLM2, ~20% of the
  model's matmuls per token) and the log-softmax run only at the positions that predict
  a trained token, not over the prompt.

Both need the model split into its decoder and its head (`split_causal_lm`), which is
checked numerically against the model's own logits once per model; a model where
`logits != head(decoder(...))` (logit soft-capping, scaling) keeps the plain forward.

Token alignment as in `logprobs.py`: out[b, t] = log p(ids[b, t] | ids[b, :t]), 0 at t = 0
and wherever `mask` is off. Rows are right-padded.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "common_prefix_len",
    "prefix_microbatches",
    "split_causal_lm",
    "trained_logprobs",
]

_ENTROPY_CHUNK = 1024  # rows of [rows, V] logits per entropy chunk (bounds memory)
_MICROBATCH_OVERHEAD = 32  # tokens' worth of fixed cost per micro-batch (launches, Python)


# --------------------------------------------------------------------------- the split

def split_causal_lm(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, head) of a Hugging Face causal LM when its logits are exactly
    `head(decoder(...).last_hidden_state)`, else None (then use the plain forward).

    Checked once on a 4-token input in eval mode, with no gradients."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    param = next(model.parameters())
    ids = torch.arange(4, device=param.device)[None] % max(1, head.out_features)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            got = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - any model that cannot be split keeps the plain path
        return None
    finally:
        model.train(was_training)
    if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):
        return None
    return decoder, head


# ----------------------------------------------------------------------- micro-batches

def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cost(prefix: int, width: int, rows: int) -> int:
    """Tokens a micro-batch computes: the prefix once, then every row's padded suffix."""
    return prefix + rows * (width - prefix)


def _clusters(ids: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
    """Indices sorted by their tokens, cut into runs (rows, prefix) that share `prefix`
    tokens (sorted order makes a run's common prefix the minimum of its neighbours').
    A row sharing less than the run's prefix shortens it when that costs the run's rows
    fewer tokens than the new row would recompute alone (`shared`), else starts a run."""
    order = sorted(range(len(ids)), key=lambda i: (list(ids[i]), i))
    runs: list[tuple[list[int], int]] = []
    rows: list[int] = []
    prefix = 0
    for i in order:
        if rows:
            shared = common_prefix_len(ids[rows[-1]], ids[i])
            if len(rows) == 1:
                prefix = shared
            elif shared < prefix and len(rows) * (prefix - shared) > shared:
                runs.append((rows, prefix))  # a new prompt: its rows form their own run
                rows = []
            else:  # cheaper to shorten this run's prefix than to recompute `shared`
                prefix = min(prefix, shared)
        if not rows:
            rows, prefix = [i], len(ids[i])
            continue
        rows.append(i)
    if rows:
        runs.append((rows, prefix))
    return runs


def _cut(ids: Sequence[Sequence[int]], rows: list[int], prefix: int, budget: int,
         packing: bool, min_prefix: int) -> list[list[int]]:
    """Micro-batches of `rows` (all sharing `prefix`) of least total cost: longest rows
    first with `packing`, else in index order, split where a split saves more padding
    than the prefix it recomputes (plus `_MICROBATCH_OVERHEAD` per micro-batch); each
    within `budget` unless it is a single row. Exact dynamic programme over the splits."""
    rows = sorted(rows, key=lambda i: (-len(ids[i]), i)) if packing else sorted(rows)
    n = len(rows)
    best = [0] + [None] * n  # best[k]: least cost of rows[:k]; start[k]: where its last mb starts
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        width = shortest = len(ids[rows[end - 1]])
        for begin in range(end - 1, -1, -1):  # the micro-batch rows[begin:end]
            length = len(ids[rows[begin]])
            width, shortest = max(width, length), min(shortest, length)
            shared = min(prefix, shortest - 1)
            shared = shared if shared >= min_prefix and end - begin > 1 else 0
            cost = _cost(shared, width, end - begin)
            if cost > budget and end - begin > 1:
                break  # longer micro-batches only cost more
            total = best[begin] + cost + _MICROBATCH_OVERHEAD
            if best[end] is None or total < best[end]:
                best[end], start[end] = total, begin
    out: list[list[int]] = []
    end = n
    while end > 0:
        out.append(rows[start[end]:end])
        end = start[end]
    return out[::-1]


def prefix_microbatches(ids: Sequence[Sequence[int]], budget: int, packing: bool = True,
                        min_prefix: int = 2) -> list[tuple[list[int], int]]:
    """Split sequence indices into micro-batches (rows, prefix_len) of at most `budget`
    computed tokens: the rows' shared prefix once, plus each row's right-padded suffix.

    Rows that share a prompt (a run of the token-sorted rows, see `_clusters`) are cut
    into micro-batches together, longest first with `packing` (else in index order),
    so each micro-batch's rows share the run's prefix. Rows in runs of one, or whose
    run shares fewer than `min_prefix` tokens, are pooled and cut the same way (and
    share whatever prefix they have in common). `prefix_len` is cut so that every row
    keeps at least one suffix token; it is 0 for a single row. A row longer than
    `budget` gets a micro-batch alone. Every index appears exactly once.
    """
    if budget < 1:
        raise ValueError(f"train.max_tokens_per_microbatch must be >= 1, got {budget}")
    out: list[tuple[list[int], int]] = []
    pooled: list[int] = []
    for rows, prefix in _clusters(ids):
        if len(rows) < 2 or prefix < min_prefix:
            pooled += rows
            continue
        out += [(mb, prefix) for mb in _cut(ids, rows, prefix, budget, packing, min_prefix)]
    for mb in _cut(ids, pooled, 0, budget, packing, min_prefix):
        out.append((mb, _shared_prefix(ids, mb)))
    for k, (mb, prefix) in enumerate(out):
        p = min([prefix] + [len(ids[r]) - 1 for r in mb])
        out[k] = (mb, p if p >= min_prefix and len(mb) > 1 else 0)
    return out


def _shared_prefix(ids: Sequence[Sequence[int]], rows: list[int]) -> int:
    first = ids[rows[0]]
    return min((common_prefix_len(first, ids[r]) for r in rows[1:]), default=0)


# ------------------------------------------------------------------------- the forward

def _cache_kwarg(decoder) -> str:
    """The decoder's name for a past key/value cache argument (`cache` in newer
    transformers, `past_key_values` before)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _hidden(decoder, ids: Tensor, attn: Tensor, prefix_len: int) -> Tensor:
    """Last hidden states [B, T, H]; with `prefix_len` > 0 the rows' shared first
    `prefix_len` tokens run once and their cache is expanded to every row."""
    if prefix_len <= 0:
        position_ids = (attn.long().cumsum(-1) - 1).clamp_(min=0)
        return decoder(input_ids=ids, attention_mask=attn, position_ids=position_ids,
                       use_cache=False).last_hidden_state
    rows, width = ids.shape
    device = ids.device
    pre = decoder(input_ids=ids[:1, :prefix_len],
                  position_ids=torch.arange(prefix_len, device=device)[None], use_cache=True)
    cache = getattr(pre, "cache", None) or getattr(pre, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise RuntimeError("the decoder returned no key/value cache for the shared prefix "
                           "(gradient checkpointing on?); call with prefix_len=0")
    for layer in cache.layers:  # a view per layer: rows x the prefix, no copy
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    suffix_pos = torch.arange(prefix_len, width, device=device)[None].expand(rows, -1)
    post = decoder(input_ids=ids[:, prefix_len:], attention_mask=attn,
                   position_ids=suffix_pos, use_cache=True, **{_cache_kwarg(decoder): cache})
    return torch.cat([pre.last_hidden_state.expand(rows, -1, -1), post.last_hidden_state], 1)


@torch.no_grad()
def _entropy(logits: Tensor) -> Tensor:
    parts = []
    for start in range(0, logits.shape[0], _ENTROPY_CHUNK):
        logp = torch.log_softmax(logits[start:start + _ENTROPY_CHUNK].float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def trained_logprobs(decoder, head, ids: Tensor, attn: Tensor, mask: Tensor, *,
                     prefix_len: int = 0, entropy: bool = True
                     ) -> tuple[Tensor, Tensor | None]:
    """Per-token logprobs [B, T] float32 of `ids` at the positions where `mask` is on
    (0 elsewhere), and their entropy [B, T] (no gradient) when `entropy`.

    The decoder runs over the whole micro-batch (its shared prefix once when
    `prefix_len` > 0: every row's first `prefix_len` ids must be equal); the head and
    the log-softmax run only at the rows of hidden states that predict a masked token.
    Call under autocast for mixed precision; the softmax maths is float32.
    """
    hidden = _hidden(decoder, ids, attn, prefix_len)
    select = mask[:, 1:].bool()
    logits = head(hidden[:, :-1][select]).float()  # [N, V]: only the trained positions
    picked = logits.gather(-1, ids[:, 1:][select][:, None]).squeeze(-1)
    zeros = torch.zeros(select.shape, dtype=torch.float32, device=ids.device)
    logp = F.pad(zeros.masked_scatter(select, picked - logits.logsumexp(-1)), (1, 0))
    if not entropy:
        return logp, None
    ent = F.pad(zeros.masked_scatter(select, _entropy(logits.detach())), (1, 0))
    return logp, ent
