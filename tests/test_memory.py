"""The training memory model (nanochat/train/memory.py) against measured peaks, and --device-batch-size auto."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanochat.train import memory
from nanochat.train.data_parallel import DataParallel
from nanochat.train.memory import GiB

CALIBRATIONS = sorted((Path(__file__).parent.parent / "docs" / "memory").glob("calibration_*.json"))
P100 = dict(seq_len=2048, vocab_size=32768, dtype="float16", compile=False)


def test_there_is_calibration_data():
    assert CALIBRATIONS, "docs/memory/calibration_*.json is missing"


@pytest.mark.parametrize("path", CALIBRATIONS, ids=lambda p: p.name)
def test_prediction_within_10_percent_of_every_measured_peak(path):
    # every calibration file is checked, so a newly measured GPU/plan is held to the same bar
    rows = [r for r in memory.compare(memory.load_calibration(str(path))) if r["ok"]]
    assert rows
    bad = [(r["depth"], r["seq_len"], r["vocab_size"], r["device_batch_size"], f"{100 * r['error']:+.1f}%")
           for r in rows if abs(r["error"]) > 0.10]
    assert not bad, f"{path.name}: predicted vs measured off by more than 10%: {bad}"


@pytest.mark.parametrize("path", CALIBRATIONS, ids=lambda p: p.name)
def test_points_that_ran_out_of_memory_are_rejected(path):
    # the cap each file was measured under (16 GiB for the P100 emulation, else the card's memory)
    cap = 16 * GiB if "p100" in path.name else 80 * GiB
    for r in memory.compare(memory.load_calibration(str(path))):
        if not r["ok"]:
            args = memory._shape_args(r)
            assert memory.check_fit(cap, *args) is not None, f"{path.name}: an OOM point passes check_fit: {args}"


def test_fit_reproduces_the_hard_coded_coefficients():
    # the constants in memory.py must be what the documented command computes from the P100 file
    coef = memory.fit(memory.load_calibration(str(CALIBRATIONS[0].parent / "calibration_p100_fp16.json")))
    assert coef["act_half"] == pytest.approx(memory.ACT_EAGER_HALF, abs=0.01)
    assert coef["logits"] == pytest.approx(memory.LOGITS, abs=0.01)
    assert coef["const"] == pytest.approx(memory.CONST, abs=1)


def test_check_fit_on_a_16gb_budget_matches_what_was_measured():
    budget = memory.parse_memory("16GB")
    assert memory.check_fit(budget, 12, device_batch_size=4, **P100) is None
    reason = memory.check_fit(budget, 12, device_batch_size=8, **P100)
    assert reason is not None and "GiB" in reason and "16.0 GiB budget" in reason
    assert memory.largest_fitting_batch(budget, 12, **P100) == 4


@pytest.mark.parametrize("text, expected", [
    ("16GB", 16 * GiB), ("16GiB", 16 * GiB), ("16G", 16 * GiB), ("80 GB", 80 * GiB), ("12000MB", 12000 * 2**20),
    ("1.5T", int(1.5 * 2**40)), ("512mib", 512 * 2**20), ("1073741824", GiB),
])
def test_parse_memory(text, expected):
    assert memory.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "sixteen GB", "16 XB", "GB", "-4GB"])
def test_parse_memory_rejects_garbage(text):
    with pytest.raises(ValueError, match="as a memory size; write e.g. 16GB"):
        memory.parse_memory(text)


def test_largest_fitting_batch_grows_with_the_budget():
    for depth in (4, 12, 20):
        sizes = [memory.largest_fitting_batch(gib * GiB, depth, **P100) for gib in (1, 4, 8, 16, 24, 32, 48, 80, 160)]
        assert sizes == sorted(sizes), f"depth {depth}: {sizes}"
    assert memory.largest_fitting_batch(1 * GiB, 20, **P100) == 0  # nothing fits: 0, not an exception


def test_accumulation_and_precision_change_the_peak_the_right_way():
    one = memory.predict_peak_bytes(12, 2048, 4, 32768, "float16", False)
    assert memory.predict_peak_bytes(12, 2048, 4, 32768, "float16", False, grad_accum=8) > one  # grads held
    assert memory.predict_peak_bytes(12, 2048, 4, 32768, "float32", False) > one  # wider activations
    with pytest.raises(ValueError, match="dtype must be one of"):
        memory.predict_peak_bytes(12, 2048, 4, 32768, "fp16", False)


def test_auto_batch_with_a_fake_budget():
    # 524288 tokens / 2048 = 256 rows per step; 16 GiB fits B=4 at depth 12 (as measured)
    batch, accum, why = memory.auto_device_batch_size(16 * GiB, 12, 2048, 32768, "float16", False, 524288)
    assert (batch, accum) == (4, 64) and "predicted to fit" in why
    # the probe step has the last word: B=4 and B=2 run out of memory, B=1 passes
    tried = []

    def probe(b: int, a: int) -> bool:
        tried.append((b, a))
        return b == 1

    batch, accum, why = memory.auto_device_batch_size(16 * GiB, 12, 2048, 32768, "float16", False, 524288, probe=probe)
    assert (batch, accum) == (1, 256) and tried == [(4, 64), (2, 128), (1, 256)]
    assert "ran out of memory in the probe step" in why
    # the size divides the rows per step: 3 * 4 * 2048 tokens = 12 rows over 1 worker -> 4, not 8
    batch, accum, _ = memory.auto_device_batch_size(80 * GiB, 4, 2048, 32768, "bfloat16", True, 12 * 2048)
    assert (batch, accum) == (4, 3)
    # no GPU: the fixed CPU size, still dividing the rows
    assert memory.auto_device_batch_size(None, 2, 64, 4096, "float32", False, 4 * 64)[:2] == (4, 1)
    with pytest.raises(ValueError, match="even one row does not fit"):
        memory.auto_device_batch_size(1 * GiB, 20, 2048, 32768, "float16", False, 524288)


def test_base_train_auto_batch_on_cpu(data_dir, tokenizer_dir, tmp_path, capsys):
    # imported here, not at the top: the ranks spawned below import this module, and base_train is slow to import
    from nanochat.scripts import base_train

    args = ["--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
            "--run-dir", str(tmp_path), "--depth", "2", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "auto", "--total-batch-size", "1024", "--num-iterations", "3",
            "--eval-tokens", "512", "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1"]
    summary = base_train.main(args)
    out = capsys.readouterr().out
    # 1024 tokens / 64 = 16 rows per step: the CPU size 8, reached in 2 accumulation steps
    assert "--device-batch-size auto: device batch 8" in out
    assert "batch: 8 x 64 tokens x 2 accumulation" in out
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]  # trained, loss not NaN


def test_device_batch_size_rejects_garbage(data_dir, tokenizer_dir, tmp_path):
    from nanochat.scripts import base_train

    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        base_train.main(["--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
                         "--run-dir", str(tmp_path), "--depth", "2", "--head-dim", "32", "--max-seq-len", "64",
                         "--device-batch-size", "lots", "--num-iterations", "1"])


# --- data parallelism: what one rank holds --------------------------------------------------------
def _what_each_rank_holds(world: int, rank: int, bucket_bytes: int) -> list[dict]:
    """One real sharded step (DataParallel over gloo), then what this rank holds: its optimizer state,
    its largest same-shape Muon stack and its gradient buckets; every rank's, gathered."""
    from tests.test_data_parallel import SEQ, VOCAB, tiny_model

    model, optimizer = tiny_model()
    parallel = DataParallel(model, optimizer, shard=True, bucket_bytes=bucket_bytes)
    x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    parallel.arm()
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    parallel.finish(loss)
    parallel.optimizer.step()
    parallel.gather_params()
    state = sum(t.nbytes for s in parallel.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim)
    stacks = [sum(p.numel() for p in g["params"]) for g in parallel.optimizer.param_groups if g["kind"] == "muon"]
    mine = {"optimizer_state": state, "largest_stack": max(stacks, default=0),
            "segments": [b.chunk for b in parallel.buckets],
            "bucket_elements": sum(b.flat.numel() + b.out.numel() for b in parallel.buckets)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def test_rank_share_is_what_the_sharded_optimizer_and_its_buckets_really_hold(tmp_path):
    from tests.test_data_parallel import on_ranks

    # 3 ranks and 128 KiB buckets: matrices owned whole by one rank, the embeddings split by rows, and
    # buckets padded to their largest segment (the tiny model is depth 2, width 128, vocabulary 512)
    world, bucket_bytes = 3, 2**17
    real = on_ranks(world, tmp_path, job=_what_each_rank_holds, bucket_bytes=bucket_bytes)
    share = memory.rank_share(2, 512, 64, 32, world_size=world, shard=True, bucket_bytes=bucket_bytes)
    assert list(share.optimizer_state) == [r["optimizer_state"] for r in real]
    assert list(share.largest_stack) == [r["largest_stack"] for r in real]
    assert list(share.segments) == real[0]["segments"] and len(share.segments) > 1
    assert share.bucket_elements == real[0]["bucket_elements"]


def test_sharded_optimizer_state_per_rank_shrinks_as_one_over_the_workers():
    whole = memory.rank_share(12, 32768).optimizer_state
    params, muon = memory.model_params(12, 32768)
    assert whole == (sum((4 if m else 8) * p.numel() for p, m in zip(params, muon, strict=True)),)  # momentum; AdamW's 2 moments
    for world in (2, 4, 8):
        sharded = memory.rank_share(12, 32768, world_size=world).optimizer_state
        assert len(sharded) == world and sum(sharded) == whole[0]  # every byte owned once
        assert max(sharded) == pytest.approx(whole[0] / world, rel=0.06)  # balanced bucket by bucket: to 6%
        assert memory.rank_share(12, 32768, world_size=world, shard=False).optimizer_state == whole


def test_one_process_has_no_buckets_and_several_carry_their_gradients_in_them():
    one = memory.peak_parts(12, 2048, 4, 32768, "float16", False)
    assert one["buckets"] == 0 and one["grads"] == one["params"]
    replicated = memory.peak_parts(12, 2048, 4, 32768, "float16", False, world_size=4, shard=False)
    assert replicated["buckets"] == one["params"] and replicated["grads"] == 0  # one flat fp32 copy, no padding
    sharded = memory.peak_parts(12, 2048, 4, 32768, "float16", False, world_size=4)
    assert sharded["optimizer_state"] < one["optimizer_state"] / 3  # the all-gather reuses the buckets: no third peak
    assert memory.predict_peak_bytes(12, 2048, 4, 32768, "float16", False, world_size=1, shard=False) == \
        memory.predict_peak_bytes(12, 2048, 4, 32768, "float16", False)  # sharding means nothing to one process


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_what_fits_w_workers_shrinks_with_depth_and_grows_with_memory(workers):
    def largest(memory_size: str, shard: bool) -> list[int]:
        q = memory.FitQuestion(memory=memory_size, workers=workers, depths="4,8,12,16,20,24")
        return [r["sharded" if shard else "replicated"]["device_batch_size"] for r in memory.fit_table(q)]

    for shard in (True, False):
        sizes = {gib: largest(f"{gib}GB", shard) for gib in (8, 16, 32, 80)}
        for gib, by_depth in sizes.items():
            assert by_depth == sorted(by_depth, reverse=True), f"{gib} GiB, shard={shard}: {by_depth}"
        for depth_index in range(6):
            by_memory = [sizes[gib][depth_index] for gib in (8, 16, 32, 80)]
            assert by_memory == sorted(by_memory), f"shard={shard}, depth index {depth_index}: {by_memory}"
        assert sizes[80][0] > 0 and sizes[8][-1] == 0  # the range spans "fits" and "does not fit"


def test_auto_batch_knows_the_workers_and_the_sharding():
    # depth 20 on 16 GiB fp16, 8 workers: 32 rows each per step, the sharded optimizer's peak is the lower one
    args = (16 * GiB, 20, 2048, 32768, "float16", False, 524288, 8)
    batch, accum, why = memory.auto_device_batch_size(*args)
    assert (batch, accum) == (1, 32) and "predicted to fit" in why
    peaks = [memory.predict_peak_bytes(20, 2048, 1, 32768, "float16", False, grad_accum=32, world_size=8, shard=s)
             for s in (True, False)]
    assert peaks[0] < peaks[1]
    with pytest.raises(ValueError, match="on each of 8 workers"):
        memory.auto_device_batch_size(16 * GiB, 26, 2048, 32768, "float16", False, 524288, 8)


def test_the_fit_command_prints_the_table(capsys):
    rows = memory.main(["--memory", "16GB", "--workers", "4", "--dtype", "float16", "--depths", "4,12,26"])
    out = capsys.readouterr().out
    assert "4 worker(s) x 16.0 GiB, float16 eager" in out and "| depth | parameters | optimizer state, sharded" in out
    assert [r["depth"] for r in rows] == [4, 12, 26]
    assert "| 12 | 135 M | 0.18 | 0.69 |" in out  # a quarter of the replicated state per rank
    assert rows[1]["sharded"]["device_batch_size"] == 4 and out.rstrip().endswith("| - | - |")  # depth 26 fits nowhere
