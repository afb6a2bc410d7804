"""Local engine internals: the running batch's KV cache, one padded buffer per layer.

Layout. Each attention layer keeps K and V in a preallocated buffer of shape
``[rows_cap, kv_heads, cols_cap, head_dim]``. The running batch uses rows ``[0, rows)``
and columns ``[0, length)``; ``valid[r, c]`` says whether column c of row r holds one of
row r's tokens (the attention mask). Every row ends at the common right edge
``length``; the columns to the left of its tokens (and, after a shared-prefix prefill,
between the prefix and the row's own suffix) are padding. A decode step writes column
``length`` of every row in place (no ``torch.cat``), so rows never move while they
decode. Position ids come from ``num_tokens[r]``, not from columns.

Between steps the engine reshapes the batch:

- ``merge(other)`` appends rows prefilled in a separate (left-padded) cache, aligning
  their right edges with this batch's (the shorter side gets more padding);
- ``remove(rows)`` drops finished or cancelled rows by moving the last live rows into
  the holes (only the moved rows are copied);
- when the buffer is full it is reallocated (capacity doubled, bounded by the caller's
  hint) and the padding columns every row shares are dropped on the way.

The buffers are exposed to Hugging Face models through a ``transformers`` ``Cache`` made
of ``SlotLayer``s, so any HF decoder that calls ``update`` on the cache it is given works.
Sliding-window layers are treated as full attention (exact while the context fits the
window).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's view of a `PaddedKV`: writes new K/V at column `length`, returns the
    used region ``[:rows, :, :length + q]``."""

    def __init__(self, owner: PaddedKV):
        super().__init__()
        self._owner = owner
        self.buf_k: torch.Tensor | None = None  # [rows_cap, kv_heads, cols_cap, head_dim]
        self.buf_v: torch.Tensor | None = None  # [rows_cap, kv_heads, cols_cap, v_head_dim]

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv = self._owner
        rows, start = key_states.shape[0], kv.length
        end = start + key_states.shape[-2]
        if self.buf_k is None:
            self.buf_k = key_states.new_zeros(_shape(key_states, kv.rows_cap, kv.cols_cap))
            self.buf_v = value_states.new_zeros(_shape(value_states, kv.rows_cap, kv.cols_cap))
        assert rows == kv.rows and end <= kv.cols_cap, "caller must reserve capacity first"
        self.buf_k[:rows, :, start:end] = key_states
        self.buf_v[:rows, :, start:end] = value_states
        self.keys = self.buf_k[:rows, :, :end]
        self.values = self.buf_v[:rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.length + query_length, 0


def _shape(like: torch.Tensor, rows: int, cols: int) -> tuple[int, int, int, int]:
    return (rows, like.shape[1], cols, like.shape[3])


class PaddedKV:
    """A batch of KV rows aligned on a common right edge (see module docstring). Not
    thread-safe: the engine touches it only from its single step thread (or between
    steps)."""

    def __init__(self, num_layers: int, *, rows_cap: int, cols_cap: int, device="cpu"):
        self.rows = 0  # rows in use
        self.length = 0  # columns in use (common right edge)
        self.rows_cap = rows_cap
        self.cols_cap = cols_cap
        self.num_tokens: list[int] = []  # per row: cached tokens (= next position id)
        self.valid = torch.zeros(rows_cap, cols_cap, dtype=torch.bool, device=device)
        self.layers = [SlotLayer(self) for _ in range(num_layers)]
        self.cache = Cache(layers=self.layers)  # what the HF model receives

    # -- one forward pass ------------------------------------------------------------------

    def prepare(self, new_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mark the next q = max(new_lens) columns: row r gets `new_lens[r]` tokens,
        right-aligned. Return (attention_mask [rows, length + q], position_ids [rows, q]).
        Call `advance(new_lens)` after the forward pass."""
        q = max(new_lens)
        assert self.length + q <= self.cols_cap and len(new_lens) == self.rows
        dev = self.valid.device
        lens = torch.tensor(new_lens, device=dev)
        offsets = torch.arange(q, device=dev)
        pad = (q - lens)[:, None]
        self.valid[: self.rows, self.length:self.length + q] = offsets[None, :] >= pad
        base = torch.tensor(self.num_tokens, device=dev)[:, None]
        positions = (base + offsets[None, :] - pad).clamp_(min=0)
        return self.valid[: self.rows, : self.length + q].long(), positions

    def advance(self, new_lens: list[int]) -> None:
        """Commit a forward pass prepared with `new_lens`."""
        self.length += max(new_lens)
        self.num_tokens = [n + k for n, k in zip(self.num_tokens, new_lens)]

    def zero_padding(self) -> None:
        """Overwrite padding columns with zeros (pad queries may produce non-finite K/V)."""
        keep = self.valid[: self.rows, None, : self.length, None]
        for layer in self.layers:
            for buf in (layer.buf_k, layer.buf_v):
                if buf is not None:
                    used = buf[: self.rows, :, : self.length]
                    used.copy_(used.masked_fill(~keep, 0.0))

    # -- reshaping between steps ---------------------------------------------------------

    def start_rows(self, num_rows: int) -> None:
        """Begin an empty batch of `num_rows` rows (capacity must already fit)."""
        assert self.rows == 0 and self.length == 0 and num_rows <= self.rows_cap
        self.rows = num_rows
        self.num_tokens = [0] * num_rows

    def load_first_row(self, kv: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        """Fill row 0 (of a batch just started with one row) with `n` cached columns:
        per layer (K, V) of shape [1, kv_heads, >= n, head_dim], positions 0..n-1."""
        assert self.rows == 1 and self.length == 0 and n <= self.cols_cap
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            if layer.buf_k is None:
                layer.lazy_initialization(k, v)
                layer.buf_k = k.new_zeros(_shape(k, self.rows_cap, self.cols_cap))
                layer.buf_v = v.new_zeros(_shape(v, self.rows_cap, self.cols_cap))
            layer.buf_k[0, :, :n] = k[0, :, :n]
            layer.buf_v[0, :, :n] = v[0, :, :n]
        self.valid[0, :n] = True
        self.length = n
        self.num_tokens = [n]

    def first_row(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of row 0's first `n` columns per layer (valid when row 0 has no left
        padding, i.e. the batch was started with one row)."""
        return [(layer.buf_k[0:1, :, :n], layer.buf_v[0:1, :, :n]) for layer in self.layers]

    def broadcast_first_row(self, num_rows: int) -> None:
        """Copy row 0 (e.g. a shared prompt prefix) into rows 1..num_rows-1."""
        assert self.rows == 1 and num_rows <= self.rows_cap
        for layer in self.layers:
            for buf in (layer.buf_k, layer.buf_v):
                if buf is not None:
                    buf[1:num_rows, :, : self.length] = buf[0:1, :, : self.length]
        self.valid[1:num_rows, : self.length] = self.valid[0:1, : self.length]
        self.rows = num_rows
        self.num_tokens = self.num_tokens * num_rows

    def reserve_decode(self, *, cols_hint: int) -> None:
        """Make room for one more column; `cols_hint` bounds how far capacity grows."""
        if self.length + 1 <= self.cols_cap:
            return
        lead = self._common_lead()
        self._realloc(self.rows_cap, _grow(self.cols_cap, self.length - lead + 1, cols_hint),
                      lead)

    def merge(self, other: PaddedKV, *, rows_hint: int, cols_hint: int) -> None:
        """Append `other`'s rows, aligning right edges; `other` is left unusable."""
        n, p = other.rows, other.length
        if n == 0:
            return
        if self.rows == 0:
            self.length = 0
        if self.rows + n > self.rows_cap or max(self.length, p) + 1 > self.cols_cap:
            lead = self._common_lead()
            self._realloc(_grow(self.rows_cap, self.rows + n, rows_hint),
                          _grow(self.cols_cap, max(self.length - lead, p) + 1, cols_hint), lead)
        if p > self.length:  # shift existing rows right so the right edges line up
            self._shift_right(p - self.length)
        new, cols = slice(self.rows, self.rows + n), slice(self.length - p, self.length)
        for mine, theirs in zip(self.layers, other.layers):
            if theirs.buf_k is None:
                continue
            if mine.buf_k is None:
                mine.lazy_initialization(theirs.buf_k, theirs.buf_v)
                mine.buf_k = theirs.buf_k.new_zeros(_shape(theirs.buf_k, self.rows_cap, self.cols_cap))
                mine.buf_v = theirs.buf_v.new_zeros(_shape(theirs.buf_v, self.rows_cap, self.cols_cap))
            mine.buf_k[new, :, cols] = theirs.buf_k[:n, :, :p]
            mine.buf_v[new, :, cols] = theirs.buf_v[:n, :, :p]
        self.valid[new, : self.length] = False
        self.valid[new, cols] = other.valid[:n, :p]
        self.rows += n
        self.num_tokens.extend(other.num_tokens)

    def remove(self, drop: set[int]) -> list[int]:
        """Drop rows; return `order` with order[new_row] = old_row for the rows kept."""
        keep_n = self.rows - len(drop)
        holes = sorted(r for r in drop if r < keep_n)
        movers = [r for r in range(keep_n, self.rows) if r not in drop]
        order = list(range(self.rows))
        if holes:
            dst = torch.tensor(holes, device=self.valid.device)
            src = torch.tensor(movers, device=self.valid.device)
            for layer in self.layers:
                if layer.buf_k is not None:
                    layer.buf_k[dst] = layer.buf_k[src]
                    layer.buf_v[dst] = layer.buf_v[src]
            self.valid[dst] = self.valid[src]
            for h, m in zip(holes, movers):
                order[h] = m
        order = order[:keep_n]
        self.num_tokens = [self.num_tokens[o] for o in order]
        self.rows = keep_n
        if keep_n == 0:
            self.length = 0
        return order

    def clear(self) -> None:
        """Forget all rows and free the buffers."""
        self.rows = self.length = 0
        self.num_tokens = []
        for layer in self.layers:
            layer.buf_k = layer.buf_v = layer.keys = layer.values = None

    def _common_lead(self) -> int:
        """Leading columns that are padding in every row."""
        used = self.valid[: self.rows, : self.length].any(dim=0)
        return int(used.long().argmax()) if bool(used.any()) else self.length

    def _shift_right(self, by: int) -> None:
        for layer in self.layers:
            for buf in (layer.buf_k, layer.buf_v):
                if buf is not None:
                    moved = buf[: self.rows, :, : self.length].clone()
                    buf[: self.rows, :, by:by + self.length] = moved
        moved = self.valid[: self.rows, : self.length].clone()
        self.valid[: self.rows, : by] = False
        self.valid[: self.rows, by:by + self.length] = moved
        self.length += by

    def _realloc(self, rows_cap: int, cols_cap: int, lead: int) -> None:
        keep = self.length - lead
        for layer in self.layers:
            for name in ("buf_k", "buf_v"):
                old = getattr(layer, name)
                if old is not None:
                    new = old.new_zeros(_shape(old, rows_cap, cols_cap))
                    new[: self.rows, :, :keep] = old[: self.rows, :, lead:self.length]
                    setattr(layer, name, new)
        valid = self.valid.new_zeros(rows_cap, cols_cap)
        valid[: self.rows, :keep] = self.valid[: self.rows, lead:self.length]
        self.valid = valid
        self.rows_cap, self.cols_cap, self.length = rows_cap, cols_cap, keep


def _grow(cap: int, need: int, hint: int) -> int:
    """Doubling growth: at least `need`, at most max(need, hint)."""
    if need <= cap:
        return cap
    return max(need, min(max(2 * cap, 16), hint))
