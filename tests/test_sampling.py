"""Batched sampling on the device (nanochat/infer/sampling.py): a row's token depends only on its own
logits, settings, seed and token count, whatever shares its batch; draws follow softmax(logits / T)
over the top k; and every decode loop samples a request the same way."""

from __future__ import annotations

import math

import pytest
import torch

from nanochat.infer.batch import Request
from nanochat.infer.engine import Engine, generate
from nanochat.infer.sampling import BatchSampler, sample
from tests.test_batching import alone, prompt, run_schedule
from tests.test_engine import PLAN, random_model

VOCAB = 64


def draw(logits: torch.Tensor, settings: list[tuple[float, int | None, int, int]]) -> list[int]:
    """One token per row; settings[r] = (temperature, top_k, seed, index)."""
    temperature, top_k, seed, index = zip(*settings, strict=True)
    ks = [k or 0 for k in top_k]
    return sample(logits, torch.tensor(temperature), torch.tensor(ks), torch.tensor(seed), torch.tensor(index),
                  max(ks)).tolist()


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


SETTINGS = [(1.0, None, 7, 0), (0.8, 5, 7, 3), (0.0, None, 1, 2), (1.5, 20, -3, 9), (0.3, 2, 2**62 + 5, 1)]


def test_a_row_samples_the_same_alone_and_in_any_slot_of_any_batch():
    logits = random_logits(len(SETTINGS))
    alone_tokens = [draw(logits[r : r + 1], [s])[0] for r, s in enumerate(SETTINGS)]
    assert draw(logits, SETTINGS) == alone_tokens
    order = [3, 0, 4, 2, 1]
    assert draw(logits[order], [SETTINGS[r] for r in order]) == [alone_tokens[r] for r in order]


def test_rows_with_another_seed_or_token_index_draw_other_noise():
    logits = torch.zeros(1, VOCAB).expand(400, -1)  # uniform: the token is the noise's argmax
    by_seed = draw(logits, [(1.0, None, seed, 0) for seed in range(400)])
    by_index = draw(logits, [(1.0, None, 5, index) for index in range(400)])
    assert len(set(by_seed)) == len(set(by_index)) == VOCAB  # every token comes up among 400 draws


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, None), (2.0, 3)])
def test_draws_over_many_seeds_follow_softmax_over_the_top_k(temperature, top_k):
    logits = torch.tensor([[1.0, 2.5, 0.0, -1.0, 2.0, 0.5, -3.0, 1.5]])
    n = 20_000
    tokens = draw(logits.expand(n, -1), [(temperature, top_k, seed, seed % 7) for seed in range(n)])
    expected = logits[0] / temperature
    if top_k is not None:
        expected = expected.masked_fill(logits[0] < logits[0].topk(top_k).values[-1], float("-inf"))
    expected = torch.softmax(expected, dim=0)
    frequency = torch.bincount(torch.tensor(tokens), minlength=8) / n
    # five standard deviations of a frequency of n draws, at most
    assert (frequency - expected).abs().max() < 5 * math.sqrt(0.25 / n)
    assert frequency[expected == 0].sum() == 0  # never a token outside the top k


def test_greedy_rows_take_the_argmax_whatever_the_seed():
    logits = random_logits(6, seed=1)
    assert draw(logits, [(0.0, 3, seed, seed) for seed in range(6)]) == logits.argmax(dim=1).tolist()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("odd", [
    dict(temperature=1e-30), dict(temperature=1e30), dict(temperature=INF), dict(temperature=NAN),
    dict(temperature=-1.0), dict(top_k=10**12), dict(top_k=1), dict(seed=2**63 - 1), dict(seed=-(2**63)),
    dict(seed=-1), dict(logits="nan"), dict(logits="all nan"), dict(logits="inf"), dict(logits="-inf"),
    dict(logits="all -inf"),
])
def test_odd_values_in_one_row_leave_the_other_rows_alone(odd):
    logits = random_logits(len(SETTINGS) + 1, seed=2)
    row = dict(temperature=0.9, top_k=10, seed=11, index=4) | {k: v for k, v in odd.items() if k != "logits"}
    odd_logits = logits[-1]
    if "logits" in odd:
        what = odd["logits"]
        if what.startswith("all"):
            odd_logits.fill_(NAN if "nan" in what else -INF)
        else:
            odd_logits[[3, 17]] = {"nan": NAN, "inf": INF, "-inf": -INF}[what]
    settings = [*SETTINGS, (row["temperature"], row["top_k"], row["seed"], row["index"])]
    tokens = draw(logits, settings)
    assert tokens[:-1] == draw(logits[:-1], SETTINGS)
    assert 0 <= tokens[-1] < VOCAB
    if odd in (dict(temperature=1e-30), dict(top_k=1)):
        assert tokens[-1] == int(logits[-1].argmax())
    if odd == dict(logits="inf"):
        assert tokens[-1] in (3, 17)


