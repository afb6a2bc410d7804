"""Local engine internals: KV of recently prefilled prompts, reused across requests.

RL rollouts send the same prompt prefix again and again: every episode of a GRPO group
starts with the same prompt, every request of an agent starts with the same system
prompt, and a multi-turn agent resends its whole history. The KV of a token depends
only on the tokens before it, so the KV the engine computed for one prompt is exact for
any later prompt that starts with the same tokens (same weights, same positions).
`PrefixCache` keeps the KV of recent prompts (one ``[1, kv_heads, n, head_dim]`` K and
V per layer, computed without padding) within a token budget, least recently used out
first. A lookup returns the entry sharing the longest prefix with a new prompt; the
engine copies that many columns into the new row and prefills only the rest.

The cache is only valid for the weights it was computed with: the engine clears it on
every weight update. Only the engine's step thread touches it (or the loop while no
step runs).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [1, h, n, d]


@dataclass(eq=False)
class PrefixEntry:
    ids: tuple[int, ...]
    kv: LayerKV
    array: np.ndarray = field(init=False)  # ids as int64, for vectorized matching

    def __post_init__(self) -> None:
        self.array = np.asarray(self.ids, dtype=np.int64)


class PrefixCache:
    """Least-recently-used prompt KV within `max_tokens` cached tokens (see module doc)."""

    def __init__(self, max_tokens: int, *, min_match: int = 4, max_entries: int = 64):
        self.max_tokens = max_tokens
        self.min_match = min_match
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.num_tokens = 0  # cached tokens over all entries
        self.hits = 0  # lookups that found a usable prefix
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the cache

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int], limit: int) -> tuple[int, PrefixEntry | None]:
        """(n, entry): the longest cached prefix of `ids[:limit]`, n >= min_match, or
        (0, None)."""
        best, found = 0, None
        query = np.asarray(ids[:limit], dtype=np.int64)
        for entry in self._entries.values():
            n = _common_prefix(entry.array, query, limit)
            if n > best:
                best, found = n, entry
        if found is None or best < self.min_match:
            return 0, None
        self._entries.move_to_end(found.ids)
        self.hits += 1
        self.hit_tokens += best
        return best, found

    def store(self, ids: list[int], kv: LayerKV) -> None:
        """Keep `kv` (the prompt `ids`, columns 0..len-1, copied) unless already covered."""
        key = tuple(ids)
        if not self.max_tokens or len(key) < self.min_match or len(key) > self.max_tokens:
            return
        n = len(key)
        redundant = []  # entries that are prefixes of the new prompt
        for other in self._entries:
            if len(other) >= n and other[:n] == key:  # covered by a longer (or equal) entry
                self._entries.move_to_end(other)
                return
            if key[:len(other)] == other:
                redundant.append(other)
        for other in redundant:
            self._drop(other)
        self._entries[key] = PrefixEntry(key, [(k[:, :, :n].clone(), v[:, :, :n].clone())
                                               for k, v in kv])
        self.num_tokens += n
        while self.num_tokens > self.max_tokens or len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.num_tokens = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self.num_tokens -= len(key)


def _common_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the longest common prefix of `a` and `b[:limit]` (one vectorized compare;
    a token-by-token Python loop costs ~50 ns per token)."""
    n = min(len(a), len(b), limit)
    differ = a[:n] != b[:n]
    first = int(differ.argmax()) if n else 0
    return first if n and differ[first] else n
