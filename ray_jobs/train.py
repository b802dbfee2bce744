"""Train a stage on a Ray cluster: TorchTrainer workers in one precision group, Ray Data streaming the
shards, checkpoints through Ray Train, MLflow tracking from rank 0.

    # any cluster (or none: a local Ray starts); the strongest precision group is picked
    python -m ray_jobs.train --stage base --depth 12 --num-workers 8
    # pin the run to the fp16 (P100/V100/T4) group of a mixed cluster
    python -m ray_jobs.train --depth 12 --num-workers 4 --precision fp16 --device-batch-size 4
    # tiny CPU run: two gloo workers
    python -m ray_jobs.train --depth 2 --head-dim 64 --max-seq-len 128 --device-batch-size 8 \
        --total-batch-size 2048 --num-iterations 50 --num-workers 2
    # submitted to a running cluster (see docs/cluster.md)
    ray job submit --working-dir . -- python -m ray_jobs.train --depth 12 --num-workers 8

Takes every flag of the stage's own script (e.g. nanochat/scripts/base_train.py) plus the Ray flags
below. The workers run the stage's setup and loop from the registry (nanochat/train/stages.py); this
file adds scheduling, data parallelism (gradient buckets overlapped with backward, sharded optimizer
state: nanochat/train/data_parallel.py), Ray Data, Ray Train checkpoints and MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Ray Train (seconds to import) is imported where it runs, so that a mistake fails before it loads: by
# the driver once its checks have passed (main), and in a worker by train_loop_per_worker, under which
# all the worker-side code below runs.
import pyarrow.fs as pafs
import ray
import torch
import torch.distributed as dist

from nanochat import checkpoint, shardfs
from nanochat.checkpoint import write_snapshot
from nanochat.common import base_dir
from nanochat.config import option, parse_config
from nanochat.dataset import default_data_dir, split_shards
from nanochat.errors import UsageError
from nanochat.shardfs import Source, filesystem, is_uri
from nanochat.tokenized import TokenFiles
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir
from nanochat.tracking import Tracker, default_uri, ui_command
from nanochat.train.harness import with_step_split
from nanochat.train.loop import Run, restore_run, snapshot_run
from nanochat.train.stages import STAGES, Stage
from ray_jobs.cluster import connect, planned_nodes, run_driver
from ray_jobs.data import (
    build_dataset,
    check_shards,
    data_config,
    epochs_per_pass,
    iter_train_batches,
    resume_position,
    training_data,
    work_items,
)
from ray_jobs.scheduler import check_worker_precisions, format_groups, groups, nodes_from_ray, plan_cluster

CLUSTER_MAX_FAILURES = 3  # a node lost on a multi-node cluster is routine (preemption), not a bug to stop on

# Fault injection for tests: "RANK:STEP" in the driver's environment SIGKILLs that worker right after that
# step, in a run that did not start from a checkpoint (so the restarted run goes through). It travels to
# the workers in their config: a local Ray started earlier does not pass the driver's environment on.
FAULT_ENV = "NANOCHAT_FAULT_INJECT"


@dataclass
class RayOptions:
    stage: str = option("base", "training stage", choices=tuple(STAGES))
    num_workers: int = option(1, "data-parallel workers (one GPU each, or CPU workers without GPUs)")
    precision: str = option("auto", "precision group: auto picks the strongest", choices=("auto", "bf16", "fp16", "fp32"))
    cpus_per_worker: float = option(1.0, "CPUs reserved per training worker")
    wait_for_nodes_s: float = option(600.0, "on a cluster with an autoscaler, how long to wait for the nodes a request "
                                     "needs before refusing it (0 = refuse at once); a cluster without one never waits")
    tokenize_workers: int = option(2, "Ray Data tokenizer actors")
    storage_path: str = option("", "where Ray Train keeps runs and checkpoints: a folder every node sees, or s3://, gs://, "
                               "any URI pyarrow or fsspec opens; empty = $NANOCHAT_BASE_DIR/ray_results")
    name: str = option("", "run name (a folder in --storage-path); empty = <stage>_d<depth>")
    max_failures: int = option(-1, "worker-group restarts from the latest checkpoint before giving up; -1 = "
                               f"{CLUSTER_MAX_FAILURES} on a cluster of several nodes (spot preemption, a lost node), 0 on one machine")
    shard_optimizer: bool = option(True, "each worker keeps and steps only its share of the optimizer state "
                                   "(reduce-scatter in, all-gather out); --no-shard-optimizer all-reduces every gradient")
    grad_dtype: str = option("", "send gradients as bfloat16 or float16 (slow networks); empty = their own dtype",
                             choices=("", "bfloat16", "float16"))
    address: str = option("", "Ray cluster address; empty = $RAY_ADDRESS or a new local cluster")
    mlflow_uri: str = option("", "MLflow tracking URI; empty = sqlite:///$NANOCHAT_BASE_DIR/mlflow.db, the store every "
                             "entry point shares on one machine (<--storage-path>/mlflow.db when that is given); on a "
                             "cluster the head's tracking server, http://HEAD:5000 (docs/cluster.md, MLflow)")
    mlflow_experiment: str = option("nanochat", "MLflow experiment")


def config_class(stage: str) -> type:
    """The stage's own Config dataclass extended with the Ray options: one set of flags."""
    return dataclasses.make_dataclass(f"Ray{stage.title()}Config", [], bases=(STAGES[stage].config, RayOptions))


