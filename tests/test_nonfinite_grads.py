"""A finite loss with an inf/NaN gradient, in float32 without a GradScaler: the step is skipped whole, as an
fp16 overflow is, on one process and on two gloo ranks of the sharded optimizer (where only the rank that
owns the bad piece sees it). Tiny GPTs on CPU through the real TrainStep and DataParallel."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from nanochat.gpt import GPT
from nanochat.precision import resolve
from nanochat.train.step import TrainingDiverged, TrainStep
from tests.test_data_parallel import ACCUM, TOLERANCE, batches, max_difference, runs_on_ranks, tiny_model

FP32 = resolve("float32", torch.device("cpu"))
POISONED = 2  # the step whose backward gets a non-finite gradient
STEPS = 8


def _inf_in_first_row(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[0, 0] = float("inf")
    return grad


def _nan_in_first_row(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[0, 0] = float("nan")
    return grad


def snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def all_finite(model: GPT) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_gradient_with_a_finite_loss_skips_the_step_and_training_goes_on():
    model, optimizer = tiny_model()
    step = TrainStep(model, optimizer, FP32, ACCUM)
    data, results = batches(0, 1), []
    for k in range(STEPS):
        handle = model.transformer.h[0].mlp.c_fc.weight.register_hook(_nan_in_first_row) if k == POISONED else None
        before = snapshot(model)
        reference = copy.deepcopy(model)  # the same micro-batches' gradient, the plain way
        results.append(step(data))
        if handle is not None:
            handle.remove()
            assert results[-1].skipped and math.isfinite(results[-1].loss) and math.isnan(results[-1].grad_norm)
            assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items()), "a skipped step leaves every parameter alone"
            assert all(p.grad is None for p in model.parameters()), "the bad gradients must not leak into the next step"
        else:
            for x, y in itertools.islice(batches(0, 1, first_step=k), ACCUM):
                (reference(x, y) / ACCUM).backward()
            expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
            assert results[-1].grad_norm == pytest.approx(expected.item(), rel=1e-5)
    assert [r.skipped for r in results] == [k == POISONED for k in range(STEPS)]
    assert step.skipped_total == 1 and step.bad_in_a_row == 0 and all_finite(model)
    assert results[-1].loss < results[POISONED].loss - 0.5  # it still learns


def test_an_inf_gradient_on_every_step_stops_with_a_clear_error():
    model, optimizer = tiny_model()
    model.transformer.wte.weight.register_hook(_inf_in_first_row)
    step = TrainStep(model, optimizer, FP32, ACCUM, max_bad_steps=3)
    data = batches(0, 1)
    assert step(data).skipped and step(data).skipped
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row.*gradient norm inf.*float32"):
        step(data)
    assert all_finite(model)


def train_with_one_bad_gradient(world: int, rank: int, shard: bool = True) -> dict:
    """STEPS steps as rank `rank` of `world`; at step POISONED the last rank puts an inf in row 0 of the
    embedding's gradient. Row-split over the ranks, row 0 is rank 0's: the reduce-scatter hands the inf to
    rank 0 alone, so the other rank skips only if the finding is shared."""
    model, optimizer = tiny_model()
    step = TrainStep(model, optimizer, FP32, ACCUM)
    if world > 1:
        step.distribute(model, shard=shard)
    data, results = batches(rank, world), []
    for k in range(STEPS):
        poison = k == POISONED and rank == world - 1
        handle = model.transformer.wte.weight.register_hook(_inf_in_first_row) if poison else None
        results.append(step(data))
        if handle is not None:
            handle.remove()
    mine = {"skipped": [r.skipped for r in results], "skipped_total": step.skipped_total, "finite": all_finite(model)}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    return {"ranks": everyone, "model": snapshot(model), "losses": [r.loss for r in results],
            "grad_norms": [r.grad_norm for r in results]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Both layouts on 2 ranks (one spawn), and one process stepping the whole batch with the same bad gradient."""
    return {**runs_on_ranks(2, tmp_path_factory.mktemp("two_ranks"), {
        "sharded": (train_with_one_bad_gradient, {"shard": True}),
        "replicated": (train_with_one_bad_gradient, {"shard": False}),
    }), "single": train_with_one_bad_gradient(1, 0)}


@pytest.mark.parametrize("layout", ["sharded", "replicated"])
def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank(layout, runs):
    run, single = runs[layout], runs["single"]
    expected = {"skipped": [k == POISONED for k in range(STEPS)], "skipped_total": 1, "finite": True}
    assert run["ranks"] == [expected, expected] and single["ranks"] == [expected]
    # the two ranks took the path of one process stepping the whole batch
    assert max_difference(run["model"], single["model"]) < TOLERANCE
    assert run["losses"] == pytest.approx(single["losses"], abs=1e-5)
    clean = [k for k in range(STEPS) if k != POISONED]
    assert [run["grad_norms"][k] for k in clean] == pytest.approx([single["grad_norms"][k] for k in clean], rel=1e-4)
    assert math.isinf(run["grad_norms"][POISONED])
    assert run["losses"][-1] < run["losses"][POISONED] - 0.5
