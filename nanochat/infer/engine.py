"""The engine: samples of one prompt decoded together on a KV cache, with the calculator tool.

`Engine.generate` prefills the prompt once and decodes its `num_samples` rows together. Every decode
loop (this one, nanochat.infer.batch.DecodeBatch and the cache-free reference `generate` the tests
compare the engine against) samples the same way, all rows at once on the device
(nanochat.infer.sampling.BatchSampler), then takes the per-row step `Engine.next_token`: a queued
calculator output overrides the sampled token (forced: RL must not learn from it), a <|python_end|>
sends the call to the calculator, <|assistant_end|> ends the row.

Rule: sampling defaults come from `SAMPLING` and the longest context from `context_length`, for
every caller (CLI, evals, RL, server); other values are passed explicitly (evals decode greedily).
A row's tokens depend only on its prompt and (temperature, top-k, seed): sample r of a decode
seeded s samples with `sample_seed(s, r)`, so one sample decodes as a lone request seeded s does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from nanochat.calculator import calculate
from nanochat.infer.cache import KVCache
from nanochat.infer.graphs import Decoder
from nanochat.infer.sampling import BatchSampler, as_int64
from nanochat.precision import PrecisionPlan
from nanochat.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """Temperature (0 = greedy), top-k (None = every token) and the random seed of a decode."""

    temperature: float = 0.6
    top_k: int | None = 50
    seed: int = 42


SAMPLING = Sampling()


def context_length(model: nn.Module) -> int:
    """Prompt + answer tokens a model may hold: the length it was trained on. Its rotary tables
    reach 10x further, but positions it never saw in training give answers nobody checked, and a
    server must be able to promise the same limit on every replica."""
    return model.config.sequence_len


@torch.no_grad()
def generate(
    model: nn.Module,
    plan: PrecisionPlan,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = SAMPLING.temperature,
    top_k: int | None = SAMPLING.top_k,
    seed: int = SAMPLING.seed,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids continuing `ids`, re-running the full context each time."""
    device = next(model.parameters()).device
    context_len = context_length(model)
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    sampler = BatchSampler(1, device)
    sampler.start([0], [temperature], [top_k], [seed])
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        with plan.compute_context():
            logits = model(tokens[:, -context_len:])[:, -1, :]
        next_id = sampler.sample(logits)
        tokens = torch.cat([tokens, next_id[:, None]], dim=1)
        yield int(next_id)
    model.train(was_training)


