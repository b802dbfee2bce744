"""Connecting a Ray driver to its cluster: the one `connect` every driver (train, tune, serve) calls.

The rule: an address (--address or $RAY_ADDRESS) joins that cluster; without one a local Ray starts,
never joining some other cluster that happens to run on this host, labelled with this machine's
precision group as cluster/start_node.sh labels real nodes.
"""

from __future__ import annotations

import math
import os

import ray

from nanochat.precision import node_labels, resolve


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
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), labels=labels,
             ignore_reinit_error=True)
