"""Tune base pretraining: device/total batch size and the Muon/AdamW learning rates, with Ray Tune.

    # a GPU cluster (or one GPU machine): one trial per GPU of the strongest precision group
    python -m ray_jobs.tune --depth 12 --num-samples 16 --token-budget 33554432
    # the P100 path on a modern GPU: fp16, no compile, configs the 16 GB memory model rejects dropped
    NANOCHAT_EMULATE=p100 python -m ray_jobs.tune --depth 12 --num-samples 16
    # a tiny CPU sweep
    python -m ray_jobs.tune --depth 2 --head-dim 64 --max-seq-len 128 --device-batch-sizes 4,8 \
        --total-batch-sizes 1024,2048 --token-budget 65536 --eval-tokens 4096 --num-samples 4 --max-concurrent 1
    # continue a sweep that was interrupted (Ctrl+C, a lost driver): same --name / --storage-path
    python -m ray_jobs.tune --depth 12 --num-samples 16 --resume
    # submitted to a running cluster (see docs/cluster.md)
    ray job submit --working-dir . -- python -m ray_jobs.tune --depth 12 --num-samples 16

Every trial is a TorchTrainer of ray_jobs/train.py (its worker loop, Ray Data pipeline and Ray Train
checkpoints) inside one precision group; ASHA stops trials whose validation bpb lags after a short
token budget. Writes best_config.json (feed it to base_train / ray_jobs.train with --config),
trials.csv, trials.json and bpb_vs_params.png into the experiment dir. See docs/tuning.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import DONE
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from nanochat.common import base_dir
from nanochat.config import DTYPE_CHOICES, int_list, option, parse_config
from nanochat.precision import ACCELERATOR_TYPES, GB, DeviceInfo, PrecisionPlan, gpu_memory, plan_for, resolve
from nanochat.tokenizer import Tokenizer
from nanochat.tracking import Tracker, default_uri, end_status, ensure_experiment, sigterm_as_exit, ui_command
from nanochat.train import memory
from nanochat.train.base import BaseTrainConfig
from nanochat.train.stages import STAGES
from ray_jobs import train
from ray_jobs.cluster import connect, planned_nodes, run_driver
from ray_jobs.data import check_shards
from ray_jobs.scheduler import Group, format_groups, groups, nodes_from_ray, plan_cluster

METRIC = "val_bpb"
TIME_ATTR = "tokens"  # ASHA's clock: trials with different batch sizes take different steps per token
TUNED = ("device_batch_size", "total_batch_size", "matrix_lr", "embedding_lr", "unembedding_lr")
# what best_config.json holds: the tuned values and the model shape they were tuned for (all of
# them BaseTrainConfig fields, so `base_train --config best_config.json` accepts the file)
BEST_KEYS = (*TUNED, "depth", "max_seq_len", "aspect_ratio", "head_dim")
RUN_ID_FILE = "mlflow_run_id"

@dataclass
class TuneOptions:
    num_samples: int = option(16, "trials to run")
    token_budget: int = option(2**25, "training tokens per trial (the horizon a trial that is never stopped reaches)")
    evals_per_trial: int = option(8, "validation evaluations per trial: the points where ASHA may stop it")
    grace_evals: int = option(2, "ASHA grace period: evaluations every trial gets before it can be stopped")
    reduction_factor: int = option(3, "ASHA reduction factor: at each rung only the best 1/N go on")
    max_concurrent: int = option(0, "trials at once; 0 = the precision group's GPUs / --num-workers (on CPU: 2)")
    gpu_memory: str = option("", "memory of the target GPU, e.g. 16GB; empty = the GPU's own (emulation cap "
                                 "included); 'unlimited' = no memory filter")
    target_dtype: str = option("auto", "dtype the memory model assumes; auto = what the trials run in", choices=DTYPE_CHOICES)
    device_batch_sizes: str = option("1,2,4,8,16,32,64", "candidate micro-batch sizes (rows), comma-separated")
    total_batch_sizes: str = option("131072,262144,524288,1048576", "candidate tokens per optimizer step, comma-separated")
    matrix_lr_range: str = option("0.005,0.08", "log-uniform range of the Muon learning rate (default 0.02)")
    embedding_lr_range: str = option("0.05,0.8", "log-uniform range of the embedding AdamW learning rate (default 0.2)")
    unembedding_lr_range: str = option("0.001,0.016", "log-uniform range of the lm_head AdamW learning rate (default 0.004)")
    with_default: bool = option(True, "make the first trial nanochat's default settings, as the baseline to beat")
    search_seed: int = option(0, "seed of the random search: the same seed samples the same trials")
    name: str = option("", "sweep name (a folder in --storage-path); empty = tune_d<depth>")
    resume: bool = option(False, "continue the sweep in --storage-path/--name (a finished one: rewrite its outputs)")
    # base_train evaluates 10M tokens by default: far too much for evaluations this frequent
    eval_tokens: int = option(2 * 524288, "validation tokens per evaluation")
    mlflow_experiment: str = option("", "MLflow experiment of the trials' runs; empty = the sweep's name")


def config_class() -> type:
    """base_train's settings + ray_jobs.train's Ray options + the sweep's own: one set of flags."""
    return dataclasses.make_dataclass("TuneConfig", [], bases=(TuneOptions, BaseTrainConfig, train.RayOptions))


