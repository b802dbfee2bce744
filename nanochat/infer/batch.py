"""Continuous batching: requests join and leave one running decode batch between steps.

Each `step()` decodes one token for every running row, then admits waiting requests into free
slots (one prefill for all of them). Each row samples with its own generator, so its tokens do not
depend on its batch mates, then takes the engine's per-row step, `Engine.next_token`.

Rule: all rows share one KV cache whose write position `pos` advances one column per step. A row
holds columns [pad[r], pos): a request joins so that its prompt ends at `pos`. Columns before the
smallest pad are dropped by shifting left when the cache is full; a prompt longer than `pos`
shifts the cache right before it joins.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat.infer.cache import KVCache
from nanochat.infer.engine import SAMPLING, Engine, Row, sample_next


@dataclass
class Request:
    """What to decode: a prompt and how to sample its continuation."""

    prompt: list[int]
    max_tokens: int
    temperature: float = SAMPLING.temperature
    top_k: int | None = SAMPLING.top_k
    seed: int = SAMPLING.seed


@dataclass
class _Slot:
    rid: int
    request: Request
    rng: torch.Generator
    state: Row = field(default_factory=Row)
    generated: int = 0
    last: int = -1  # the token to feed at the next step


class DecodeBatch:
    """Up to `slots` requests decoded together; `capacity` cache columns (>= any prompt + max_tokens)."""

    def __init__(self, engine: Engine, slots: int, capacity: int):
        self.engine, self.slots, self.capacity = engine, slots, capacity
        model = engine.model
        self.device = next(model.parameters()).device
        if capacity > model.cos.size(2):
            raise ValueError(f"a cache of {capacity} columns exceeds the model's rotary tables ({model.cos.size(2)})")
        self.free_pad = capacity + 1  # the pad of an empty slot: its (ignored) query sees only itself
        self.cache = KVCache(len(model.transformer.h), capacity,
                             pad=torch.full((slots,), self.free_pad, dtype=torch.long, device=self.device))
        engine.decoder.sync_weights()
        self.running: dict[int, _Slot] = {}
        self.waiting: deque[tuple[int, Request]] = deque()
        self._next_id = 0

    # ---- the queue

    def add(self, request: Request) -> int:
        """Queue a request (it joins at the next step); returns its id."""
        if not request.prompt:
            raise ValueError("empty prompt: start it with <|bos|> at least")
        if len(request.prompt) + request.max_tokens > self.capacity:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + {request.max_tokens} new ones exceeds "
                             f"the {self.capacity} positions this batch holds")
        rid, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((rid, request))
        return rid

    def cancel(self, rid: int) -> None:
        """Stop decoding request `rid` (waiting or running); its slot is free at the next step."""
        self.waiting = deque((r, req) for r, req in self.waiting if r != rid)
        for slot, s in list(self.running.items()):
            if s.rid == rid:
                self._free(slot)

    def active(self) -> set[int]:
        """Ids of the requests waiting or running."""
        return {s.rid for s in self.running.values()} | {rid for rid, _ in self.waiting}

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def warm_up(self) -> None:
        """Decode a few tokens with one slot busy, then with every slot busy: the decoder compiles
        and captures its graphs now (tens of seconds where it compiles), not in the first requests."""
        for busy in (1, self.slots):
            for _ in range(busy):
                self.add(Request([self.engine.tokenizer.bos_token_id], max_tokens=3, temperature=0.0))
            while self.busy:
                self.step()

    # ---- decoding

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """One token for every running request and the first token of each newly admitted one:
        {request id: token}. A request leaves after its stop token (which is returned) or its
        max_tokens-th token."""
        out: dict[int, int] = {}
        if self.running:
            self._make_room()
            # rows up to the highest busy slot only (slots fill lowest first): one request alone
            # costs a one-row forward, not a forward of every slot
            slots = list(self.running)
            inputs = [self.engine.tokenizer.bos_token_id] * (max(slots) + 1)
            for slot in slots:
                inputs[slot] = self.running[slot].last
            feed = torch.tensor(inputs, dtype=torch.long, device=self.device).view(-1, 1)
            logits = self.engine.last_logits(feed, self.cache)[slots]
            out.update(self._sample(slots, logits))
        joined = self._admit()
        if joined:
            out.update(joined)
        return out

    def _sample(self, slots: list[int], logits: torch.Tensor) -> dict[int, int]:
        """Sample row i of `logits` for slots[i]; forced tool tokens take precedence."""
        requests = [self.running[slot].request for slot in slots]
        # greedy rows need no generator: one argmax covers all of them; a sampling row draws
        # from its own generator, so its tokens do not depend on its batch mates
        greedy = [r.temperature == 0 for r in requests]
        best = logits.argmax(dim=-1, keepdim=True) if any(greedy) else None
        if all(greedy):
            sampled = best
        else:
            sampled = torch.cat([best[i : i + 1] if greedy[i] else
                                 sample_next(logits[i : i + 1], r.temperature, r.top_k, self.running[slot].rng)
                                 for i, (slot, r) in enumerate(zip(slots, requests, strict=True))])
        tokens = sampled.view(-1).tolist()  # one host sync for the batch
        out = {}
        for slot, token in zip(slots, tokens, strict=True):
            s = self.running[slot]
            token, _ = self.engine.next_token(s.state, token)
            s.generated, s.last = s.generated + 1, token
            out[s.rid] = token
            if s.state.done or s.generated >= s.request.max_tokens:
                self._free(slot)
        return out

    def _free(self, slot: int) -> None:
        self.running.pop(slot, None)
        self.cache.pad[slot] = self.free_pad
        if not self.running:
            self.cache.pos = 0  # nothing cached is needed any more

    def _admit(self) -> dict[int, int]:
        free = [slot for slot in range(self.slots) if slot not in self.running]
        joining = []
        while self.waiting and len(joining) < len(free):
            joining.append(self.waiting.popleft())
        if not joining:
            return {}
        slots = free[: len(joining)]
        width = max(len(req.prompt) for _, req in joining)
        # prefill the newcomers together, left-padded to one width, in a cache of their own
        pad = torch.tensor([width - len(req.prompt) for _, req in joining], device=self.device)
        ids = torch.tensor([[self.engine.tokenizer.bos_token_id] * (width - len(req.prompt)) + req.prompt
                            for _, req in joining], device=self.device)
        prefill = KVCache(self.cache.num_layers, width, pad=pad)
        logits = self.engine.last_logits(ids, prefill)
        # then place them so that their prompts end at the shared write position (moving the
        # running rows right first when a prompt is longer than what is cached)
        self._shift(max(0, width - self.cache.pos))
        self.cache.place(torch.tensor(slots, device=self.device), prefill)
        for slot, (rid, req) in zip(slots, joining, strict=True):
            self.running[slot] = _Slot(rid, req, torch.Generator(device=self.device).manual_seed(req.seed))
        return self._sample(slots, logits)

    def _live_span(self) -> int:
        """Columns from the earliest start of a running row to pos."""
        if not self.running:
            return 0
        return self.cache.pos - int(self.cache.pad[list(self.running)].min())

    def _make_room(self) -> None:
        """Before a decode step: when every column is used, drop those before the earliest running row."""
        if self.cache.pos >= self.capacity:
            self._shift(self._live_span() - self.cache.pos)

    def _shift(self, delta: int) -> None:
        if delta:
            self.cache.shift(delta, start=self.cache.pos - self._live_span())
            free = [slot for slot in range(self.slots) if slot not in self.running]
            self.cache.pad[free] = self.free_pad


def decode_many(engine: Engine, prompts: list[list[int]], max_tokens: list[int], temperature: list[float],
                top_k: list[int | None], seed: list[int]) -> Iterator[list[int | None]]:
    """Decode different prompts together, each with its own sampling settings: yields per step the
    next token of each row, None once that row has stopped (after its stop token or max_tokens)."""
    batch = DecodeBatch(engine, slots=len(prompts), capacity=max(len(p) for p in prompts) + max(max_tokens))
    ids = [batch.add(Request(*settings)) for settings in zip(prompts, max_tokens, temperature, top_k, seed, strict=True)]
    while batch.busy:
        tokens = batch.step()
        yield [tokens.get(rid) for rid in ids]
