"""The training step's fp16 machinery and divergence guard, on a tiny GPT on CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import DeviceInfo, plan_for
from nanochat.train.step import TrainingDiverged, TrainStep, lr_multiplier

CPU = DeviceInfo("cpu", "CPU")


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def fixed_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 128, (4, 33), generator=g) for _ in range(4)]
    return itertools.cycle([(r[:, :-1], r[:, 1:]) for r in rows])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_shape():
    lrm = [lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.0) for s in range(100)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)
    assert all(m == 1.0 for m in lrm[10:81])
    assert lrm[99] == pytest.approx(0.05) and all(a > b for a, b in itertools.pairwise(lrm[80:]))


def test_fp16_inf_gradient_skips_every_optimizer_and_halves_the_scale():
    plan = plan_for(CPU, "float16")
    assert plan.grad_scaler
    model = tiny_model()
    optimizer = model.setup_optimizer()
    kinds = {g["kind"] for g in optimizer.param_groups}
    assert kinds == {"muon", "adamw"}
    step = TrainStep(model, optimizer, plan, grad_accum=2, scaler=plan.make_grad_scaler())
    batches = fixed_batches()
    first = step(batches)
    assert not first.skipped
    scale = first.scale

    # poison one gradient (an embedding: an AdamW parameter) for exactly one backward pass
    before = snapshot(model)
    handle = model.transformer.wte.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    poisoned = step(batches)
    handle.remove()
    assert poisoned.skipped and poisoned.scale == scale / 2
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step must leave Muon and AdamW params alone"
    assert all(p.grad is None for p in model.parameters()), "gradients of the skipped step must not leak into the next"

    resumed = step(batches)
    assert not resumed.skipped and step.skipped_total == 1
    changed = snapshot(model)
    matrices = [k for k in before if changed[k].ndim == 2]
    assert all(not torch.equal(after[k], changed[k]) for k in matrices), "the next clean step updates every matrix"


def test_nan_loss_every_step_stops_with_a_clear_error():
    plan = plan_for(CPU, "float16")
    model = tiny_model()
    model.register_forward_hook(lambda module, args, out: out * float("nan"))
    step = TrainStep(model, model.setup_optimizer(), plan, grad_accum=1, scaler=plan.make_grad_scaler(), max_bad_steps=5)
    batches = fixed_batches()
    for _ in range(4):
        assert step(batches).skipped
    with pytest.raises(TrainingDiverged, match=r"5 optimizer steps in a row.*float16.*--dtype float32"):
        step(batches)


def test_fp32_nan_loss_is_skipped_without_touching_parameters():
    plan = plan_for(CPU, "float32")
    model = tiny_model()
    handle = model.register_forward_hook(lambda module, args, out: out * float("nan"))
    step = TrainStep(model, model.setup_optimizer(), plan, grad_accum=1, max_bad_steps=3)
    before = snapshot(model)
    assert step(fixed_batches()).skipped
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())
    handle.remove()
    assert not step(fixed_batches()).skipped and step.bad_in_a_row == 0


def _all_reduce_worker(rank: int, init_file: str, rows: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = tiny_model()
    half = rows[rank * 2 : (rank + 1) * 2]  # each worker: its half of the global batch
    step = TrainStep(model, model.setup_optimizer(), plan_for(CPU), grad_accum=1)
    step.distribute(model, shard=False)  # replicated: every gradient all-reduced (the sharded path: test_data_parallel.py)
    result = step(iter([(half[:, :-1], half[:, 1:])]))
    torch.save({"loss": result.loss, "state": model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_over_two_workers_equals_one_process_on_the_whole_batch(tmp_path):
    rows = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(3))
    torch.multiprocessing.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), rows, str(tmp_path)), nprocs=2)
    model = tiny_model()
    step = TrainStep(model, model.setup_optimizer(), plan_for(CPU), grad_accum=1)
    single = step(iter([(rows[:, :-1], rows[:, 1:])]))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(single.loss, abs=1e-5), "every worker sees the global mean loss"
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, atol=2e-5, rtol=1e-4)
