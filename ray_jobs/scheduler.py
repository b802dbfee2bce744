"""Precision groups: which nodes of a Ray cluster may train one model together.

A *precision group* is the set of workers that all-reduce one model, so they must share one compute
dtype: an A100 (bf16) and a P100 (fp16) cannot average gradients of the same step meaningfully, and a
P100 cannot run bf16 at all. Every node advertises its group as Ray node labels
(`cluster/start_node.sh` runs `python -m nanochat.precision --labels`):

    nanochat/precision = bf16 | fp16 | fp32        nanochat/gpu = Tesla-P100-PCIE-16GB

Without those labels the group is derived from Ray's own `ray.io/accelerator-type` (e.g. "P100")
through the same precision policy. The driver then:

    group, scaling = plan_cluster(precision="auto", num_workers=4)   # refuses what one group can't hold
    TorchTrainer(..., scaling_config=scaling).fit()                   # workers land in that group only

and every worker, after setup, all-gathers what it probed and calls `check_worker_precisions`, so a
node with wrong labels aborts the run with a table instead of silently training in mixed precision.

    python -m ray_jobs.scheduler                  # the groups of the running cluster (RAY_ADDRESS or auto)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from nanochat.config import option, parse_config
from nanochat.errors import UsageError, run_main
from nanochat.precision import ACCELERATOR_TYPES, DTYPES, DeviceInfo, peak_flops, plan_for, precision_label

if TYPE_CHECKING:
    from ray.train import ScalingConfig

LABEL_PRECISION = "nanochat/precision"
LABEL_GPU = "nanochat/gpu"
LABEL_ACCELERATOR = "ray.io/accelerator-type"  # set by Ray on GPU nodes it recognises
LABEL_NODE_ID = "ray.io/node-id"  # set by Ray on every node
PRECISIONS = ("bf16", "fp16", "fp32")
LONG_DTYPE = {precision_label(dtype): dtype for dtype in DTYPES}  # bf16 -> bfloat16, ...
UNKNOWN = "unknown"  # a GPU node with neither our labels nor an accelerator type we know


class PrecisionGroupError(UsageError, RuntimeError):
    """A request that no single precision group can serve, or workers that disagree on their dtype
    (the message says what to do; `details` holds the table of the cluster or of the workers)."""


@dataclass
class NodeInfo:
    node_id: str
    host: str
    precision: str  # "bf16" | "fp16" | "fp32" (or "unknown": a GPU we cannot classify)
    gpu: str  # device name, or "CPU"
    num_gpus: int
    num_cpus: float
    labelled: bool  # True when the node carries our nanochat/precision label
    accelerator_type: str | None = None  # Ray's accelerator type, when it has one


@dataclass
class Group:
    precision: str
    nodes: list[NodeInfo] = field(default_factory=list)
    gpus: int = 0
    cpus: float = 0.0
    gpu_names: set[str] = field(default_factory=set)
    peak_flops: float = 0.0  # sum over the group's GPUs, in the group's dtype; 0 when unknown

    def worker_slots(self, use_gpu: bool, cpus_per_worker: float = 1, gpus_per_worker: float = 1) -> int:
        """How many workers of this shape the group's nodes hold when the cluster is otherwise idle."""
        return sum(_node_slots(node, use_gpu, cpus_per_worker, gpus_per_worker) for node in self.nodes)


