"""Data-parallel training on real torch.distributed (gloo) processes: buckets, sharded optimizer state,
the GradScaler's agreement across ranks, and resuming on another number of workers. Every check
compares against one process stepping the whole batch (two routes to one answer)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import resolve
from nanochat.train.data_parallel import plan_layout
from nanochat.train.step import TrainStep
from tests.conftest import free_port

ROWS, SEQ, VOCAB, ACCUM = 6, 32, 512, 2  # 6 rows split evenly over 1, 2 or 3 ranks
# largest parameter difference, relative to the parameter's largest value, against one process: the
# reductions add the same numbers in another order, and AdamW's first steps (lr 0.2 on the embedding)
# magnify float32 rounding in tiny gradients (seen: up to 7e-4 on the embedding, 2e-6 elsewhere)
TOLERANCE = 2e-3


def tiny_model() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, VOCAB, SEQ, 64, 32))
    model.init_weights()
    return model, model.setup_optimizer(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0)


def batches(rank: int, world: int, first_step: int = 0):
    """Micro-batches of a token stream that repeats every 2 steps (so there is something to learn);
    rank r takes rows r, r+W, ... of each."""
    for step in itertools.count(first_step):
        for micro in range(ACCUM):
            g = torch.Generator().manual_seed(10 * (step % 2) + micro)
            x = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)[rank::world]
            yield x[:, :-1], x[:, 1:]


def train_steps(world: int, rank: int, steps: int, shard: bool = True, comm_dtype=None, state=None, first_step: int = 0,
                scaler=None, poison=None) -> dict:
    """Run `steps` optimizer steps as rank `rank` of `world` (1 = a plain single process)."""
    model, optimizer = tiny_model()
    step = TrainStep(model, optimizer, resolve("float32", torch.device("cpu")), ACCUM, scaler)
    parallel = step.distribute(model, shard=shard, comm_dtype=comm_dtype) if world > 1 else None
    if state is not None:
        # a copy: optimizers adopt the tensors they load, and spawned ranks share the parent's memory
        state = copy.deepcopy(state)
        model.load_state_dict(state["model"])
        (parallel or optimizer).load_state_dict(state["optimizer"])
    data, losses = batches(rank, world, first_step), []
    for _ in range(steps):
        if poison is not None:
            poison(model)
        losses.append(step(data).loss)
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": (parallel or optimizer).state_dict(),
            "losses": losses, "scale": step.scaler.get_scale() if scaler else None, "skipped": step.skipped_total}


def _worker(rank: int, world: int, port: int, out: str, jobs: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {name: job(world, rank, **kwargs) for name, (job, kwargs) in jobs.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def runs_on_ranks(world: int, tmp_path, jobs: dict[str, tuple[Callable, dict]]) -> dict[str, dict]:
    """Rank 0's result of each named `job(world, rank, **kwargs)`, run one after another in the same
    `world` gloo processes: starting them (an interpreter and torch each) costs more than the jobs."""
    out = str(tmp_path / f"rank0_of_{world}.pt")
    mp.spawn(_worker, args=(world, free_port(), out, jobs), nprocs=world)
    return torch.load(out, weights_only=False)


def on_ranks(world: int, tmp_path, job=train_steps, **kwargs) -> dict:
    """Rank 0's result of `job(world, rank, **kwargs)` run in `world` gloo processes."""
    return runs_on_ranks(world, tmp_path, {"job": (job, kwargs)})["job"]


def max_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


def test_layout_keeps_muon_matrices_whole_and_balances_each_bucket():
    shapes = [torch.Size(s) for s in ((8, 4), (8, 4), (16, 4), (10, 3))]
    one_bucket = plan_layout(shapes, [True, True, True, False], ranks=2)
    assert one_bucket.buckets == [[3, 2, 1, 0]]  # backward order: the last parameter first
    assert [o.owner for o in one_bucket.ownership[:3]] == [1, 1, 0]  # the 64-element matrix alone, the two 32s together
    split = one_bucket.ownership[3]
    assert split.owner is None and [split.held(r, 10) for r in range(2)] == [(0, 5), (5, 10)]
    assert one_bucket.chunks == [64 + 15]  # the row-split 10x3 adds 15 to each segment
    # two buckets of 64 elements per segment: each is balanced on its own, so no segment is padded much
    layout = plan_layout([torch.Size((8, 8))] * 8, [True] * 8, ranks=2, bucket_bytes=4 * 64)
    assert [len(b) for b in layout.buckets] == [2, 2, 2, 2] and layout.chunks == [64] * 4
    assert sorted(o.owner for o in layout.ownership) == [0] * 4 + [1] * 4
    assert plan_layout([torch.Size((3, 2))], [False], ranks=4).ownership[0].held(3, 3) == (3, 3)  # a rank may hold no row