def sample_text(model: nn.Module, tokenizer: Tokenizer, plan: PrecisionPlan, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt` (BOS-prefixed, as documents are during training)."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
    return tokenizer.decode(list(generate(model, plan, ids, max_new_tokens, temperature=0.0)))


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued at once, and values()
    waits for that copy only, not for the work queued after it."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type == "cuda":
            self.buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.buffer.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buffer = tensor

    def values(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.buffer.view(-1).tolist()


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample` of a decode seeded `seed`: sample 0 keeps `seed` (one sample
    decodes as a lone request with that seed does), the others step away along a Weyl sequence."""
    return as_int64(seed + sample * 0x9E3779B97F4A7C15)


@dataclass
class Row:
    """Decoding state of one sample: tokens to force next, and the tool call being written."""

    forced: deque = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    done: bool = False


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """The tokens that end an answer."""
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}


class Engine:
    """Batched KV-cache sampling from a chat model, with the calculator tool. Prompts are prefilled
    with the model; one-token steps go through a `Decoder` (nanochat.infer.graphs; `decode`: its mode)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, plan: PrecisionPlan, decode: str = "auto"):
        self.model, self.tokenizer, self.plan = model, tokenizer, plan
        self.decoder = Decoder(model, plan, decode)
        special = tokenizer.encode_special
        self.stop_ids = stop_ids(tokenizer)
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) of the last position of `ids` (rows, T) after the tokens `cache` holds:
        a plain forward (one-token steps of a decode loop go through `self.decoder`)."""
        with self.plan.compute_context():
            return self.model(ids, kv_cache=cache)[:, -1, :]

    def next_token(self, row: Row, sampled: int) -> tuple[int, bool]:
        """The row's next token, given what was sampled for it, and whether it was forced (a tool output)."""
        forced = bool(row.forced)
        token = row.forced.popleft() if forced else sampled
        if not row.done:
            self._use_tool(row, token)
            row.done = token in self.stop_ids
        return token, forced

    def _use_tool(self, row: Row, token: int) -> None:
        """Track <|python_start|> ... <|python_end|> and queue the calculator's answer."""
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = calculate(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = SAMPLING.temperature,
        top_k: int | None = SAMPLING.top_k,
        seed: int = SAMPLING.seed,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per decoding step, (the next token of each row, mask: 1 sampled / 0 forced).

        Rows that have stopped keep being fed (their tokens are ignored by callers) until every
        row has stopped or `max_tokens` steps were taken."""
        device = next(self.model.parameters()).device
        limit = context_length(self.model)
        max_tokens = min(max_tokens, limit - len(prompt))
        if max_tokens <= 0:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate (model limit {limit})")
        sampler = BatchSampler(num_samples, device, fused=self.decoder.compile)
        sampler.start(list(range(num_samples)), [temperature] * num_samples, [top_k] * num_samples,
                      [sample_seed(seed, r) for r in range(num_samples)])
        self.decoder.sync_weights()
        prefill = KVCache(len(self.model.transformer.h), len(prompt) + max_tokens)
        logits = self.prefill(torch.tensor([prompt], dtype=torch.long, device=device), prefill)
        workspace = None if self.decoder.mode == "eager" else self.decoder.workspace(num_samples, prefill.max_len, prefill)
        cache = prefill.repeat(num_samples, into=workspace)
        logits = logits.expand(num_samples, -1)
        rows = [Row() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sampler.sample(logits)[:, None]
            forcing = any(row.forced for row in rows)
            sampled_host = HostCopy(sampled)
            if not forcing and step < max_tokens - 1:
                # run the next step on the sampled ids while the host reads them and does its
                # bookkeeping: the GPU does not wait for Python between tokens
                logits = self.decoder(sampled, cache)
            tokens, mask = [], []
            for row, token in zip(rows, sampled_host.values(), strict=True):
                token, forced = self.next_token(row, token)
                tokens.append(token)
                mask.append(0 if forced else 1)
            yield tokens, mask
            if all(row.done for row in rows) or step == max_tokens - 1:
                return
            if forcing:  # a tool output overrides some rows' ids: feed the host's tokens
                logits = self.decoder(torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1), cache)

    def generate_batch(self, prompt: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Whole samples: prompt + generated tokens of each row, up to and including its stop token,
        and the matching masks (0 on the prompt and on forced tool outputs)."""
        results = [list(prompt) for _ in range(num_samples)]
        masks = [[0] * len(prompt) for _ in range(num_samples)]
        done = [False] * num_samples
        for tokens, mask in self.generate(prompt, num_samples, **kwargs):
            for i, (token, m) in enumerate(zip(tokens, mask, strict=True)):
                if done[i]:
                    continue
                results[i].append(token)
                masks[i].append(m)
                done[i] = token in self.stop_ids
        return results, masks

    def answers(self, prompt: list[int], num_samples: int = 1, **kwargs) -> list[str]:
        """The text of each sampled answer (stop token excluded, tool calls and outputs included)."""
        answers = [row[len(prompt):] for row in self.generate_batch(prompt, num_samples, **kwargs)[0]]
        return [self.tokenizer.decode(a[:-1] if a and a[-1] in self.stop_ids else a) for a in answers]

    def complete(self, prompt: list[int], **kwargs) -> str:
        """The text of one sampled answer."""
        return self.answers(prompt, 1, **kwargs)[0]
