"""bench_train and bench_infer through their command lines, on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.scripts import bench_scaling, bench_train
from nanochat.train.memory import fits, two_steps

TINY = ["--device", "cpu", "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--vocab-size", "512",
        "--device-batch-size", "2", "--steps", "2", "--warmup", "1"]


def test_bench_reports_throughput_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_train.main([*TINY, "--total-batch-size", "256", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["grad_accum"] == 2 and result["tok_per_s"] > 0 and result["ms_per_step"] > 0
    model = GPT(GPTConfig.from_depth(2, 512, 64, head_dim=32))
    assert result["flops_per_token"] == model.estimate_flops()
    assert result["mfu"] is None and result["skipped_steps"] == 0  # CPU: no peak FLOP/s to compare with


def test_two_steps_run_the_training_step_and_report_the_model_size():
    from nanochat.config import parse_config
    from nanochat.precision import resolve

    cfg = parse_config(bench_train.BenchConfig, TINY)
    device = torch.device("cpu")
    expected = GPT(GPTConfig.from_depth(2, 512, 64, head_dim=32)).num_params()
    assert two_steps(cfg, resolve("auto", device), device, batch_size=2) == expected
    assert fits(cfg, resolve("auto", device), device, batch_size=2)


def test_find_max_batch_needs_a_gpu():
    with pytest.raises(SystemExit, match="CUDA"):
        bench_train.main([*TINY, "--find-max-batch"])



def test_bench_infer_times_the_engine_and_the_served_decode_path(tmp_path):
    from nanochat.scripts import bench_infer

    path = tmp_path / "infer.json"
    out = bench_infer.main(["--device", "cpu", "--depth", "1", "--vocab-size", "512", "--prompt-len", "16",
                            "--new-tokens", "6", "--num-samples", "1,3", "--repeats", "1", "--decode", "static",
                            "--out", str(path)])
    assert json.loads(path.read_text()) == out and out["decode"] == "static"
    assert [r["rows"] for r in out["results"]] == [1, 3]
    for r in out["results"]:
        assert r["ttft_ms"] > 0 and r["tok_per_s"] == pytest.approx(r["rows"] * r["tok_per_s_per_stream"])
        assert r["share_of_bound"] is None  # no bandwidth figure for a CPU
    # bytes per step: the matrix weights once plus each row's KV cache at the mid-decode context (19)
    model = GPT(GPTConfig.from_depth(1, 512, 2048))
    weights = 4 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    kv_per_row = 4 * 1 * 2 * model.config.n_embd * 19
    assert out["results"][1]["bytes_per_step"] == weights + 3 * kv_per_row
    # the served decode path: greedy and sampled side by side, then requests joining and leaving
    served = out["serve_path"]
    assert served["slots"] == 3 and [r["rows"] for r in served["results"]] == [1, 3]
    runs = [run for r in served["results"] for run in (r["greedy"], r["sampled"])] + [served["join_and_leave"]]
    assert all(run[key] > 0 for run in runs for key in ("ttft_ms", "ms_per_step", "tok_per_s"))
    assert all(r["sampled_over_greedy"] > 0 for r in served["results"])
    assert served["join_and_leave"]["requests"] == 6 and served["join_and_leave"]["steps"] > 6


@pytest.mark.parametrize("args, message", [(["--num-samples", "1,x"], "positive row counts"),
                                           (["--num-samples", "0"], "positive row counts"),
                                           (["--repeats", "0"], "at least one timed run")])
def test_bench_infer_refuses_bad_batch_lists(args, message):
    from nanochat.scripts import bench_infer

    with pytest.raises(SystemExit, match=message):
        bench_infer.main(["--device", "cpu", "--depth", "1", *args])


@pytest.mark.parametrize("args, message", [(["--rows", "1,x"], "positive row counts"), (["--rows", "0"], "positive row counts"),
                                           ([], "run it on a GPU")])
def test_bench_matvec_refuses_bad_rows_and_the_cpu(args, message):
    from nanochat.scripts import bench_matvec

    with pytest.raises(SystemExit, match=message):
        bench_matvec.main(["--device", "cpu", *args])


def test_bench_scaling_runs_the_sharded_step_on_gloo_workers_and_writes_json(tmp_path):
    out = tmp_path / "scaling.json"
    results = bench_scaling.main(["--depth", "2", "--max-seq-len", "32", "--vocab-size", "256", "--head-dim", "32",
                                  "--device-batch-size", "2", "--workers", "1,2", "--steps", "1", "--warmup", "1",
                                  "--device", "cpu", "--out", str(out)])
    assert [r["world"] for r in results] == [1, 2] and json.loads(out.read_text()) == results
    assert results[0]["efficiency"] == 1.0 and results[1]["efficiency"] > 0 and results[1]["shard_optimizer"]
    assert all(r["tok_per_s_per_worker"] > 0 and r["optimizer_s"] > 0 for r in results)


def test_bench_scaling_refuses_worker_counts_that_are_not_positive_integers():
    with pytest.raises(SystemExit, match="--workers '1,x'"):
        bench_scaling.main(["--workers", "1,x"])


def test_bench_scaling_refuses_more_workers_than_gpus():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without enough GPUs")
    with pytest.raises(SystemExit, match="GPU"):
        bench_scaling.main(["--device", "cuda", "--workers", "1,2"])