def test_batch_sampler_counts_each_rows_tokens():
    logits = random_logits(3, seed=3)
    sampler = BatchSampler(3, torch.device("cpu"))
    sampler.start([0, 1, 2], [1.0, 1.0, 0.0], [None, 8, None], [5, 6, 7])
    first = sampler.sample(logits).tolist()
    second = sampler.sample(logits[1:2], torch.tensor([1])).tolist()  # row 1 alone, at its second token
    assert first == draw(logits, [(1.0, None, 5, 0), (1.0, 8, 6, 0), (0.0, None, 7, 0)])
    assert second == draw(logits[1:2], [(1.0, 8, 6, 1)])
    assert sampler.index.tolist() == [1, 2, 1] and sampler.max_top_k == 8
    sampler.stop(1)
    assert sampler.max_top_k == 0


# ---- the decode loops


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN)


def test_a_request_samples_the_same_with_mates_joining_and_leaving_and_in_another_slot(engine, tokenizer):
    sampled = Request(prompt(tokenizer, "And God saw"), 12, temperature=1.0, top_k=30, seed=2**40 + 3)
    mates = [Request(prompt(tokenizer, "In the"), 3, temperature=0.7, top_k=None, seed=1),
             Request(prompt(tokenizer, "He"), 16, temperature=0.0),
             Request(prompt(tokenizer, "Then the Lord"), 4, temperature=1.2, top_k=5, seed=9)]
    expected = alone(engine, sampled)
    # slot 1, mates leaving after 3 and 4 tokens and one joining in the middle
    got, _ = run_schedule(engine, {0: [mates[0], sampled, mates[1]], 5: [mates[2]]}, slots=3, capacity=40)
    assert got[1] == expected
    # slot 2, joining a running batch
    got, _ = run_schedule(engine, {0: mates[:2], 2: [sampled]}, slots=3, capacity=40)
    assert got[2] == expected


def test_every_decode_loop_samples_a_seed_alike(engine, tokenizer):
    """The reference without a cache, Engine.generate (its sample 0) and the continuous batch."""
    ids = prompt(tokenizer, "And the earth")
    settings = dict(temperature=1.0, top_k=40, seed=123)
    engine.stop_ids, stop_ids = set(), engine.stop_ids  # all 10 tokens, stop tokens included
    try:
        reference = list(generate(engine.model, PLAN, ids, 10, **settings))
        rows, _ = engine.generate_batch(ids, 1, max_tokens=10, **settings)
        batched = alone(engine, Request(ids, 10, **settings))
    finally:
        engine.stop_ids = stop_ids
    assert rows[0][len(ids):] == reference == batched


def test_engine_samples_differ_from_each_other_and_repeat_for_a_seed(engine, tokenizer):
    ids = prompt(tokenizer, "And")
    a, _ = engine.generate_batch(ids, 4, max_tokens=8, temperature=1.0, top_k=None, seed=5)
    b, _ = engine.generate_batch(ids, 4, max_tokens=8, temperature=1.0, top_k=None, seed=5)
    c, _ = engine.generate_batch(ids, 4, max_tokens=8, temperature=1.0, top_k=None, seed=6)
    assert a == b and a != c
    assert len({tuple(row) for row in a}) == 4


def test_a_request_with_odd_settings_leaves_its_batch_mates_alone(engine, tokenizer):
    normal = Request(prompt(tokenizer, "And God"), 8, temperature=0.8, top_k=20, seed=4)
    odd = [Request(prompt(tokenizer, "In"), 8, temperature=1e-30, top_k=10**12, seed=2**63 - 1),
           Request(prompt(tokenizer, "He"), 8, temperature=1e30, top_k=1, seed=-(2**63))]
    got, _ = run_schedule(engine, {0: [odd[0], normal, odd[1]]}, slots=3, capacity=32)
    assert got[1] == alone(engine, normal)
    assert all(0 <= t < tokenizer.vocab_size for tokens in got for t in tokens)

