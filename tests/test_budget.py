"""--time-budget: the horizon fitted from measured step costs, and a real CPU run landing on its budget."""

from __future__ import annotations

import time

import pytest

from nanochat.errors import UsageError
from nanochat.runlog import read_metrics
from nanochat.scripts import base_train
from nanochat.train.budget import WARMUP_STEPS, Costs, due_between, fit_iterations, parse_duration


def test_durations():
    assert [parse_duration(t) for t in ("6h", "90m", "45s", "1h30m", "300", "2.5h")] == [21600, 5400, 45, 5400, 300, 9000]
    for bad in ("6x", "", "h", "-5"):
        with pytest.raises(ValueError, match="6h, 90m, 45s"):
            parse_duration(bad)


def test_fitted_horizon_fills_the_budget_and_no_more():
    costs = Costs(step_s=0.5, eval_s=3.0, sample_s=1.0, save_s=2.0)
    n = fit_iterations(1000.0, 10, costs, eval_every=100, sample_every=-1, save_every=250)

    def seconds(m: int) -> float:  # the same total, counted event by event
        steps = range(11, m + 1)
        return ((m - 10) * costs.step_s + sum(costs.eval_s for s in steps if s % 100 == 0 or s == m)
                + costs.sample_s + sum(costs.save_s for s in steps if s % 250 == 0 or s == m))

    assert seconds(n) <= 1000.0 < seconds(n + 1)
    assert due_between(100, 10, 300) == 2 and due_between(-1, 0, 10) == 0


# long enough that the fixed costs (setup, the timed first steps, the final eval and samples) stay
# well inside 10 %, on a busy machine too
BUDGET_S = 60


def budgeted_args(data_dir, tokenizer_dir, run, budget: str) -> list[str]:
    return ["--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run),
            "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
            "--total-batch-size", "512", "--eval-tokens", "1024", "--sample-every", "-1", "--eval-every", "200",
            "--save-every", "-1", "--time-budget", budget]


def test_time_budget_lands_within_ten_percent(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    summary = base_train.main(budgeted_args(data_dir, tokenizer_dir, run, f"{BUDGET_S}s"))
    wall = time.perf_counter() - t0
    assert 0.9 * BUDGET_S <= wall <= 1.1 * BUDGET_S, f"a {BUDGET_S} s budget took {wall:.1f} s"
    decision = summary["time_budget"]
    # the schedule saw the final horizon: the last step ran at the end of its warmdown
    records = read_metrics(run / "metrics.jsonl")
    assert summary["steps"] == decision["num_iterations"] == len(records)
    assert records[-1]["lr_mult"] == pytest.approx(1 / round(0.2 * summary["steps"]))
    assert decision["tokens_per_param"] == pytest.approx(summary["steps"] * 512 / summary["params"])


def test_a_budget_too_small_to_calibrate_is_refused_at_the_first_timed_step(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UsageError) as refused:  # half a second: too small on any machine (the refusal counts whole seconds)
        base_train.main(budgeted_args(data_dir, tokenizer_dir, run, "0.5s"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--time-budget 0.5s is too small to calibrate: ")
    minimum = int(message.split("Give at least --time-budget ")[1].split("s")[0])
    assert minimum >= 1 and message.endswith("or --num-iterations instead.")
    # stopped as soon as the cost was known: the warm-up steps and the first timed one, no more
    assert len(read_metrics(run / "metrics.jsonl")) == WARMUP_STEPS
