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

On a cluster with an autoscaler, a request the nodes alive now cannot hold is checked against what the
autoscaler's node types may add (refused at once if even that is too little), asked for, and waited for
a bounded time (--wait-for-nodes-s) before it is refused. Every worker, after setup, all-gathers what it
probed and calls `check_worker_precisions`, so a node with wrong labels aborts the run with a table
instead of silently training in mixed precision.

    python -m ray_jobs.scheduler                  # the groups of the running cluster (RAY_ADDRESS or auto)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from nanochat.config import option, parse_config
from nanochat.errors import UsageError, run_main
from nanochat.precision import (
    ACCELERATOR_TYPES,
    DTYPES,
    MIXED,
    DeviceInfo,
    peak_flops,
    plan_for,
    precision_label,
)

if TYPE_CHECKING:
    from ray.train import ScalingConfig

LABEL_PRECISION = "nanochat/precision"
LABEL_GPU = "nanochat/gpu"
LABEL_ACCELERATOR = "ray.io/accelerator-type"  # set by Ray on GPU nodes it recognises
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
    quiet: bool = False,
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
    if quiet:
        return best
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
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         label_selector=group_selector(group, use_gpu))


def group_selector(group: Group, use_gpu: bool) -> dict[str, str]:
    """The Ray label selector of the group's nodes. Labels, never node ids: a node that joins later (the
    autoscaler's, a replaced spot node) matches as well as the nodes alive now."""
    if all(n.labelled for n in group.nodes):
        return {LABEL_PRECISION: group.precision}
    # unlabelled nodes: by Ray's accelerator type, keeping out nodes that our label puts in another group
    others = sorted({*PRECISIONS, MIXED} - {group.precision})
    selector = {LABEL_PRECISION: f"!in({','.join(others)})"}
    accelerators = sorted({n.accelerator_type for n in group.nodes if n.accelerator_type})
    if use_gpu and accelerators:
        selector[LABEL_ACCELERATOR] = f"in({','.join(accelerators)})"
    return selector


def plan_cluster(
    precision: str = "auto",
    num_workers: int = 1,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1,
    ray_nodes: list[dict] | None = None,
    wait_for_nodes_s: float = 0,
) -> tuple[Group, ScalingConfig]:
    """(group, ScalingConfig) for the cluster of `ray_nodes` (in `ray.nodes()` form; default: the connected
    cluster's); refuses what no single group can run. A connected cluster with an autoscaler may grow: what
    its node types could add is counted, a request none of them can serve is refused at once, and the rest
    waits up to `wait_for_nodes_s` for the autoscaler's nodes before it is refused."""
    nodes = nodes_from_ray(ray.nodes() if ray_nodes is None else ray_nodes)
    growth = Growth.of_cluster(wait_for_nodes_s)
    if use_gpu is None:
        use_gpu = any(n.num_gpus for n in [*nodes, *(growth.addable if growth else [])])
    shape = {"precision": precision, "num_workers": num_workers, "use_gpu": use_gpu, "cpus_per_worker": cpus_per_worker}
    group = choose_or_grow(nodes, shape, growth, wait_for_nodes_s)
    return group, scaling_config(group, num_workers, use_gpu, cpus_per_worker)


def choose_or_grow(nodes: list[NodeInfo], shape: dict, growth: Growth | None, wait_s: float) -> Group:
    """choose_group(**shape) on the nodes alive now; where that refuses and the cluster can grow, the group
    the autoscaler's nodes make within `wait_s` (Growth.wait_for_group)."""
    try:
        return choose_group(groups(nodes), **shape)
    except PrecisionGroupError as refused:
        if growth is None:
            raise
        return growth.wait_for_group(nodes, shape, refused, wait_s)


# -----------------------------------------------------------------------------
# A cluster that can grow
AUTOSCALER_CONFIG_ENV = "NANOCHAT_AUTOSCALER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler's config on the head
POLL_S = 2.0