def _node_slots(node: NodeInfo, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float = 1) -> int:
    # a worker needs its CPUs on the same node as its GPU, so count per node, not per group
    by_cpu = math.floor(node.num_cpus / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 10**9
    return min(math.floor(node.num_gpus / gpus_per_worker + 1e-9), by_cpu) if use_gpu else by_cpu


# -----------------------------------------------------------------------------
# Reading the cluster
def nodes_from_ray(ray_nodes: list[dict]) -> list[NodeInfo]:
    """The alive nodes of `ray.nodes()` that can host a worker, each with its precision group."""
    nodes = []
    for raw in ray_nodes:
        if not raw.get("Alive", raw.get("alive", False)):
            continue
        resources = raw.get("Resources") or {}
        labels = raw.get("Labels") or {}
        num_gpus = int(resources.get("GPU", 0))
        num_cpus = float(resources.get("CPU", 0))
        if num_gpus == 0 and num_cpus == 0:
            continue  # e.g. a head started with --num-cpus 0: it schedules, it never trains
        accelerator = _accelerator_type(labels, resources)
        if LABEL_PRECISION in labels:
            precision = labels[LABEL_PRECISION]
            gpu = labels.get(LABEL_GPU) or accelerator or ("CPU" if num_gpus == 0 else UNKNOWN)
        else:
            precision, gpu = _precision_from_accelerator(accelerator, num_gpus)
        nodes.append(
            NodeInfo(
                node_id=raw.get("NodeID", ""),
                host=raw.get("NodeManagerHostname") or raw.get("NodeManagerAddress", ""),
                precision=precision,
                gpu=gpu,
                num_gpus=num_gpus,
                num_cpus=num_cpus,
                labelled=LABEL_PRECISION in labels,
                accelerator_type=accelerator,
            )
        )
    return nodes


def _accelerator_type(labels: dict, resources: dict) -> str | None:
    if labels.get(LABEL_ACCELERATOR):
        return labels[LABEL_ACCELERATOR]
    # older nodes only carry the resource form, e.g. {"accelerator_type:V100": 1.0}
    for key in resources:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def _precision_from_accelerator(accelerator: str | None, num_gpus: int) -> tuple[str, str]:
    """(precision, gpu name) of an unlabelled node, via the same policy a worker applies to itself."""
    if num_gpus == 0:
        return "fp32", "CPU"
    if accelerator not in ACCELERATOR_TYPES:
        return UNKNOWN, accelerator or UNKNOWN
    name, capability = ACCELERATOR_TYPES[accelerator]
    return plan_for(DeviceInfo("cuda", name, capability)).short, name


def groups(nodes: list[NodeInfo]) -> dict[str, Group]:
    """Nodes grouped by precision, strongest-dtype first (bf16, fp16, fp32, then anything else)."""
    result: dict[str, Group] = {}
    order = {p: i for i, p in enumerate(PRECISIONS)}
    for node in sorted(nodes, key=lambda n: (order.get(n.precision, len(order)), n.precision)):
        group = result.setdefault(node.precision, Group(node.precision))
        group.nodes.append(node)
        group.gpus += node.num_gpus
        group.cpus += node.num_cpus
        group.gpu_names.add(node.gpu)
        if node.num_gpus and node.precision in LONG_DTYPE:
            group.peak_flops += node.num_gpus * (peak_flops(node.gpu, LONG_DTYPE[node.precision]) or 0.0)
    return result


def format_groups(groups: dict[str, Group]) -> str:
    """A plain-text table of the cluster's precision groups."""
    header = ("precision", "nodes", "GPUs", "GPU names", "CPUs", "peak TFLOP/s")
    rows = [
        (
            g.precision,
            str(len(g.nodes)),
            str(g.gpus),
            ", ".join(sorted(g.gpu_names)),
            f"{g.cpus:g}",
            f"{g.peak_flops / 1e12:.1f}" if g.peak_flops else "-",
        )
        for g in groups.values()
    ]
    if not rows:
        rows = [("(none)", "0", "0", "-", "0", "-")]
    return _table(header, rows)


def _summary(groups: dict[str, Group]) -> str:
    """The cluster in a few words, for a one-line error: "it has fp32: 1 node(s), 16 CPUs"."""
    if not groups:
        return "it has no node that can run a worker"
    parts = [f"{g.precision}: {len(g.nodes)} node(s), "
             + (f"{g.gpus} GPU(s) ({', '.join(sorted(g.gpu_names))}), " if g.gpus else "") + f"{g.cpus:g} CPUs"
             for g in groups.values()]
    return "it has " + "; ".join(parts)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


# -----------------------------------------------------------------------------
# Choosing a group
def _need(num: int, role: str, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float) -> str:
    if use_gpu:
        return f"{num} {role}(s) of {gpus_per_worker:g} GPU each"
    return f"{num} {cpus_per_worker:g}-CPU {role}(s)"


def choose_group(
    groups: dict[str, Group],
    precision: str = "auto",
    num_workers: int = 1,
    use_gpu: bool = True,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 1,
    role: str = "worker",
) -> Group:
    """The one group that runs `num_workers` workers, or PrecisionGroupError with the cluster's table.

    auto: among the groups that can hold every worker, the most peak FLOP/s (ties: most GPUs, then
    most CPUs). An explicit precision gets that group or a refusal, never a mix: refusing here, before
    any worker starts, beats a fit() that waits forever for resources the group does not have.
    """
    need = _need(num_workers, role, use_gpu, cpus_per_worker, gpus_per_worker)
    table = "the cluster has:\n" + format_groups(groups)
    if precision != "auto":
        if precision not in PRECISIONS:
            raise PrecisionGroupError(
                f"unknown precision {precision!r}; choose auto or one of {', '.join(PRECISIONS)}"
            )
        group = groups.get(precision)
        if group is None:
            raise PrecisionGroupError(
                f"no {precision} nodes in this cluster ({_summary(groups)}), so {need} cannot start: pick a "
                "precision the cluster has (or drop --precision), or add nodes started with cluster/start_node.sh on matching GPUs.",
                table,
            )
        slots = group.worker_slots(use_gpu, cpus_per_worker, gpus_per_worker)
        if slots < num_workers:
            raise PrecisionGroupError(
                f"the {precision} group holds {slots} of the {need} requested ({_summary(groups)}); {role}s of one "
                f"model must share one dtype, so they will not be spread over other groups: ask for at most {slots} "
                f"{role}(s), another precision, or add {precision} nodes.",
                table,
            )
        return group

    candidates = [
        g
        for g in groups.values()
        if g.precision in PRECISIONS and g.worker_slots(use_gpu, cpus_per_worker, gpus_per_worker) >= num_workers
    ]
    if not candidates:
        most = max((g.worker_slots(use_gpu, cpus_per_worker, gpus_per_worker) for g in groups.values()), default=0)
        raise PrecisionGroupError(
            f"no single precision group holds {need} ({_summary(groups)}); {role}s of one model must share one "
            f"dtype: ask for at most {most} {role}(s) (or fewer CPUs per {role}), or add nodes.",
            table,
        )
    best = max(candidates, key=lambda g: (g.peak_flops, g.gpus, g.cpus))
    others = ", ".join(f"{g.precision} {g.peak_flops / 1e12:.1f}" for g in candidates if g is not best)
    print(
        f"precision auto: using the {best.precision} group ({', '.join(sorted(best.gpu_names))}; "
        f"{best.peak_flops / 1e12:.1f} peak TFLOP/s, {best.gpus} GPUs, {best.cpus:g} CPUs): the strongest "
        f"group that holds {need}" + (f" (other candidates, TFLOP/s: {others})" if others else "")
    )
    return best


def check_room(
    groups: dict[str, Group],
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 1,
    role: str = "worker",
) -> None:
    """Refuse `num_workers` workers that need not share a dtype (e.g. Serve replicas) when the whole
    cluster cannot hold them: their placement would wait without end."""
    slots = sum(g.worker_slots(use_gpu, cpus_per_worker, gpus_per_worker) for g in groups.values())
    if slots < num_workers:
        need = _need(num_workers, role, use_gpu, cpus_per_worker, gpus_per_worker)
        raise PrecisionGroupError(
            f"the cluster holds {slots} of the {need} requested ({_summary(groups)}): ask for fewer or smaller "
            f"{role}s, or add nodes.",
            "the cluster has:\n" + format_groups(groups),
        )


def scaling_config(
    group: Group, num_workers: int, use_gpu: bool, cpus_per_worker: float = 1
) -> ScalingConfig:
    """A ray.train.ScalingConfig that keeps every worker on the nodes of `group`."""
    # imported here: Ray Train costs the entry points' fast checks seconds at import
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    kwargs: dict = {}
    accelerators = {n.accelerator_type for n in group.nodes}
    if all(n.labelled for n in group.nodes):
        # the label also matches nodes that join later (autoscaling), unlike a list of node ids
        kwargs["label_selector"] = {LABEL_PRECISION: group.precision}
    elif use_gpu and len(accelerators) == 1 and None not in accelerators:
        kwargs["accelerator_type"] = accelerators.pop()
    else:
        # unlabelled nodes of several kinds: name them; the selector takes at most one value per key
        kwargs["label_selector"] = {LABEL_NODE_ID: f"in({','.join(n.node_id for n in group.nodes)})"}
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources, **kwargs)


