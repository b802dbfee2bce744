"""Continuous batching (nanochat/infer/batch.py): requests that join a running batch at different steps,
in a cache small enough to be compacted, decode exactly as they would alone."""

from __future__ import annotations

import pytest
import torch

from nanochat.gpt import GPTConfig
from nanochat.infer.batch import DecodeBatch, Request
from nanochat.infer.cache import KVCache
from nanochat.infer.engine import Engine
from tests.test_engine import PLAN, random_model


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN)


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, prepend=tokenizer.bos_token_id)


def alone(engine: Engine, request: Request) -> list[int]:
    batch = DecodeBatch(engine, slots=1, capacity=len(request.prompt) + request.max_tokens)
    rid = batch.add(request)
    tokens = []
    while batch.busy:
        tokens += [t for r, t in batch.step().items() if r == rid]
    return tokens


def run_schedule(engine: Engine, schedule: dict[int, list[Request]], slots: int, capacity: int):
    """Add schedule[step] before that step; return every request's tokens and the batch."""
    batch = DecodeBatch(engine, slots=slots, capacity=capacity)
    tokens: dict[int, list[int]] = {}
    step = 0
    while batch.busy or step <= max(schedule):
        for request in schedule.get(step, []):
            tokens[batch.add(request)] = []
        for rid, token in batch.step().items():
            tokens[rid].append(token)
        step += 1
    return [tokens[rid] for rid in sorted(tokens)], batch


def test_requests_joining_at_different_steps_decode_as_alone(engine, tokenizer, monkeypatch):
    shifts = []
    original = KVCache.shift
    monkeypatch.setattr(KVCache, "shift", lambda self, delta, start=0: (shifts.append(delta), original(self, delta, start)))
    short = Request(prompt(tokenizer, "In"), 6, temperature=0.0)
    medium = Request(prompt(tokenizer, "And God said, Let there be light"), 20, temperature=0.0)
    long = Request(prompt(tokenizer, "In the beginning God created the heaven and the earth. And the earth was"), 12, temperature=0.0)
    # `long` joins when fewer columns are cached than its prompt has: the running rows move right;
    # the 48-column cache fills up and is compacted while `medium` is still running
    schedule = {0: [short], 2: [medium], 4: [long], 9: [Request(prompt(tokenizer, "He"), 25, temperature=0.0)]}
    got, batch = run_schedule(engine, schedule, slots=3, capacity=48)
    expected = [alone(engine, r) for requests in schedule.values() for r in requests]
    assert got == expected
    assert any(d > 0 for d in shifts) and any(d < 0 for d in shifts)  # both moves were exercised
    assert not batch.busy and batch.cache.pos == 0


def test_a_full_batch_queues_and_admits_as_slots_free(engine, tokenizer):
    requests = [Request(prompt(tokenizer, text), n, temperature=0.0) for text, n in (("And", 3), ("He said", 9), ("Then", 5), ("So", 4))]
    got, _ = run_schedule(engine, {0: requests}, slots=2, capacity=32)
    assert got == [alone(engine, r) for r in requests]


def test_sampling_follows_each_requests_seed_whatever_shares_the_batch(engine, tokenizer):
    sampled = Request(prompt(tokenizer, "And God"), 10, temperature=1.0, top_k=20, seed=7)
    others = [Request(prompt(tokenizer, "In the"), 8, temperature=0.8, top_k=None, seed=1), Request(prompt(tokenizer, "He"), 12, temperature=0.0)]
    got, _ = run_schedule(engine, {0: others, 3: [sampled]}, slots=3, capacity=40)
    assert got[2] == alone(engine, sampled)


def test_cancel_frees_the_slot_for_a_waiting_request(engine, tokenizer):
    batch = DecodeBatch(engine, slots=1, capacity=40)
    first = batch.add(Request(prompt(tokenizer, "And"), 30, temperature=0.0))
    batch.add(Request(prompt(tokenizer, "He said"), 4, temperature=0.0))
    assert set(batch.step()) == {first}  # the second waits for the only slot
    batch.cancel(first)
    tokens = []
    while batch.busy:
        step = batch.step()
        assert first not in step
        tokens += step.values()
    assert tokens == alone(engine, Request(prompt(tokenizer, "He said"), 4, temperature=0.0))


def test_requests_that_cannot_fit_are_refused(engine, tokenizer):
    batch = DecodeBatch(engine, slots=2, capacity=16)
    with pytest.raises(ValueError, match="exceeds the 16 positions"):
        batch.add(Request(prompt(tokenizer, "And God said"), 15, temperature=0.0))
    with pytest.raises(ValueError, match="rotary tables"):
        DecodeBatch(engine, slots=1, capacity=10**6)


class TransitionModel(torch.nn.Module):
    """Proposes, for each row, the token `after` maps its last input token to (`otherwise` for the
    rest): what it proposes shows which token it was fed."""

    def __init__(self, after: dict[int, int], otherwise: int, vocab_size: int):
        super().__init__()
        self.after, self.otherwise, self.vocab_size = after, otherwise, vocab_size
        self.transformer = torch.nn.ModuleDict({"h": torch.nn.ModuleList([torch.nn.Identity()])})
        self.register_buffer("cos", torch.zeros(1, 1, 256, 1))
        self.config = GPTConfig(sequence_len=256)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, kv_cache):
        rows, columns = idx.shape
        kv_cache.insert(0, torch.zeros(rows, 1, columns, 1), torch.zeros(rows, 1, columns, 1))
        kv_cache.advance(columns)
        logits = torch.zeros(rows, columns, self.vocab_size)
        for row, token in enumerate(idx[:, -1].tolist()):
            logits[row, -1, self.after.get(token, self.otherwise)] = 1.0
        return logits


def test_a_tool_output_is_fed_in_place_of_what_was_sampled_while_a_batch_mate_decodes_on(tokenizer):
    sp = tokenizer.encode_special
    call = [sp("<|python_start|>"), *tokenizer.encode("12*7"), sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *tokenizer.encode("84"), sp("<|output_end|>")]
    marker, other = tokenizer.encode("!")[0], tokenizer.encode("?")[0]
    # after the call the model would end the answer; fed the calculator's output it writes `marker`:
    # a step decoded on the sampled token instead of the forced one would show as `other`
    after = {tokenizer.bos_token_id: call[0], **dict(zip(call[:-1], call[1:], strict=True)), call[-1]: sp("<|assistant_end|>"),
             output[-1]: marker, marker: sp("<|assistant_end|>")}
    engine = Engine(TransitionModel(after, other, tokenizer.vocab_size), tokenizer, PLAN)
    requests = [Request([tokenizer.bos_token_id], 30, temperature=0.0), Request([tokenizer.bos_token_id, other], 20, temperature=0.0)]
    got, _ = run_schedule(engine, {0: requests}, slots=2, capacity=64)
    assert got == [call + output + [marker, sp("<|assistant_end|>")], [other] * 20]


def test_warm_up_leaves_an_empty_batch_that_decodes_as_a_fresh_one(engine, tokenizer):
    request = Request(prompt(tokenizer, "In the beginning"), max_tokens=8, temperature=0.0)
    batch = DecodeBatch(engine, slots=3, capacity=32)
    batch.warm_up()  # one busy slot, then all three
    assert not batch.busy and batch.active() == set() and batch.cache.pos == 0
    rid = batch.add(request)
    tokens = []
    while batch.busy:
        tokens += [t for r, t in batch.step().items() if r == rid]
    assert tokens == alone(engine, request)
