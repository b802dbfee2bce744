"""The training memory model (nanochat/train/memory.py) against measured peaks, and --device-batch-size auto."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanochat.scripts import base_train
from nanochat.train import memory
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
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        base_train.main(["--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
                         "--run-dir", str(tmp_path), "--depth", "2", "--head-dim", "32", "--max-seq-len", "64",
                         "--device-batch-size", "lots", "--num-iterations", "1"])
