"""The KV cache of prompts and eager decode steps, with what a continuous batch needs (left
padding, placing prefilled rows, shifting columns). It implements nanochat.gpt.AttentionCache, the
one interface the model's forward uses (nanochat.infer.graphs.StaticStep is the other)."""

from __future__ import annotations

import torch

from nanochat.gpt import AttentionCache, attention


class KVCache(AttentionCache):
    """Keys and values of every layer for the tokens seen so far, for incremental decoding.

    Allocated on the first insert (so it takes the autocast dtype of the keys) for `max_len`
    positions; `pos` counts the cached tokens and advances once per forward, after the last layer."""

    def __init__(self, num_layers: int, max_len: int, pad: torch.Tensor | None = None):
        self.num_layers, self.max_len = num_layers, max_len
        self.k: torch.Tensor | None = None  # (layers, B, kv_heads, max_len, head_dim)
        self.v: torch.Tensor | None = None
        self.pos = 0
        # Prompts of different lengths decoded together are left-padded: row r starts with pad[r]
        # filler tokens, which no query attends to and which do not count as positions.
        self.pad = pad

    def positions(self, num_tokens: int, rows: int | None = None) -> torch.Tensor | None:
        """(B, T) rotary position of each new token, or None when every row is unpadded. A forward
        of fewer rows than the cache holds uses its first `rows` rows (a batch with free slots)."""
        if self.pad is None:
            return None
        steps = torch.arange(self.pos, self.pos + num_tokens, device=self.pad.device)
        return (steps[None, :] - self.pad[:rows, None]).clamp(min=0)

    def attention_mask(self, num_tokens: int, device: torch.device, rows: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA when `num_tokens` new tokens follow the `pos` cached ones;
        the same for every layer, so the model computes it once per forward.

        Left-padded rows get a (B, 1, T, S) mask: causal, padding hidden (a padding query sees itself
        only: a row of nothing but -inf would make softmax NaN)."""
        if self.pad is not None:
            queries = torch.arange(self.pos, self.pos + num_tokens, device=device)[:, None]  # (T, 1)
            keys = torch.arange(self.pos + num_tokens, device=device)[None, :]  # (1, S)
            real = keys >= self.pad[:rows].to(device)[:, None, None]  # (B, 1, S)
            return ((real | (keys == queries)) & (keys <= queries))[:, None], False
        if self.pos == 0:
            return None, True  # a prompt from scratch: plain causal attention
        if num_tokens == 1:
            return None, False  # one new token attends to everything cached
        # new tokens after cached ones: query i (at position pos + i) sees keys 0..pos + i
        return torch.ones(num_tokens, self.pos + num_tokens, dtype=torch.bool, device=device).tril(diagonal=self.pos), False

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, kv_heads, T, head_dim); return all of them so far."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.num_layers, B, H, self.max_len, D)
            self.v = v.new_zeros(self.num_layers, B, H, self.max_len, D)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :B, :, self.pos : end] = k
        self.v[layer, :B, :, self.pos : end] = v
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        """Store this layer's new keys/values, then attend q to everything cached so far."""
        k, v = self.insert(layer, k, v)
        return attention(q, k, v, mask, causal)

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def place(self, rows: torch.Tensor, other: KVCache) -> None:
        """Copy the padded cache `other` (one row per entry of `rows`) into those rows of this one so
        that its tokens end at this cache's `pos`: a prefilled request joining a running batch."""
        start = self.pos - other.pos
        if start < 0:
            raise ValueError(f"{other.pos} prefilled positions do not fit before position {self.pos}")
        if self.k is None:
            _, _, heads, _, dim = other.k.shape
            self.k = other.k.new_zeros(self.num_layers, self.pad.numel(), heads, self.max_len, dim)
            self.v = torch.zeros_like(self.k)
        self.k[:, rows, :, start : self.pos] = other.k[:, :, :, : other.pos]
        self.v[:, rows, :, start : self.pos] = other.v[:, :, :, : other.pos]
        self.pad[rows] = start + other.pad

    def shift(self, delta: int, start: int = 0) -> None:
        """Move the cached columns [start, pos) by `delta` (left when negative), and every row's
        padding and the write position with them: frees columns no row needs any more, or makes
        room in front for a longer prompt to join."""
        end = self.pos
        if not (0 <= start + delta and end + delta <= self.max_len):
            raise ValueError(f"cannot shift columns [{start}, {end}) by {delta} in a cache of {self.max_len}")
        if self.k is not None and end > start:
            for t in (self.k, self.v):
                t[:, :, :, start + delta : end + delta] = t[:, :, :, start:end].clone()  # clone: ranges overlap
        self.pad += delta
        self.pos += delta

    def repeat(self, num_rows: int, into: KVCache | None = None) -> KVCache:
        """A cache with this one-row cache copied into `num_rows` rows: prefill a prompt once, then
        sample several continuations of it in one batch. `into` (allocated, enough rows and columns)
        receives the copy instead of new tensors."""
        assert self.pad is None, "repeat() copies a single unpadded prompt"
        out = into if into is not None else KVCache(self.num_layers, self.max_len)
        out.pos = self.pos
        if self.k is None:
            return out
        if into is None:
            out.k = self.k.expand(-1, num_rows, -1, -1, -1).contiguous()
            out.v = self.v.expand(-1, num_rows, -1, -1, -1).contiguous()
        else:
            out.k[:, :num_rows, :, : self.pos] = self.k[:, :, :, : self.pos]
            out.v[:, :num_rows, :, : self.pos] = self.v[:, :, :, : self.pos]
        return out
