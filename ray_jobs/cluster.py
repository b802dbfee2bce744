"""Connecting a Ray driver to its cluster: the one `connect` every driver (train, tune, serve) calls,
the nodes it will find there (to refuse a request before starting anything), and how a driver fails.

The rule: an address (--address or $RAY_ADDRESS) joins that cluster; without one a local Ray starts,
never joining some other cluster that happens to run on this host, labelled with this machine's
precision group as cluster/start_node.sh labels real nodes.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable

import ray
import torch
from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from nanochat.errors import run_main
from nanochat.precision import node_labels, resolve


def joins_cluster(address: str) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


def local_cpus(cpus_needed: float) -> int:
    return max(os.cpu_count() or 1, math.ceil(cpus_needed))


def planned_nodes(address: str, dtype: str, device: str, cpus_needed: float) -> list[dict]:
    """The nodes (in `ray.nodes()` form) the driver will run on: those of the cluster it joins (connecting
    to it starts nothing) or that this process runs already, else the one local node `connect` would
    start, described without starting it."""
    if joins_cluster(address) or ray.is_initialized():
        connect(address, dtype, device, cpus_needed)
        return ray.nodes()
    resources = {"CPU": float(local_cpus(cpus_needed)), "GPU": float(torch.cuda.device_count())}
    return [{"Alive": True, "NodeID": "local", "NodeManagerHostname": socket.gethostname(), "Resources": resources,
             "Labels": node_labels(resolve(dtype, device or None))}]


def connect(address: str, dtype: str, device: str, cpus_needed: float) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a local one with at least `cpus_needed` CPUs.

    A local Ray counts the machine's cores as its CPUs; on a laptop the workers would take them all
    and the rest (tokenizer actors, Serve's controller) would wait forever, so it asks for what the
    job needs (Ray's CPUs are logical: a small machine is simply oversubscribed). `dtype` and
    `device` (with NANOCHAT_EMULATE applied) name the precision group the local node joins."""
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, ignore_reinit_error=True)
        return
    labels = node_labels(resolve(dtype, device or None))
    ray.init(address="local", num_cpus=local_cpus(cpus_needed), labels=labels, ignore_reinit_error=True)


def ray_wrapped(error: BaseException) -> list[BaseException]:
    """The errors a Ray error carries: a task's or actor's own error, each failed training worker's."""
    if isinstance(error, RayTaskError) and error.cause is not None:
        return [error.cause]
    if isinstance(error, WorkerGroupError):
        return list(error.worker_failures.values())
    if isinstance(error, ControllerError):
        return [error.controller_failure]
    return []


def run_driver(main: Callable[[list[str]], object]) -> None:
    """A Ray driver's `__main__`: nanochat.errors.run_main, finding user errors inside Ray's own errors too,
    so a bad shard read by a worker ends the driver in one line naming the file."""
    run_main(main, ray_wrapped)