def addable_nodes(config: dict, alive: list[dict]) -> list[NodeInfo]:
    """The nodes the autoscaler of `config` (a cluster launcher YAML, as a dict) may still add: for each node type
    with worker capacity, max_workers minus its nodes alive in `alive` (ray.nodes() form; a node is of a type when
    it carries every label of the type), each with the type's resources and labels."""
    nodes = []
    head = config.get("head_node_type")
    for name, spec in (config.get("available_node_types") or {}).items():
        resources, labels = spec.get("resources") or {}, spec.get("labels") or {}
        if name == head or not (resources.get("GPU") or resources.get("CPU")):
            continue
        of_type = sum(1 for raw in alive if raw.get("Alive") and labels
                      and labels.items() <= (raw.get("Labels") or {}).items())
        count = min(spec.get("max_workers", config.get("max_workers", 0)), config.get("max_workers", 10**6)) - of_type
        nodes += nodes_from_ray([{"Alive": True, "NodeID": f"{name}#{i + 1}", "NodeManagerHostname": f"(new {name})",
                                  "Resources": resources, "Labels": labels} for i in range(count)])
    return nodes


def read_autoscaler_config() -> dict | None:
    """The autoscaler's cluster config: $NANOCHAT_AUTOSCALER_CONFIG, else the one `ray up` leaves on the head;
    None where neither exists (a KubeRay cluster, a driver off the head): then the autoscaler alone knows."""
    import yaml

    path = Path(os.environ.get(AUTOSCALER_CONFIG_ENV) or BOOTSTRAP_CONFIG).expanduser()
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def runs_autoscaler_v2() -> bool:
    """Whether the connected cluster runs the v2 autoscaler, as `ray up` and KubeRay start it since Ray 2.50. (A
    local or hand-started head runs a read-only v1 monitor that adds nothing: it does not count.)"""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return is_autoscaler_v2(fetch_from_server=True)


@dataclass
class Growth:
    """What the autoscaler of a connected cluster may add: `addable` nodes of its known node types (empty when
    the types are unknown: `known` False)."""

    addable: list[NodeInfo]
    known: bool

    @classmethod
    def of_cluster(cls, wait_s: float = 1.0) -> Growth | None:
        """None for a cluster without an autoscaler (a local one, hand-started nodes): nothing will come; and
        where there is nothing to wait for (no connected cluster, `wait_s` 0)."""
        if not ray.is_initialized() or wait_s <= 0:
            return None
        config = read_autoscaler_config()
        if config is None and not runs_autoscaler_v2():
            return None
        return cls(addable_nodes(config, ray.nodes()) if config else [], config is not None)

    def tables(self, nodes: list[NodeInfo]) -> str:
        known = ("the autoscaler can add:\n" + format_groups(groups(self.addable)) if self.known else
                 f"the autoscaler's node types are unknown here (set {AUTOSCALER_CONFIG_ENV} to its cluster config)")
        return f"the cluster has:\n{format_groups(groups(nodes))}\n{known}"

    def wait_for_group(self, nodes: list[NodeInfo], shape: dict, refused: PrecisionGroupError, wait_s: float) -> Group:
        """Ask the autoscaler for the workers' resources and wait up to `wait_s` for a group to hold them."""
        target = None
        if self.known:
            try:  # what the cluster could grow to: a request that even that cannot hold is refused now
                target = choose_group(groups([*nodes, *self.addable]), **shape, quiet=True)
            except PrecisionGroupError as never:
                raise PrecisionGroupError(f"{never.message} Not even the nodes the autoscaler can add would hold it.",
                                          self.tables(nodes)) from None
        precision = target.precision if target else shape["precision"]
        # unknown types: the label our cluster files and start_node.sh give, or any node for auto
        selector = (group_selector(target, shape["use_gpu"]) if target else
                    {LABEL_PRECISION: precision} if precision in PRECISIONS else {})
        bundle = {"CPU": shape["cpus_per_worker"], **({"GPU": shape.get("gpus_per_worker", 1)} if shape["use_gpu"] else {})}
        print(f"{refused.message}\nwaiting up to {wait_s:g} s (--wait-for-nodes-s) for the autoscaler to add nodes"
              + (f" of the {precision} group" if selector else ""), flush=True)
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[bundle] * shape["num_workers"], bundle_label_selectors=[selector] * shape["num_workers"])
        deadline = time.monotonic() + wait_s
        try:
            while True:
                nodes = nodes_from_ray(ray.nodes())
                try:
                    return choose_group(groups(nodes), **shape)
                except PrecisionGroupError as still:
                    if time.monotonic() >= deadline:
                        raise PrecisionGroupError(f"{still.message} The autoscaler added no room for it within {wait_s:g} s "
                                                  "(--wait-for-nodes-s).", self.tables(nodes)) from None
                time.sleep(POLL_S)
        finally:
            # the trainer's own placement group holds the nodes from here; a standing request would keep
            # them from ever scaling down
            request_resources(bundles=[])


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
