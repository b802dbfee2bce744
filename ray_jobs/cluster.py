"""Connecting a Ray driver to its cluster: the one `connect` every driver (train, tune, serve) calls,
the nodes it will find there (to refuse a request before starting anything), how a driver fails, and
the Ray output it keeps quiet.

The rule: an address (--address or $RAY_ADDRESS) joins that cluster; without one a local Ray starts,
never joining some other cluster that happens to run on this host, labelled with this machine's
precision group as cluster/start_node.sh labels real nodes. This module imports Ray's libraries and
torch only where it uses them: a driver's checks run before them, and Ray workers import it at start.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from collections.abc import Callable

import ray

from nanochat.errors import run_main

# Ray Train sends each print of a training worker to its logger as well as to stdout, and Ray forwards
# both the worker's stdout and its stderr: every line would show twice. Ray Train passes this variable
# on from the process that builds a trainer to its workers.
PRINT_ONCE = ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def joins_cluster(address: str) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


def local_cpus(cpus_needed: float) -> int:
    return max(os.cpu_count() or 1, math.ceil(cpus_needed))


def planned_nodes(address: str, dtype: str, device: str, cpus_needed: float) -> list[dict]:
    """The nodes (in `ray.nodes()` form) the driver will run on: those of the cluster it joins (connecting
    to it starts nothing) or that this process runs already, else the one local node `connect` would
    start, described without starting it."""
    import torch

    if joins_cluster(address) or ray.is_initialized():
        connect(address, dtype, device, cpus_needed)
        return ray.nodes()
    resources = {"CPU": float(local_cpus(cpus_needed)), "GPU": float(torch.cuda.device_count())}
    return [{"Alive": True, "NodeID": "local", "NodeManagerHostname": socket.gethostname(), "Resources": resources,
             "Labels": local_labels(dtype, device)}]


def local_labels(dtype: str, device: str) -> dict[str, str]:
    """The labels of the local node: from `device` when one is named, else from every GPU of the machine (a
    machine whose GPUs disagree is labelled mixed, as cluster/start_node.sh labels it)."""
    from nanochat.precision import detect, detect_all, machine_labels, mixed_note

    labels = machine_labels([detect(device)] if device else detect_all(), dtype)
    note = mixed_note(labels)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return labels


def connect(address: str, dtype: str, device: str, cpus_needed: float) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a local one with at least `cpus_needed` CPUs.

    A local Ray counts the machine's cores as its CPUs; on a laptop the workers would take them all
    and the rest (tokenizer actors, Serve's controller) would wait forever, so it asks for what the
    job needs (Ray's CPUs are logical: a small machine is simply oversubscribed). `dtype` and
    `device` (with NANOCHAT_EMULATE applied) name the precision group the local node joins."""
    quiet_driver()
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, runtime_env=job_env(), ignore_reinit_error=True)
        return
    labels = local_labels(dtype, device)
    ray.init(address="local", num_cpus=local_cpus(cpus_needed), labels=labels, runtime_env=job_env(),
             ignore_reinit_error=True)


# -----------------------------------------------------------------------------
# what Ray prints


class ResumeWithFlag(logging.Filter):
    """Ray Tune ends an interrupted sweep with "Resume experiment with: Tuner.restore(path=..., trainable=...)",
    a Python call; here the same command with --resume continues it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Tuner.restore(" in record.getMessage():
            record.msg, record.args = ("interrupted; the sweep's state is saved: run the same command with --resume "
                                       "to continue it"), ()
        return True


def quiet_driver() -> None:
    """This process's share of the quiet: prints of the trainers it builds reach it once (PRINT_ONCE), and
    Ray Tune's advice to resume names --resume."""
    os.environ.setdefault(*PRINT_ONCE)
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, ResumeWithFlag) for f in tune_log.filters):
        tune_log.addFilter(ResumeWithFlag())


def job_env() -> dict:
    """The runtime_env of a job that `ray.init` starts: its worker processes run setup_worker."""
    return {"worker_process_setup_hook": setup_worker}


def setup_worker() -> None:
    """Run by every worker process of the job as it starts (runtime_env's worker_process_setup_hook).

    PRINT_ONCE, for the trainers a worker builds (a Tune trial) and for Ray Train's own workers. And the
    cluster address for Ray's state API: called with no address inside a worker, it takes the cluster of
    the latest `ray start` on this host, or any Ray it finds running here. Ray Train's placement group
    cleaner asks it every second whether the trainer is alive: on a host with another Ray (a `ray start`
    head for `ray job submit`) it asks that cluster, is told the trainer is gone and removes the live
    trainer's placement group, killing its workers; when that other Ray has stopped it dies with a
    30-line RpcError traceback instead, once per Tune trial."""
    os.environ.setdefault(*PRINT_ONCE)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


# -----------------------------------------------------------------------------
# how a driver fails


def ray_wrapped(error: BaseException) -> list[BaseException]:
    """The errors a Ray error carries: a task's or actor's own error, each failed training worker's."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return [error.cause]
    training = sys.modules.get("ray.train")  # not imported: the error cannot be one of Ray Train's
    if training is not None and isinstance(error, training.WorkerGroupError):
        return list(error.worker_failures.values())
    if training is not None and isinstance(error, training.ControllerError):
        return [error.controller_failure]
    return []


def run_driver(main: Callable[[list[str]], object]) -> None:
    """A Ray driver's `__main__`: nanochat.errors.run_main, finding user errors inside Ray's own errors too,
    so a bad shard read by a worker ends the driver in one line naming the file."""
    run_main(main, ray_wrapped)