def plan_cluster(
    precision: str = "auto",
    num_workers: int = 1,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1,
    ray_nodes: list[dict] | None = None,
) -> tuple[Group, ScalingConfig]:
    """(group, ScalingConfig) for the cluster of `ray_nodes` (in `ray.nodes()` form; default: the connected
    cluster's); refuses what no single group can run."""
    nodes = nodes_from_ray(ray.nodes() if ray_nodes is None else ray_nodes)
    if use_gpu is None:
        use_gpu = any(n.num_gpus for n in nodes)
    found = groups(nodes)
    group = choose_group(found, precision, num_workers, use_gpu, cpus_per_worker)
    return group, scaling_config(group, num_workers, use_gpu, cpus_per_worker)


# -----------------------------------------------------------------------------
# The worker-side guard
def check_worker_precisions(records: list[dict], expected: str) -> None:
    """Raise PrecisionGroupError unless every worker computes in `expected`.

    `records` are {"rank", "host", "gpu", "dtype"} dicts all-gathered from every worker after it probed
    its own device; every worker calls this with the same list, so every worker raises the same error.
    """
    dtypes = {r["dtype"] for r in records}
    if dtypes == {expected}:
        return
    keys = ("rank", "host", "gpu", "dtype")
    rows = [
        (*(str(r[k]) for k in keys), "ok" if r["dtype"] == expected else "MISMATCH")
        for r in sorted(records, key=lambda r: r["rank"])
    ]
    table = _table((*keys, f"expected {expected}"), rows)
    raise PrecisionGroupError(
        f"workers of one precision group disagree on the compute dtype (expected {expected} everywhere, "
        f"got {', '.join(sorted(dtypes))}): a node's labels do not match its GPU; restart it with "
        "cluster/start_node.sh, which labels it from its own precision probe, or choose the group explicitly "
        "with --precision.",
        table,
    )


# -----------------------------------------------------------------------------
@dataclass
class SchedulerOptions:
    """Print the precision groups of a running Ray cluster."""

    address: str = option("", "Ray cluster address; empty = RAY_ADDRESS or auto")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(SchedulerOptions, argv, description=SchedulerOptions.__doc__)
    ray.init(address=args.address or "auto", logging_level="ERROR", ignore_reinit_error=True)
    print(format_groups(groups(nodes_from_ray(ray.nodes()))))
    return 0


if __name__ == "__main__":
    run_main(main)