def lr_range(text: str, flag: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:  # not two numbers
        low = high = 0.0
    if not 0 < low < high:
        raise SystemExit(f"{flag} {text!r}: give LOW,HIGH with 0 < LOW < HIGH, e.g. 0.005,0.08")
    return low, high


# -----------------------------------------------------------------------------
# The memory filter: which batch configurations can run at all


def feasible_batches(
    device_batch_sizes: list[int], total_batch_sizes: list[int], *, budget_bytes: int | None, depth: int,
    seq_len: int, vocab_size: int, dtype: str, compile: bool, num_workers: int = 1, aspect_ratio: int = 64,
    head_dim: int = 128,
) -> tuple[list[tuple[int, int]], list[tuple[tuple[int, int], str]]]:
    """(kept, dropped) (device_batch_size, total_batch_size) pairs: dropped ones with the reason.

    The candidates are finite, so this filter is exact: every trial the sweep samples runs a pair
    that the memory model accepts and that gradient accumulation can reach."""
    kept, dropped = [], []
    fits = {
        b: None if budget_bytes is None else memory.check_fit(
            budget_bytes, depth, seq_len, b, vocab_size, dtype, compile, aspect_ratio, head_dim)
        for b in device_batch_sizes
    }
    for b in device_batch_sizes:
        for total in total_batch_sizes:
            micro = b * seq_len * num_workers
            if fits[b] is not None:
                dropped.append(((b, total), f"does not fit: {fits[b]}"))
            elif total % micro:
                dropped.append(((b, total), f"{total} tokens is not a multiple of {b} rows x {seq_len} tokens "
                                            f"x {num_workers} workers = {micro}"))
            else:
                kept.append((b, total))
    return kept, dropped


def describe_drops(dropped: list[tuple[tuple[int, int], str]], total: int) -> str:
    if not dropped:
        return f"memory model: all {total} batch configurations can run"
    lines = [f"memory model: dropped {len(dropped)} of {total} (device_batch_size, total_batch_size) configurations:"]
    # one line per reason: a batch size that does not fit is dropped with every total batch
    by_reason: dict[str, list[tuple[int, int]]] = {}
    for pair, why in dropped:
        by_reason.setdefault(why, []).append(pair)
    for why, pairs in by_reason.items():
        lines.append(f"  {', '.join(f'{b}x{t}' for b, t in pairs)}: {why}")
    return "\n".join(lines)


def gpu_memory_of(names: set[str]) -> int | None:
    """The smallest memory among these GPU names (bytes), or None when a name does not tell."""
    sizes = [gpu_memory(name) for name in names]
    return None if None in sizes else min(sizes, default=None)


def target_plan(cfg, group: Group) -> PrecisionPlan:
    """The precision plan the trials' workers will apply, as seen from the driver.

    The driver usually runs on a node of the group (one machine, NANOCHAT_EMULATE included): then its
    own plan is the answer. Otherwise the plan comes from the group's GPU name through the same policy."""
    local = resolve(cfg.dtype, cfg.device or None)
    if local.short == group.precision and (local.device == "cuda") == (group.gpus > 0):
        return local
    if group.gpus == 0:
        return plan_for(DeviceInfo("cpu", "CPU"), cfg.dtype)
    name = sorted(group.gpu_names)[0]
    for key, (full, capability) in sorted(ACCELERATOR_TYPES.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower().replace(" ", "-"):
            return plan_for(DeviceInfo("cuda", full, capability), cfg.dtype, os.environ.get("NANOCHAT_EMULATE") or None)
    raise SystemExit(f"cannot tell the precision plan of GPU {name!r} from the driver: run the driver on a node "
                     "of that group, or pass --target-dtype and --compile on|off for the memory model")


def memory_target(cfg, group: Group) -> tuple[int | None, str, bool, str]:
    """(budget bytes or None, dtype, compile, where the budget came from) for the memory filter."""
    plan = target_plan(cfg, group)
    dtype = plan.dtype if cfg.target_dtype == "auto" else cfg.target_dtype
    compile = {"on": True, "off": False}.get(cfg.compile, plan.compile)
    if cfg.gpu_memory.lower() in ("unlimited", "none"):
        return None, dtype, compile, "--gpu-memory unlimited"
    if cfg.gpu_memory:
        return memory.parse_memory(cfg.gpu_memory), dtype, compile, f"--gpu-memory {cfg.gpu_memory}"
    if plan.memory_cap:
        return plan.memory_cap, dtype, compile, f"the {plan.name} emulation cap (NANOCHAT_EMULATE={plan.emulating})"
    if group.gpus == 0:
        return None, dtype, compile, "CPU trials: no GPU memory limit"
    budget = gpu_memory_of(group.gpu_names)
    if budget is None:
        raise SystemExit(f"cannot tell the memory of {', '.join(sorted(group.gpu_names))}; pass --gpu-memory, e.g. 16GB")
    return budget, dtype, compile, f"the memory of {', '.join(sorted(group.gpu_names))}"


def batch_key(device_batch_size: int, total_batch_size: int) -> str:
    """One search dimension for the pair, so every sampled pair is one the filter kept; a string,
    because Tune reads a list in a config as nested parameters."""
    return f"{device_batch_size}x{total_batch_size}"


def parse_batch(key: str) -> tuple[int, int]:
    device_batch_size, total_batch_size = key.split("x")
    return int(device_batch_size), int(total_batch_size)


# -----------------------------------------------------------------------------
# One trial: a TorchTrainer of ray_jobs/train.py


class ReportToTune(TuneReportCallback):
    """Rank 0's report of each evaluation, plus the tokens trained so far (ASHA's clock)."""

    def __init__(self, tokens_per_step: int):
        super().__init__()
        self.tokens_per_step = tokens_per_step

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], TIME_ATTR: metrics[0]["step"] * self.tokens_per_step}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def trial_settings(fixed: dict, config: dict) -> dict:
    """base_train settings of one trial: the fixed ones, the sampled ones, and a horizon of the token budget."""
    device_batch_size, total_batch_size = parse_batch(config["batch"])
    steps = max(1, fixed["token_budget"] // total_batch_size)
    # every trial evaluates (and checkpoints: what a resumed sweep restarts from) at the same token
    # counts, so ASHA compares trials at equal training tokens whatever their batch size
    every = max(1, steps // fixed["evals_per_trial"])
    return {
        **fixed["stage_config"], "device_batch_size": device_batch_size, "total_batch_size": total_batch_size,
        "matrix_lr": config["matrix_lr"], "embedding_lr": config["embedding_lr"], "unembedding_lr": config["unembedding_lr"],
        "num_iterations": steps, "eval_every": every, "save_every": every, "keep_last": 1, "sample_every": -1,
        # reports (what ASHA judges) at the evaluations only: each one carries a fresh val bpb
        "report_every": every,
    }


def judged_at(settings: dict) -> dict:
    """Where ASHA judges the trial (nanochat.tracking.Tracker's verdict_steps, last_step): at each
    evaluation before the end. Its MLflow run holds back what comes after one of them until the verdict
    lets it go on, so a stopped trial logs nothing after its stop."""
    every, steps = settings["eval_every"], settings["num_iterations"]
    return {"verdict_steps": list(range(every, steps, every)), "last_step": steps}


def run_trial(config: dict, fixed: dict) -> None:
    """Tune's trainable: one TorchTrainer fit. Tune kills it (and with it the trainer) when ASHA stops it."""
    trial_id = tune.get_context().get_trial_id()
    settings = trial_settings(fixed, config)
    run = dataclasses.replace(fixed["train_runs"], name=trial_id)  # the trial's TorchTrainer run, in the sweep's storage
    run.fs.create_dir(run.path, recursive=True)
    # a resumed trial keeps its MLflow run: one run per trial, whatever the interruptions
    run_id = trial_run_id(run)
    if run_id is not None:
        tracker = Tracker(fixed["mlflow_uri"], run_id)
        tracker.client.update_run(tracker.run_id, status="RUNNING")  # it ended KILLED with the interrupted sweep
    else:
        params = {**settings, "trial_id": trial_id, "sweep": fixed["sweep"], "precision_group": fixed["precision"]}
        tracker = Tracker.create(fixed["mlflow_uri"], fixed["mlflow_experiment"], f"{fixed['sweep']}/{trial_id}", params)
        tracker.client.set_tag(tracker.run_id, "sweep", fixed["sweep"])
        tracker.client.set_tag(tracker.run_id, "trial_id", trial_id)
        train.write_text(*run.file(RUN_ID_FILE), tracker.run_id)

    data = SimpleNamespace(data_dir=fixed["stage_config"]["data_dir"], tokenizer_dir=fixed["stage_config"]["tokenizer_dir"],
                           max_seq_len=settings["max_seq_len"], tokenize_workers=fixed["tokenize_workers"],
                           num_iterations=settings["num_iterations"], total_batch_size=settings["total_batch_size"])
    trainer = TorchTrainer(
        train.train_loop_per_worker,
        train_loop_config={
            "stage": "base", "stage_config": settings, "precision": fixed["precision"], **fixed["worker"],
            "mlflow_uri": fixed["mlflow_uri"], "mlflow_run_id": tracker.run_id, "mlflow_judged": judged_at(settings),
            "summary_file": run.file("summary.json"),
        },
        scaling_config=fixed["scaling"],
        run_config=RunConfig(
            # the same name on a resumed trial: Ray Train restarts it from its latest checkpoint
            **run.run_config(),
            failure_config=FailureConfig(max_failures=fixed["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[ReportToTune(settings["total_batch_size"])],
        ),
        **train.ray_datasets(data, run),
    )
    # ASHA's stops (at a rung or at max_t) end the trial from outside: MlflowTrialStatus on the driver
    # ends the run then, and that verdict stands; this ends a trial that returns or fails first
    with tracker.ending():
        trainer.fit()


class MlflowTrialStatus(tune.Callback):
    """Writes ASHA's verdicts into the trials' MLflow runs on the driver, the moment they are taken: a
    trial that goes on is told so (its workers hold back what they log past an evaluation until then), a
    stopped one has its run ended (KILLED, or FINISHED at the full budget) before its process is killed,
    which it cannot be relied on to do itself; a trial's error ends its run FAILED."""

    def __init__(self, mlflow_uri: str, train_runs: train.RunStorage, token_budget: int):
        self.mlflow_uri, self.train_runs, self.token_budget = mlflow_uri, train_runs, token_budget

    def _tracker(self, trial) -> Tracker | None:
        run_id = trial_run_id(dataclasses.replace(self.train_runs, name=trial.trial_id))
        return Tracker(self.mlflow_uri, run_id) if run_id is not None else None

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tracker = self._tracker(trial)
        if tracker is None:
            return
        if not result.get(DONE):  # Tune marks the result that stops a trial (ASHA's verdict) done
            tracker.judged(int(result["step"]))
            return
        tokens = result.get(TIME_ATTR, 0)
        stopped = tokens < self.token_budget
        tracker.client.set_tag(tracker.run_id, "asha", f"stopped at {tokens:,} tokens" if stopped else "completed")
        tracker.finish("KILLED" if stopped else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        tracker = self._tracker(trial)
        if tracker is not None:
            tracker.finish("FAILED")


@contextmanager
def runs_end_with_the_sweep(uri: str, experiment_id: str, sweep: str) -> Iterator[None]:
    """Trials still running when the sweep's driver stops (Ctrl-C, SIGTERM, an error) stop with it: their
    runs end KILLED (FAILED on an error) instead of staying RUNNING. `--resume` opens them again."""
    status = "KILLED"  # Tune's own Ctrl-C handling returns from fit() with the trials unfinished
    try:
        with sigterm_as_exit():
            yield
    except BaseException as error:
        status = end_status(error)
        raise
    finally:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for run in client.search_runs([experiment_id], f"tags.sweep = '{sweep}' and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status)


# -----------------------------------------------------------------------------
# Outputs


def trial_rows(results, token_budget: int) -> list[dict]:
    rows = []
    for result in results:
        metrics, config = result.metrics or {}, result.config or {}
        if "batch" not in config:
            continue
        device_batch_size, total_batch_size = parse_batch(config["batch"])
        tokens = metrics.get(TIME_ATTR, 0)
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "device_batch_size": device_batch_size, "total_batch_size": total_batch_size,
            "matrix_lr": config["matrix_lr"], "embedding_lr": config["embedding_lr"], "unembedding_lr": config["unembedding_lr"],
            METRIC: metrics.get(METRIC), "tokens": tokens, "steps": metrics.get("step"),
            "status": "error" if result.error else ("completed" if tokens >= token_budget else "stopped early"),
        })
    return sorted(rows, key=lambda r: (r[METRIC] is None, r[METRIC] if r[METRIC] is not None else 0.0))


def best_config(rows: list[dict], shape: dict) -> tuple[dict, dict] | None:
    """(best_config.json contents, its row): the lowest final bpb among trials that trained the full
    budget (an early-stopped trial's bpb was measured after fewer tokens and is not comparable)."""
    full = [r for r in rows if r["status"] == "completed" and r[METRIC] is not None]
    if not full:
        return None
    best = min(full, key=lambda r: r[METRIC])
    return {**{k: best[k] for k in TUNED}, **{k: shape[k] for k in BEST_KEYS if k not in TUNED}}, best


def trial_run_id(run: train.RunStorage) -> str | None:
    """The MLflow run id a trial's first start wrote into its run folder, or None before that."""
    fs, path = run.file(RUN_ID_FILE)
    return train.read_text(fs, path).strip() if fs.get_file_info(path).type == pafs.FileType.File else None


def write_table(rows: list[dict], exp_dir: Path) -> None:
    (exp_dir / "trials.json").write_text(json.dumps(rows, indent=2))
    with open(exp_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)


def plot_bpb_vs_params(rows: list[dict], out: Path) -> Path | None:
    """val bpb against each tuned parameter; None (with a message) where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {out.name} skipped. `pip install matplotlib`, then rerun with "
              "--resume to draw it from the finished sweep.")
        return None
    matplotlib.use("Agg")  # headless nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TUNED), figsize=(4 * len(TUNED), 3.6), squeeze=False)
    for ax, key in zip(axes[0], TUNED, strict=True):
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            points = [(r[key], r[METRIC]) for r in rows if r["status"] == status and r[METRIC] is not None]
            if points:
                ax.scatter(*zip(*points, strict=True), marker=marker, label=status)
        ax.set_xscale("log", base=2 if "batch" in key else 10)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{METRIC} (last evaluation)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -----------------------------------------------------------------------------
# The driver


def concurrency(cfg, group: Group) -> int:
    if cfg.max_concurrent > 0:
        return cfg.max_concurrent
    if group.gpus:
        return max(1, group.gpus // cfg.num_workers)
    return 2


def preflight(cfg, storage: train.RunStorage) -> Tokenizer:
    """What the driver checks before it starts Ray, MLflow or a GPU (so a mistake fails in one line and at
    once): the shards (every footer read), the tokenizer (returned), no earlier sweep in `storage` unless
    --resume."""
    check_shards(cfg.data_dir)
    tokenizer = train.load_tokenizer(cfg.tokenizer_dir)
    if tune.Tuner.can_restore(storage.path, storage_filesystem=storage.fs) and not cfg.resume:
        raise SystemExit(f"{storage.show(storage.path)} already holds a sweep; pass --resume to continue it (or rewrite its outputs "
                         "when it finished), or --name / --storage-path for a new one")
    return tokenizer


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(config_class(), argv, description=__doc__.splitlines()[0])
    if cfg.stage != "base":
        raise SystemExit("ray_jobs.tune tunes base pretraining only; drop --stage (the tuned values carry over to later stages)")
    if not 0 < cfg.grace_evals < cfg.evals_per_trial:
        raise SystemExit(f"--grace-evals must be between 1 and --evals-per-trial - 1 (= {cfg.evals_per_trial - 1})")
    train.resolve_paths(cfg, STAGES["base"])
    name = cfg.name or f"tune_d{cfg.depth}"
    storage = train.RunStorage.of(cfg.storage_path, name)  # the sweep's experiment folder, on a disk or a URI
    # the sweep's outputs (best_config.json and the tables) on this machine, where the next command reads
    # them; with object storage, a copy goes to the experiment folder there too
    exp_dir = Path(storage.path) if storage.local else base_dir() / "ray_results" / name
    vocab_size = preflight(cfg, storage).vocab_size
    per_trial = 1 + cfg.num_workers * cfg.cpus_per_worker + cfg.tokenize_workers + 1  # trial driver + workers + data
    cpus = (cfg.max_concurrent or 2) * per_trial
    nodes = planned_nodes(cfg.address, cfg.dtype, cfg.device, cpus)
    group, scaling = plan_cluster(cfg.precision, cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, ray_nodes=nodes,
                                  wait_for_nodes_s=cfg.wait_for_nodes_s)
    nodes = ray.nodes() if ray.is_initialized() else nodes  # with the nodes an autoscaler added meanwhile
    concurrent = concurrency(cfg, group)
    print(f"cluster precision groups:\n{format_groups(groups(nodes_from_ray(nodes)))}\n"
          f"tuning on the {group.precision} group ({', '.join(sorted(group.gpu_names))}): {cfg.num_workers} worker(s) "
          f"per trial, {concurrent} trial(s) at once")

    # --- the search space, after the memory filter
    budget, dtype, compile, source = memory_target(cfg, group)
    candidates = (int_list(cfg.device_batch_sizes), int_list(cfg.total_batch_sizes))
    kept, dropped = feasible_batches(
        *candidates, budget_bytes=budget, depth=cfg.depth, seq_len=cfg.max_seq_len, vocab_size=vocab_size, dtype=dtype,
        compile=compile, num_workers=cfg.num_workers, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim)
    budget_text = "no limit" if budget is None else f"{budget / GB:.1f} GiB"
    print(f"memory budget: {budget_text} ({source}); {dtype}, compile {'on' if compile else 'off'}\n"
          + describe_drops(dropped, len(kept) + len(dropped)))
    if not kept:
        raise SystemExit("no batch configuration fits: lower --depth or --max-seq-len, add smaller --device-batch-sizes, "
                         "or give --total-batch-sizes that are multiples of device batch x seq len x workers")
    space = {
        "batch": tune.choice([batch_key(*pair) for pair in kept]),
        "matrix_lr": tune.loguniform(*lr_range(cfg.matrix_lr_range, "--matrix-lr-range")),
        "embedding_lr": tune.loguniform(*lr_range(cfg.embedding_lr_range, "--embedding-lr-range")),
        "unembedding_lr": tune.loguniform(*lr_range(cfg.unembedding_lr_range, "--unembedding-lr-range")),
    }
    defaults = BaseTrainConfig()
    baseline = []
    if cfg.with_default:
        # nanochat's own learning rates with its total batch (else the nearest candidate) and the
        # largest device batch that fits: the point the sweep has to beat
        total = min({t for _, t in kept}, key=lambda t: abs(math.log2(t / defaults.total_batch_size)))
        device = max(b for b, t in kept if t == total)
        baseline = [{"batch": batch_key(device, total), "matrix_lr": defaults.matrix_lr, "embedding_lr": defaults.embedding_lr,
                     "unembedding_lr": defaults.unembedding_lr}]

    # --- where everything goes
    connect(cfg.address, cfg.dtype, cfg.device, cpus)
    uri = cfg.mlflow_uri or default_uri(cfg.storage_path if storage.local else "")  # sqlite needs a disk
    experiment = cfg.mlflow_experiment or name
    stage_fields = {f.name for f in dataclasses.fields(BaseTrainConfig)}
    fixed = {
        "stage_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in stage_fields},
        "token_budget": cfg.token_budget, "evals_per_trial": cfg.evals_per_trial, "precision": group.precision,
        "scaling": scaling, "train_runs": dataclasses.replace(storage, root=f"{storage.path}/train_runs", name=""), "tokenize_workers": cfg.tokenize_workers,
        "max_failures": train.failures_allowed(cfg.max_failures, sum(n["Alive"] for n in nodes)),
        "mlflow_uri": uri, "mlflow_experiment": experiment, "sweep": name,
        # the rest of what ray_jobs.train hands its workers (no fault injection in a sweep)
        "worker": {"shard_optimizer": cfg.shard_optimizer, "grad_dtype": cfg.grad_dtype, "fault": ""},
    }
    trainable = tune.with_parameters(run_trial, fixed=fixed)

    # --- the sweep
    eval_tokens = cfg.token_budget // cfg.evals_per_trial
    asha = ASHAScheduler(time_attr=TIME_ATTR, max_t=cfg.token_budget, grace_period=cfg.grace_evals * eval_tokens,
                         reduction_factor=cfg.reduction_factor)
    print(f"ASHA on {METRIC} (min): {cfg.token_budget:,} tokens per trial, an evaluation every {eval_tokens:,}, "
          f"grace {cfg.grace_evals} evaluation(s), reduction factor {cfg.reduction_factor}")
    # create the store and the experiment here, once: concurrent trials creating a fresh sqlite store
    # race on its schema migration
    experiment_id = ensure_experiment(uri, experiment)
    print(f"MLflow: experiment {experiment} in {uri}  ({ui_command(uri)})")
    if tune.Tuner.can_restore(storage.path, storage_filesystem=storage.fs):  # with --resume: preflight refused it otherwise
        print(f"resuming the sweep in {storage.show(storage.path)}")
        tuner = tune.Tuner.restore(storage.path, trainable=trainable, param_space=space, resume_unfinished=True,
                                   storage_filesystem=storage.fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="min", scheduler=asha, num_samples=cfg.num_samples,
                # the generator's own limit: TuneConfig's max_concurrent_trials ignores a given search_alg
                search_alg=BasicVariantGenerator(points_to_evaluate=baseline, random_state=cfg.search_seed,
                                                 max_concurrent=concurrent),
            ),
            run_config=tune.RunConfig(
                **storage.run_config(),
                callbacks=[MlflowTrialStatus(uri, fixed["train_runs"], cfg.token_budget)],
            ),
        )
    with runs_end_with_the_sweep(uri, experiment_id, name):
        results = tuner.fit()

    # --- outputs
    rows = trial_rows(results, cfg.token_budget)
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_table(rows, exp_dir)
    plot = plot_bpb_vs_params(rows, exp_dir / "bpb_vs_params.png")
    found = best_config(rows, dataclasses.asdict(cfg))
    if found is None:
        raise SystemExit(f"no trial trained the full {cfg.token_budget:,} tokens (see {exp_dir / 'trials.csv'}); "
                         "raise --num-samples or lower --reduction-factor")
    best, best_row = found
    (exp_dir / "best_config.json").write_text(json.dumps(best, indent=2) + "\n")
    if not storage.local:
        for output in ("best_config.json", "trials.csv", "trials.json", *([plot.name] if plot else [])):
            pafs.copy_files(str(exp_dir / output), f"{storage.path}/{output}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=storage.fs)
    stopped = sum(r["status"] == "stopped early" for r in rows)
    print(f"{len(rows)} trials ({stopped} stopped early by ASHA); best {METRIC} {best_row[METRIC]:.4f}: {json.dumps(best)}\n"
          f"wrote {exp_dir / 'best_config.json'}, trials.csv, trials.json" + (f", {plot.name}" if plot else "") + "\n"
          f"use it: python -m nanochat.scripts.base_train --config {exp_dir / 'best_config.json'}")
    return {"experiment_dir": str(exp_dir), "best_config": best, "best": best_row, "trials": rows, "mlflow_uri": uri,
            "dropped": len(dropped)}


if __name__ == "__main__":
    run_driver(main)
