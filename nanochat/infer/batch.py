"""Continuous batching: requests join and leave one running decode batch between steps.

Each `step()` decodes one token for every running row, then spends at most `prefill_tokens` tokens
of forward (padding included) on the prompts of waiting requests: short prompts are prefilled
together, a long one in chunks over several steps, so a running row's time per token stays bounded
when a long prompt arrives. Prefilled requests join with their first token. All rows sample at once
on the device (nanochat.infer.sampling), each with its own settings and token counter, so a
request's tokens do not depend on its batch mates or its slot; then each takes the engine's per-row
step, `Engine.next_token`.

One step ahead: a step samples, then launches the next step's forward on the tokens it sampled, on
the device, and only then reads its tokens on the host: the GPU runs that forward while the host
does its bookkeeping (and a server sends the tokens), as `Engine.generate` does. Rows that end at
this step were fed once more for nothing; a row whose next token is a forced tool output (known
before the launch) makes the batch wait for the host instead. Nothing in a step waits for the
device but the read of its tokens: host values go up by non-blocking copies from pinned memory and
constants are written by fill kernels (in a profile, assigning a Python number to an indexed CUDA
tensor waited for the device: 15% of the decoding process's time at 32 streams).

Rule: all rows share one KV cache whose write position `pos` advances one column per step. A row
holds columns [pad[r], pos): a request joins so that its prompt ends at `pos`. Columns before the
smallest pad are dropped by shifting left when the cache is full; a prompt longer than `pos`
shifts the cache right before it joins. A row never needs more than its
prompt + max_tokens columns (<= capacity) behind `pos`, so after compaction every running row fits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat.infer.cache import KVCache
from nanochat.infer.engine import SAMPLING, Engine, HostCopy, Row
from nanochat.infer.sampling import BatchSampler, sample, to_device

PREFILL_TOKENS = 512  # prompt tokens (padding included) one step may prefill while rows are running


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
    start: int  # its first cache column (kept on the host: reading the cache's pad would wait for the device)
    state: Row = field(default_factory=Row)
    generated: int = 0


@dataclass
class _Ahead:
    """A decode step launched but not sampled yet: its logits and the request in each of its rows then."""

    logits: torch.Tensor
    members: list[_Slot | None]


# rows sampled in a step: the request in each row when it was sampled, the rows' slots, their tokens on the device
_Sampled = tuple[list[_Slot | None], list[int], torch.Tensor]


@dataclass
class _Prefill:
    """Waiting requests whose prompts are being prefilled together, left-padded to one width, in a
    cache of their own; `done` columns of `ids` are in it so far."""

    requests: list[tuple[int, Request]]
    ids: torch.Tensor
    cache: KVCache
    done: int = 0
    cancelled: set[int] = field(default_factory=set)
    logits: torch.Tensor | None = None  # of the prompts' last tokens, once `done` reaches the width

    @property
    def width(self) -> int:
        return self.ids.size(1)


class DecodeBatch:
    """Up to `slots` requests decoded together; `capacity` cache columns (>= any prompt + max_tokens);
    at most `prefill_tokens` prompt tokens prefilled per step while rows are running."""

    def __init__(self, engine: Engine, slots: int, capacity: int, prefill_tokens: int = PREFILL_TOKENS):
        self.engine, self.slots, self.capacity, self.prefill_tokens = engine, slots, capacity, prefill_tokens
        model = engine.model
        self.device = next(model.parameters()).device
        if capacity > model.cos.size(2):
            raise ValueError(f"a cache of {capacity} columns exceeds the model's rotary tables ({model.cos.size(2)})")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, not {prefill_tokens}")
        self.free_pad = capacity + 1  # the pad of an empty slot: its (ignored) query sees only itself
        self.cache = KVCache(len(model.transformer.h), capacity,
                             pad=torch.full((slots,), self.free_pad, dtype=torch.long, device=self.device))
        engine.decoder.sync_weights()
        self.sampler = BatchSampler(slots, self.device, fused=engine.decoder.compile,
                                    graphs=engine.decoder.mode == "graph")
        # the token each slot feeds at the next step, on the device: the sampled one unless forced
        self.feed = torch.full((slots, 1), engine.tokenizer.bos_token_id, dtype=torch.long, device=self.device)
        self.running: dict[int, _Slot] = {}
        self.waiting: deque[tuple[int, Request]] = deque()
        self.prefilling: _Prefill | None = None
        self.ahead: _Ahead | None = None
        self._next_id = 0

    # ---- the queue

    def add(self, request: Request) -> int:
        """Queue a request (it joins once its prompt is prefilled); returns its id."""
        if not request.prompt:
            raise ValueError("empty prompt: start it with <|bos|> at least")
        if len(request.prompt) + request.max_tokens > self.capacity:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + {request.max_tokens} new ones exceeds "
                             f"the {self.capacity} positions this batch holds")
        rid, self._next_id = self._next_id, self._next_id + 1
        self.waiting.append((rid, request))
        return rid

    def cancel(self, rid: int) -> None:
        """Stop decoding request `rid` (waiting, being prefilled or running); its slot is free at the next step."""
        self.waiting = deque((r, req) for r, req in self.waiting if r != rid)
        if self.prefilling is not None and rid in {r for r, _ in self.prefilling.requests}:
            self.prefilling.cancelled.add(rid)  # its row is prefilled with the others, then dropped
        for slot, s in list(self.running.items()):
            if s.rid == rid:
                self._free(slot)

    def active(self) -> set[int]:
        """Ids of the requests waiting, being prefilled or running."""
        prefilling = set() if self.prefilling is None else {r for r, _ in self.prefilling.requests} - self.prefilling.cancelled
        return {s.rid for s in self.running.values()} | prefilling | {rid for rid, _ in self.waiting}

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.prefilling)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Capture (and compile, where the plan compiles) the decode step of every row count the
        batch can take, the prefill of every group shape it may capture, and the sampler (a decode
        step's at every top-k width it captures; with and without top-k), before the first request:
        nothing is captured or compiled while serving.
        Eager decoding has nothing to capture."""
        if self.engine.decoder.mode != "graph":
            return
        self.add(Request([self.engine.tokenizer.bos_token_id], max_tokens=1, temperature=0.0))
        while self.busy:  # one request through the batch: allocates its cache
            self.step()
        for shape in self.engine.decoder.prefill_shapes(self.slots):  # captured on first use
            self.engine.decoder.prefill(torch.zeros(shape, dtype=torch.long, device=self.device),
                                        torch.zeros(shape[0], dtype=torch.long, device=self.device))
        s = self.sampler
        for rows in sorted({self.engine.decoder.step_rows(n, self.slots) for n in range(1, self.slots + 1)}):
            self.cache.pos = 0  # every slot free: a row sees only the column it writes
            logits = self.engine.decoder(self.feed[:rows], self.cache)
            s.warm_up(logits)  # a decode step's sampling, captured at every top-k width (tensor-op sampling)
            for top_k in (0, SAMPLING.top_k):  # a joining group's, eagerly: the sampling kernel built before use
                sample(logits, s.temperature[:rows], s.top_k[:rows], s.seed[:rows], s.index[:rows], top_k, s.fused)
        self.cache.pos = 0

    # ---- decoding

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """One token for every running request and the first token of each request whose prefill
        ends this step: {request id: token}. A request leaves after its stop token (which is
        returned) or its max_tokens-th token."""
        if self.ahead is None and self.running:
            self.ahead = self._launch()
        sampled: list[_Sampled] = []
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            rows = len(ahead.members)
            tokens = self.sampler.sample(ahead.logits, slice(0, rows))
            self.feed[:rows, 0] = tokens
            sampled.append((ahead.members, list(range(rows)), tokens))
        joined = self._prefill()
        if joined is not None:
            sampled.append(joined)
        if not sampled:
            return {}
        host = HostCopy(torch.cat([tokens for _, _, tokens in sampled]))
        if self.running and not any(s.state.forced for s in self.running.values()):
            self.ahead = self._launch()  # runs while the host reads and handles this step's tokens
        values = host.values()
        out = {}
        for members, slots, _ in sampled:
            row_values, values = values[: len(slots)], values[len(slots) :]
            for member, slot, token in zip(members, slots, row_values, strict=True):
                if member is not None and self.running.get(slot) is member:  # not left or replaced since
                    out[member.rid] = self._take(slot, member, token)
        return out

    def _launch(self) -> _Ahead:
        """The forward of the running rows on the tokens in `feed`, up to the highest busy slot only
        (slots fill lowest first: one request alone costs a one-row forward, not one of every slot),
        as many rows as the decoder's step computes (free slots among them: fed, sampled, dropped)."""
        self._make_room()
        rows = self.engine.decoder.step_rows(max(self.running) + 1, self.slots)
        logits = self.engine.decoder(self.feed[:rows], self.cache)
        return _Ahead(logits, [self.running.get(slot) for slot in range(rows)])

    def _take(self, slot: int, s: _Slot, sampled: int) -> int:
        """The row's token, given what was sampled for it (a forced tool token takes precedence and is
        fed instead); the row leaves after its stop token or its max_tokens-th token."""
        token, forced = self.engine.next_token(s.state, sampled)
        if forced:
            self.feed[slot].fill_(token)
        s.generated += 1
        if s.state.done or s.generated >= s.request.max_tokens:
            self._free(slot)
        return token

    def _free(self, slot: int) -> None:
        self.running.pop(slot, None)
        self.sampler.stop(slot)
        self.cache.pad[slot].fill_(self.free_pad)
        if not self.running:
            self.cache.pos = 0  # nothing cached is needed any more
            self.ahead = None  # a step launched ahead decodes rows that have all left

    def _prefill(self) -> _Sampled | None:
        """Prefill the next chunk of waiting prompts; the requests whose prompts are then complete join:
        their first tokens (None while no prompt is complete)."""
        # nothing to stall in an idle batch: prefill all that fits at once
        budget = self.prefill_tokens if self.running else None
        if self.prefilling is None:
            self.prefilling = self._next_group(budget)
            if self.prefilling is None:
                return None
        group = self.prefilling
        if group.done < group.width:
            columns = group.width - group.done if budget is None else max(1, budget // len(group.requests))
            end = min(group.width, group.done + columns)
            group.logits = self._prefill_columns(group, end)
            group.done = end
            if group.done < group.width:
                return None
        self.prefilling = None
        return self._join(group, group.logits)

    def _prefill_columns(self, group: _Prefill, end: int) -> torch.Tensor:
        """The logits of the group's last column after prefilling columns [done, end): one captured graph
        when the whole group fits one (nanochat.infer.graphs, Decoder.prefill), else a plain forward."""
        if group.done == 0 and end == group.width:
            graphed = self.engine.decoder.prefill(group.ids, group.cache.pad)
            if graphed is not None:
                group.cache, logits = graphed
                return logits
        return self.engine.prefill(group.ids[:, group.done : end], group.cache)

    def _next_group(self, budget: int | None) -> _Prefill | None:
        """The waiting requests to prefill together, in order: as many as free slots allow, while
        their padded width fits the budget (one alone when its prompt is longer: chunked)."""
        free = self.slots - len(self.running)
        joining: list[tuple[int, Request]] = []
        width = 0
        while self.waiting and len(joining) < free:
            wider = max(width, len(self.waiting[0][1].prompt))
            if joining and budget is not None and (len(joining) + 1) * wider > budget:
                break
            joining.append(self.waiting.popleft())
            width = wider
        if not joining:
            return None
        bos = self.engine.tokenizer.bos_token_id
        pad = to_device([width - len(req.prompt) for _, req in joining], torch.long, self.device)
        ids = to_device([[bos] * (width - len(req.prompt)) + req.prompt for _, req in joining], torch.long, self.device)
        return _Prefill(joining, ids, KVCache(self.cache.num_layers, width, pad=pad))

    def _join(self, group: _Prefill, logits: torch.Tensor) -> _Sampled:
        """Place a prefilled group so that its prompts end at the shared write position (moving the
        running rows right first when a prompt is longer than what is cached), and sample its first
        tokens (cancelled requests are prefilled with the others, then left out)."""
        slots = [slot for slot in range(self.slots) if slot not in self.running][: len(group.requests)]
        self._shift(max(0, group.width - self.cache.pos))
        rows = to_device(slots, torch.long, self.device)
        self.cache.place(rows, group.cache)
        members: list[_Slot | None] = []
        for slot, (rid, req) in zip(slots, group.requests, strict=True):
            member = _Slot(rid, req, start=self.cache.pos - len(req.prompt))  # its prompt ends at pos
            self.running[slot] = member
            members.append(member)
        requests = [req for _, req in group.requests]
        self.sampler.start(slots, [r.temperature for r in requests], [r.top_k for r in requests], [r.seed for r in requests])
        tokens = self.sampler.sample(logits, rows)
        self.feed[rows, 0] = tokens
        for i, (slot, (rid, _)) in enumerate(zip(slots, group.requests, strict=True)):
            if rid in group.cancelled:
                members[i] = None
                self._free(slot)
        return members, slots, tokens

    def _live_span(self) -> int:
        """Columns from the earliest start of a running row to pos."""
        if not self.running:
            return 0
        return self.cache.pos - min(s.start for s in self.running.values())

    def _make_room(self) -> None:
        """Before a decode step: when every column is used, drop those before the earliest running row."""
        if self.cache.pos >= self.capacity:
            self._shift(self._live_span() - self.cache.pos)

    def _shift(self, delta: int) -> None:
        if delta:
            self.cache.shift(delta, start=self.cache.pos - self._live_span())
            for s in self.running.values():
                s.start += delta
            free = [slot for slot in range(self.slots) if slot not in self.running]
            if free:
                self.cache.pad.index_fill_(0, to_device(free, torch.long, self.device), self.free_pad)


def decode_many(engine: Engine, prompts: list[list[int]], max_tokens: list[int], temperature: list[float],
                top_k: list[int | None], seed: list[int]) -> Iterator[list[int | None]]:
    """Decode different prompts together, each with its own sampling settings: yields per step the
    next token of each row, None once that row has stopped (after its stop token or max_tokens)."""
    batch = DecodeBatch(engine, slots=len(prompts), capacity=max(len(p) for p in prompts) + max(max_tokens))
    ids = [batch.add(Request(*settings)) for settings in zip(prompts, max_tokens, temperature, top_k, seed, strict=True)]
    while batch.busy:
        tokens = batch.step()
        yield [tokens.get(rid) for rid in ids]