def stage_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--stage" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--stage="):
            return arg.split("=", 1)[1]
    return "base"


# -----------------------------------------------------------------------------
# inside each worker


class RayBatches:
    """(x, y) batches from this worker's Ray Data shard; `position` = where to resume after the last one."""

    def __init__(self, device: torch.device, batch_size: int, expected_start: dict | None, epochs: int):
        first_pass = ray.train.get_dataset_shard("train")
        every_pass = ray.train.get_dataset_shard("train_passes")
        epoch = expected_start["epoch"] if expected_start else 0
        self.stream = iter_train_batches(first_pass, batch_size, device, epoch=epoch, next_passes=every_pass,
                                         epochs_per_pass=epochs)
        self.position = expected_start

    def __iter__(self) -> RayBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, self.position = next(self.stream)
        return x, y


def gather(obj: object) -> list:
    """Every worker's `obj`, in rank order (all workers must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_group(run: Run, rank: int, expected: str) -> None:
    """Defense in depth: every worker's own probe must agree with the group the scheduler chose. Rank 0
    prints the plans, one line for the workers that share one."""
    plan = (f"{run.plan.name}, {run.plan.dtype}, GradScaler {'on' if run.plan.grad_scaler else 'off'}, "
            f"compile {'on' if run.plan.compile else 'off'}, attention {run.plan.attention} ({run.plan.reason})")
    everyone = gather({"rank": rank, "host": socket.gethostname(), "gpu": run.plan.name, "dtype": run.plan.short, "plan": plan})
    if rank == 0:
        for line in plan_lines(everyone):
            print(line, flush=True)
    check_worker_precisions(everyone, expected)


def plan_lines(workers: list[dict]) -> list[str]:
    """'[workers 0, 1 on HOSTS] precision plan: PLAN', one line per distinct plan among `workers`."""
    sharing: dict[str, list[dict]] = {}
    for worker in workers:
        sharing.setdefault(worker["plan"], []).append(worker)
    return [f"[{'worker' if len(group) == 1 else 'workers'} {', '.join(str(w['rank']) for w in group)} on "
            f"{', '.join(sorted({w['host'] for w in group}))}] precision plan: {plan}" for plan, group in sharing.items()]


def numeric(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


def fault_hook(spec: str, rank: int, restored: bool) -> Callable[[int], None]:
    """Returns a per-step callback that SIGKILLs this process at the step named in `spec` ($NANOCHAT_FAULT_INJECT)."""
    if not spec or restored:
        return lambda step: None
    kill_rank, kill_step = (int(v) for v in spec.split(":"))

    def maybe_kill(step: int) -> None:
        if rank == kill_rank and step == kill_step:
            print(f"[worker {rank}] {FAULT_ENV}: killing this worker after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill


def pass_epochs(cfg, shards: list[Source], token_files: TokenFiles | None) -> int:
    """Epochs per execution of the training dataset over `shards` (and their token files: training_data),
    from settings the driver (ray_datasets) and every worker (train_loop_per_worker, before its setup
    resolves any) read alike."""
    run_tokens = cfg.num_iterations * cfg.total_batch_size if cfg.num_iterations > 0 and cfg.total_batch_size > 0 else None
    return epochs_per_pass(shards, run_tokens, token_files)


def stage_batches(stage: Stage, run: Run, rank: int, world: int, position: dict | None, epochs: int) -> Iterator:
    """Ray Data batches (`epochs` per pass) for a stage that trains on the shards; the stage's own per-worker
    batches for the others, whose checkpointed position holds one entry per worker (their shares advance at
    different paces)."""
    if stage.shards:
        return RayBatches(run.device, run.cfg.device_batch_size, position, epochs)
    mine = None
    if position is not None and len(position["workers"]) == world:
        mine = position["workers"][rank]
    elif position is not None and rank == 0:
        print(f"the checkpoint was written by {len(position['workers'])} workers, not {world}: this stage's data restarts", flush=True)
    return stage.batches(run, rank, world, mine)


def data_position_of(batches) -> dict:
    """What a checkpoint records to resume the data (every worker must call it)."""
    if isinstance(batches, RayBatches):
        return resume_position(gather(batches.position))  # the earliest worker's
    return {"workers": gather(batches.state_dict())}


class WorkerHooks:
    """A worker's `log` and `save` for the stage's loop. Every `report_every` steps the metrics go to Ray
    Train and Ray's preemption notice is read; checkpoints are gathered from every rank, written by rank 0 to
    local disk and copied to storage by Ray Train in the background, and then rank 0 writes the metrics of
    the steps they cover to MLflow (a Tune trial's before each report, which its driver judges)."""

    def __init__(self, run: Run, batches: Iterator, rank: int, tracker: Tracker | None, start_step: int,
                 after_step: Callable[[int], None]):
        self.run, self.batches, self.rank, self.tracker = run, batches, rank, tracker
        self.after_step = after_step  # fault injection (tests)
        self.every = run.cfg.report_every
        self.last: dict = {}
        self.saved_step = start_step
        self.preempted = False
        self.local_root = Path(tempfile.mkdtemp(prefix="nanochat-ckpt-"))

    def log(self, record: dict) -> None:
        self.last.update(record)
        if self.tracker:
            self.tracker.log(record)  # written once a checkpoint covers it (save)
        if self.every > 0 and record["step"] % self.every == 0:  # every rank: the report is a barrier
            if self.tracker and self.tracker.judged_by_driver:  # a Tune trial's driver may end its run on this report
                self.tracker.flush(through=record["step"])
            ray.train.report(numeric(self.last))
            self._check_preemption(record["step"])
        self.after_step(record["step"])

    def _check_preemption(self, step: int) -> None:
        notice = ray.train.get_preemption_info()
        if notice is None or self.preempted:
            return
        # a node of this group is being reclaimed: save now and keep training; Ray Train restarts the
        # group from this checkpoint once the node is gone
        self.preempted = True
        if self.rank == 0:
            print(f"preemption notice for ranks {notice.preempted_ranks} (deadline {notice.deadline_ms} ms): "
                  f"saving step {step}", flush=True)
        self.save(step)

    def save(self, step: int) -> None:
        if step == self.saved_step:  # e.g. saved on a preemption notice at a step that was due anyway
            return
        self.saved_step = step
        data_position = data_position_of(self.batches)
        parallel = self.run.step_fn.parallel
        optimizer_state = parallel.state_dict() if parallel else None  # every rank: gathers the shards
        if self.rank != 0:
            ray.train.report(numeric(self.last))
            return
        path = write_snapshot(self.local_root, snapshot_run(self.run, step, data_position, optimizer_state))
        ray.train.report(numeric(self.last), checkpoint=ray.train.Checkpoint.from_directory(path), checkpoint_dir_name=path.name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        # only now the steps this checkpoint covers go to MLflow: a restart from it logs each later step once
        self.tracker.flush(through=step)


def quiet_report_log() -> None:
    """Ray Train logs every `ray.train.report` at INFO, the whole metrics dict on one line; with a report
    every --report-every steps that buries the progress bar. Its logger is named by its module's file."""
    from ray.train.v2._internal.execution import context  # Ray's own module: only its logger's name is used

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    import ray.train.torch  # loaded already in a Ray Train worker; for the code below (see the imports)

    quiet_report_log()
    stage = STAGES[config["stage"]]
    cfg = stage.config(**config["stage_config"])
    # before setup: what the driver's datasets hold
    epochs = pass_epochs(cfg, *training_data(cfg.data_dir, cfg.tokenizer_dir)) if stage.shards else 1
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("start") is not None:  # the previous stage's checkpoint, in object storage
        cfg, copy = start_from_storage(cfg, config["start"], rank)
        try:
            run = stage.setup(cfg, ray.train.torch.get_device(), world, rank)
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        run.meta["init_from"] = config["stage_config"]["init_from"]  # where it is, not the deleted copy
    else:
        run = stage.setup(cfg, ray.train.torch.get_device(), world, rank)
    if config.get("run_id"):  # the driver's run (a Tune trial's run keeps the id setup gave it)
        run.meta["run_id"] = config["run_id"]
    if world > 1:
        run.step_fn.distribute(run.model, shard=config["shard_optimizer"], comm_dtype=getattr(torch, config["grad_dtype"]) if config["grad_dtype"] else None)
    check_group(run, rank, config["precision"])

    start_step, position = 0, None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            start_step, position = restore_run(run, Path(directory))
        if rank == 0:
            print(f"resumed at step {start_step}, data position {position}", flush=True)
    batches = stage_batches(stage, run, rank, world, position, epochs)
    # a Tune trial's run is judged at its evaluations (ray_jobs/tune.py): nothing is logged past a stop
    judged = config.get("mlflow_judged", {})
    tracker = Tracker(config["mlflow_uri"], config["mlflow_run_id"], **judged) if rank == 0 else None
    if tracker and tracker.resume(start_step) > 0:
        print(f"restarted at step {start_step}: steps up to {tracker.logged_through} are in MLflow already and are "
              "not logged again", flush=True)
    hooks = WorkerHooks(run, batches, rank, tracker, start_step, fault_hook(config["fault"], rank, restored is not None))
    summary = stage.loop(run, batches, start_step, with_step_split(run, hooks.log, cfg.report_every), hooks.save)
    if rank == 0:  # the driver prints it
        tracker.flush()  # one more try for metrics a failing store kept back (the last checkpoint covers them all)
        tracker.log_json("summary.json", summary)
        fs, path = config["summary_file"]  # in the run's storage, which the driver may not share a disk with
        write_text(fs, path, json.dumps(summary, indent=2))


# -----------------------------------------------------------------------------
# where a run lives


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@dataclass(frozen=True)
class RunStorage:
    """Where Ray Train keeps a run (its checkpoints, its own state, summary.json): <storage>/<name> on a
    disk, or in object storage (--storage-path s3://bucket/runs, gs://..., any URI pyarrow or fsspec opens;
    pyarrow's options go in the query, e.g. s3://bucket/runs?endpoint_override=http://HOST:9000). The
    driver and the data factory read the run through `fs` only, never through their own disk."""

    uri: str  # --storage-path, a local one made absolute
    fs: pafs.FileSystem
    root: str  # the storage folder: a path in `fs`
    name: str

    @classmethod
    def of(cls, storage_path: str, name: str) -> RunStorage:
        uri = storage_path if is_uri(storage_path) else str(Path(storage_path or base_dir() / "ray_results").resolve())
        fs, root = filesystem(uri)
        return cls(uri, fs, root.rstrip("/"), name)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def path(self) -> str:
        return f"{self.root}/{self.name}"

    def file(self, name: str) -> tuple[pafs.FileSystem, str]:
        """(file system, path) of a file of the run: what a worker needs to write it."""
        return self.fs, f"{self.path}/{name}"

    def show(self, path: str) -> str:
        """A path in `fs` as the user names it: the local path, or the URI (without its query)."""
        return path if self.local else f"{self.uri.split('://', 1)[0]}://{path}"

    def run_config(self) -> dict:
        """RunConfig's storage arguments: Ray Train writes there, and hands the same file system (with the
        driver's options and credentials) to every worker."""
        return {"name": self.name, "storage_path": self.root, "storage_filesystem": None if self.local else self.fs}

    def latest_checkpoint(self) -> ray.train.Checkpoint | None:
        """The checkpoint Ray Train restores this run from: the latest its checkpoint manager registered, as
        the manager's snapshot in the run folder records it. Ray writes that snapshot as it registers each
        checkpoint (before it can restart a worker group from it), hands the registered one to restarted
        workers (ray.train.get_checkpoint()), and reads the snapshot back when a new fit() resumes the run,
        so the driver and the data factory see the checkpoint the workers restore. None before the first."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None  # a new run: answered without loading Ray Train
        from ray.train import Result  # Ray's own reader of that snapshot
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

        if self.fs.get_file_info(f"{self.path}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}").type == pafs.FileType.NotFound:
            return None
        return Result.from_path(self.path, storage_filesystem=self.fs).checkpoint


# -----------------------------------------------------------------------------
# the driver


class DatasetFromLatest:
    """Builds the training dataset starting where the checkpoint Ray Train restores left off (`build(start)`).

    Ray Train calls it each time it starts a worker group (on its controller, before it hands the workers
    their checkpoint), so a restart after a failure streams from the restored position instead of from the
    beginning. The position is read from that checkpoint's meta.json in storage (RunStorage.latest_checkpoint:
    the record Ray Train restores the workers from), never guessed from a disk."""

    def __init__(self, storage: RunStorage, build: Callable[[dict | None], ray.data.Dataset]):
        self.storage, self.build = storage, build

    def __call__(self) -> ray.data.Dataset:
        latest = self.storage.latest_checkpoint()
        return self.build(checkpoint.read_state(latest.path, latest.filesystem)["loader_state"] if latest else None)


def quiet(ds: ray.data.Dataset) -> ray.data.Dataset:
    """One line of training progress per worker is enough: Ray Data's own bars would bury it in logs."""
    ds.context.enable_progress_bars = False
    return ds


def resolve_paths(cfg, stage: Stage) -> ray.train.Checkpoint | None:
    """Absolute paths, so workers on any node (and `ray job submit` working dirs) find the same files.
    Returns the previous stage's checkpoint when it is in object storage: each worker downloads it
    (start_from_storage) instead of reading --init-from from its disk."""
    start = None
    if stage.shards:
        cfg.data_dir = shardfs.absolute(cfg.data_dir or default_data_dir())
    if stage.previous:
        # by default the previous stage's run in this storage (the checkpoint Ray Train registered last),
        # else the plain scripts' one
        previous = RunStorage.of(cfg.storage_path, checkpoint.stage_run_dir(stage.previous, cfg.depth).name)
        found = None if cfg.init_from else previous.latest_checkpoint()
        if found is not None and not previous.local:
            start, cfg.init_from = found, previous.show(found.path)  # shown; each worker downloads `start`
        else:
            cfg.init_from = str((Path(found.path) if found else cfg.init_checkpoint()).resolve())
    cfg.tokenizer_dir = str(Path(cfg.tokenizer_dir or default_tokenizer_dir()).resolve())
    return start


def start_from_storage(cfg, start: ray.train.Checkpoint, rank: int) -> tuple[object, Path]:
    """`cfg` starting from a local copy of the previous stage's checkpoint `start` (in object storage), and
    that copy's folder (the caller removes it once the model is loaded). The copy is checked against its
    manifest when it loads, as any checkpoint is."""
    folder = Path(tempfile.mkdtemp(prefix=f"nanochat-start-rank{rank}-"))
    local = folder / Path(start.path).name
    start.to_directory(str(local))
    return dataclasses.replace(cfg, init_from=str(local)), folder


def ray_datasets(cfg, storage: RunStorage) -> dict:
    """TorchTrainer arguments that stream the training shards through Ray Data (the run in `storage`)."""
    shards, token_files = training_data(cfg.data_dir, cfg.tokenizer_dir)
    epochs = pass_epochs(cfg, shards, token_files)  # the workers derive the same number (train_loop_per_worker)
    print(f"Ray Data: {epochs} epochs per pass, " + (f"rows cut from the token files in {token_files.directory}"
          if token_files else f"tokenized by {cfg.tokenize_workers} actors in every pass (`python -m nanochat.dataset "
          "tokenize` once makes token files every pass, epoch and trial reuses)"), flush=True)

    def build(start: dict | None = None) -> ray.data.Dataset:
        return quiet(build_dataset(shards, cfg.tokenizer_dir, cfg.max_seq_len, start=start, epochs=epochs,
                                   tokenize_concurrency=cfg.tokenize_workers, token_files=token_files))

    datasets = {"train": DatasetFromLatest(storage, build), "train_passes": build}
    return {"datasets": datasets, "dataset_config": data_config()}


def failures_allowed(requested: int, alive_nodes: int) -> int:
    """--max-failures as given, or for -1: restarts on a cluster of several nodes, none on one machine."""
    if requested >= 0:
        return requested
    return CLUSTER_MAX_FAILURES if alive_nodes > 1 else 0


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer, loaded on the driver to check it (the workers and the tokenizer actors load it again);
    a missing or unreadable one is a TokenizerError that says where it looked and how to make one."""
    return Tokenizer.load(directory)


def check_resume(storage: RunStorage, cfg, shards: list[Source] | None) -> str:
    """The run id of the run about to start in `storage` (checkpoint.resume_run: a folder that holds a
    run needs --resume, and resumes only its own checkpoints). Ray Train resumes a run from its storage
    folder by itself (same --name and --storage-path): this makes that an explicit choice rather than a
    surprise, and checks that the checkpoint Ray Train will restore was trained on these shards and that
    they still hold its data position. The driver has always refused with SystemExit, which ends it in one line."""
    latest = storage.latest_checkpoint()
    listed = storage.fs.get_file_info(pafs.FileSelector(storage.path, allow_not_found=True))
    holds = any(checkpoint.STEP_DIR_RE.match(info.base_name) for info in listed)
    if cfg.resume and holds and latest is None:
        raise SystemExit(f"{storage.show(storage.path)} holds checkpoint folders that Ray Train has no record of (it "
                         "registers each one it writes): it would train this run from step 0 over them. Move them "
                         "out, or choose another --name / --storage-path")
    try:
        run_id, state = checkpoint.resume_run(
            storage.path, latest and latest.path, cfg.resume, "--name / --storage-path", filesystem=storage.fs,
            holds_checkpoints=holds)
        if state is not None and shards is not None:
            checkpoint.check_shard_set(latest.path, state["meta"].get("shards"), checkpoint.shard_set(shards), cfg.allow_new_shards)
            if state["loader_state"] is not None:
                work_items(split_shards(shards, "train"), state["loader_state"])
    except checkpoint.CheckpointError as refused:
        raise SystemExit(str(refused)) from None
    return run_id


def preflight(cfg, stage: Stage, storage: RunStorage) -> str:
    """Everything the driver can check before it starts Ray, an MLflow run or a GPU, so that a mistake
    fails in one line and at once: the shards (every footer read), the tokenizer, the checkpoint to
    resume. (The checkpoint a later stage starts from is checked by resolve_paths.) Returns the run id."""
    train_shards = check_shards(cfg.data_dir) if stage.shards else None
    load_tokenizer(cfg.tokenizer_dir)
    return check_resume(storage, cfg, shardfs.list_shards(cfg.data_dir) if train_shards is not None else None)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    stage = stage_from_argv(argv)
    if stage not in STAGES:
        raise UsageError(f"unknown --stage {stage!r}; choose one of {', '.join(STAGES)}")
    cfg = parse_config(config_class(stage), argv, description=__doc__.splitlines()[0])
    start = resolve_paths(cfg, STAGES[stage])
    storage = RunStorage.of(cfg.storage_path, cfg.name or checkpoint.stage_run_dir(stage, cfg.depth).name)
    run_id = preflight(cfg, STAGES[stage], storage)
    cpus = cfg.num_workers * cfg.cpus_per_worker + cfg.tokenize_workers + 1  # + the packing actor
    nodes = planned_nodes(cfg.address, cfg.dtype, cfg.device, cpus)
    group, scaling = plan_cluster(cfg.precision, cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, ray_nodes=nodes,
                                  wait_for_nodes_s=cfg.wait_for_nodes_s)
    nodes = ray.nodes() if ray.is_initialized() else nodes  # with the nodes an autoscaler added meanwhile
    cfg.max_failures = failures_allowed(cfg.max_failures, sum(n["Alive"] for n in nodes))
    print(f"cluster precision groups:\n{format_groups(groups(nodes_from_ray(nodes)))}\n"
          f"training on the {group.precision} group: {cfg.num_workers} worker(s) on {', '.join(sorted(group.gpu_names))}")
    connect(cfg.address, cfg.dtype, cfg.device, cpus)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig  # after the checks (see the imports)
    from ray.train.torch import TorchTrainer

    stage_fields = {f.name for f in dataclasses.fields(STAGES[stage].config)}
    stage_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k in stage_fields}
    uri = cfg.mlflow_uri or default_uri(cfg.storage_path if storage.local else "")  # sqlite needs a disk
    # the storage as shown: a URI's query and any key pair in it stay out of MLflow
    params = {**dataclasses.asdict(cfg), "storage_path": storage.show(storage.root), "precision_group": group.precision}
    # the run ends with the block: FAILED on an error, KILLED on Ctrl-C or SIGTERM (`ray job stop`)
    # the driver holds the run folder's lock while Ray Train writes checkpoints there: one writer per run (a
    # lock on a disk only: object storage has no flock, and there run.json's owner check is the only guard)
    lock = checkpoint.RunLock(storage.path) if storage.local else contextlib.nullcontext()
    with lock, Tracker.create(uri, cfg.mlflow_experiment, storage.name, params).ending() as tracker:
        checkpoint.claim_run_dir(storage.path, run_id, None if storage.local else storage.fs)
        print(f"MLflow run {tracker.run_id} in {uri}  ({ui_command(uri)})")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "stage": stage, "stage_config": stage_config, "precision": group.precision,
                "shard_optimizer": cfg.shard_optimizer, "grad_dtype": cfg.grad_dtype, "fault": os.environ.get(FAULT_ENV, ""),
                "run_id": run_id, "start": start, "mlflow_uri": uri, "mlflow_run_id": tracker.run_id, "summary_file": storage.file("summary.json"),
            },
            scaling_config=scaling,
            run_config=RunConfig(
                **storage.run_config(),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
            ),
            **(ray_datasets(cfg, storage) if STAGES[stage].shards else {}),
        )
        result = trainer.fit()
        tracker.log_loss_plot()
    summary = json.loads(read_text(*storage.file("summary.json")))
    summary.update(checkpoint=storage.show(result.checkpoint.path) if result.checkpoint else None, mlflow_run_id=tracker.run_id,
                   mlflow_uri=uri)
    print("summary:", json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_driver(main)