def _poison_rank_one(model: GPT) -> None:
    """An inf in a gradient row that rank 0 owns, put there by rank 1 before the step's last backward."""
    if dist.get_rank() == 1:
        model.transformer.wte.weight.register_hook(lambda g: torch.where(torch.arange(g.shape[0])[:, None] == 0, float("inf"), g))


def _poisoned_step(world: int, rank: int) -> list:
    before = tiny_model()[0].state_dict()
    # parallelize() swaps the plan's GradScaler (2**16) for a sharded one; this test checks that one
    result = train_steps(world, rank, steps=1, scaler=torch.amp.GradScaler("cpu"), poison=_poison_rank_one)
    gathered = [None] * world
    dist.all_gather_object(gathered, (result["scale"], result["skipped"], max_difference(result["model"], before)))
    return gathered


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, dict[str, dict]]:
    """world -> every multi-process run the tests below compare, by name: one spawn of 3 processes and
    one of 2 (the 2-rank resume starts from the 3-rank run's checkpoint)."""
    three = runs_on_ranks(3, tmp_path_factory.mktemp("three_ranks"), {
        "sharded": (train_steps, {"steps": 3, "shard": True}),
        "replicated": (train_steps, {"steps": 3, "shard": False}),
        "first_two_steps": (train_steps, {"steps": 2}),
    })
    two = runs_on_ranks(2, tmp_path_factory.mktemp("two_ranks"), {
        "sharded": (train_steps, {"steps": 3, "shard": True}),
        "replicated": (train_steps, {"steps": 3, "shard": False}),
        "resumed_from_three": (train_steps, {"steps": 2, "state": three["first_two_steps"], "first_step": 2}),
        "poisoned": (_poisoned_step, {}),
        "full_precision_sync": (train_steps, {"steps": 12, "comm_dtype": None}),
        "bf16_sync": (train_steps, {"steps": 12, "comm_dtype": torch.bfloat16}),
    })
    return {2: two, 3: three}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_and_replicated_steps_match_one_process(world, ranks):
    single = train_steps(1, 0, steps=3)
    sharded, replicated = ranks[world]["sharded"], ranks[world]["replicated"]
    assert max_difference(sharded["model"], single["model"]) < TOLERANCE
    assert max_difference(replicated["model"], single["model"]) < TOLERANCE
    assert max_difference(sharded["model"], replicated["model"]) < 1e-5  # the same sums (3 terms in another order)
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-5)


def test_an_inf_on_one_rank_skips_the_step_on_every_rank_and_halves_the_scale(ranks):
    assert ranks[2]["poisoned"] == [(2.0**15, 1, 0.0), (2.0**15, 1, 0.0)]


def test_a_sharded_checkpoint_resumes_on_fewer_workers_with_the_same_trajectory(ranks):
    straight = train_steps(1, 0, steps=4)
    first = ranks[3]["first_two_steps"]
    resumed_on_two = ranks[2]["resumed_from_three"]
    resumed_on_one = train_steps(1, 0, steps=2, state=first, first_step=2)
    for resumed in (resumed_on_two, resumed_on_one):
        assert first["losses"] + resumed["losses"] == pytest.approx(straight["losses"], abs=1e-4)
        assert max_difference(resumed["model"], straight["model"]) < TOLERANCE


def test_compressed_gradients_train_like_full_precision(ranks):
    full, compressed = ranks[2]["full_precision_sync"], ranks[2]["bf16_sync"]
    assert compressed["losses"][-1] < compressed["losses"][0] - 0.5  # it learns
    assert compressed["losses"] == pytest.approx(full["losses"], rel=0.02)
