"""Precision groups: pure rules on hand-written `ray.nodes()` output, then one real fake-heterogeneous
Ray cluster (two "P100" fp16 nodes, one "A100" bf16 node, CPUs only) that real TorchTrainers run on.

    python -m pytest tests/test_scheduler.py -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import ray.train
import torch.distributed as dist
import yaml
from ray._private.label_utils import parse_node_labels_string, validate_node_label_syntax
from ray.cluster_utils import Cluster
from ray.train import FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from nanochat.precision import MIXED, DeviceInfo, machine_labels, node_labels, plan_for
from nanochat.precision import main as precision_main
from ray_jobs.scheduler import (
    LABEL_ACCELERATOR,
    LABEL_GPU,
    LABEL_PRECISION,
    PrecisionGroupError,
    addable_nodes,
    check_worker_precisions,
    choose_group,
    format_groups,
    group_selector,
    groups,
    nodes_from_ray,
    plan_cluster,
    scaling_config,
)
from ray_jobs.scheduler import main as scheduler_main

REPO = Path(__file__).resolve().parents[1]
LABEL_NODE_ID = "ray.io/node-id"  # Ray labels every node with its id
P100 = {LABEL_PRECISION: "fp16", LABEL_GPU: "Tesla-P100-PCIE-16GB"}
A100 = {LABEL_PRECISION: "bf16", LABEL_GPU: "NVIDIA-A100-SXM4-80GB"}


def raw_node(
    node_id: str,
    cpus: float = 8,
    gpus: int = 0,
    labels: dict | None = None,
    accelerator: str | None = None,
    accelerator_as_label: bool = True,
    alive: bool = True,
) -> dict:
    """One entry of `ray.nodes()`, in the shape Ray 2.60 returns (trimmed to the keys that matter)."""
    resources = {"object_store_memory": 1.5e8, "memory": 2.4e10, "node:10.0.0.1": 1.0}
    if cpus:
        resources["CPU"] = float(cpus)
    if gpus:
        resources["GPU"] = float(gpus)
    node_labels_ = {LABEL_NODE_ID: node_id, **(labels or {})}
    if accelerator:
        resources[f"accelerator_type:{accelerator}"] = 1.0
        if accelerator_as_label:
            node_labels_["ray.io/accelerator-type"] = accelerator
    return {
        "NodeID": node_id,
        "Alive": alive,
        "alive": alive,
        "NodeManagerAddress": "10.0.0.1",
        "NodeManagerHostname": f"host-{node_id}",
        "NodeName": "10.0.0.1",
        "DeathReason": 0,
        "DeathReasonMessage": "",
        "Resources": resources,
        "Labels": node_labels_,
    }


def cluster_of(*raw: dict) -> dict:
    return groups(nodes_from_ray(list(raw)))


# -----------------------------------------------------------------------------
# Reading nodes
def test_labels_decide_the_group_and_ray_fallbacks_agree_with_them():
    nodes = nodes_from_ray(
        [
            raw_node("head", cpus=0),  # a head that only schedules: no worker can go there
            raw_node("labelled-p100", gpus=2, labels=P100, accelerator="P100"),
            raw_node("bare-p100", gpus=2, accelerator="P100"),  # no nanochat labels
            raw_node("old-v100", gpus=4, accelerator="V100", accelerator_as_label=False),  # resource only
            raw_node("bare-a100", gpus=8, accelerator="A100"),
            raw_node("p40", gpus=1, accelerator="P40"),  # fp16 at 1/64 rate: fp32
            raw_node("mystery", gpus=1, accelerator="GeForce-GTX-TITAN"),
            raw_node("cpu-box", cpus=16),
            raw_node("dead", gpus=8, labels=A100, alive=False),
        ]
    )
    by_id = {n.node_id: n for n in nodes}
    assert set(by_id) == {"labelled-p100", "bare-p100", "old-v100", "bare-a100", "p40", "mystery", "cpu-box"}
    assert (by_id["labelled-p100"].precision, by_id["labelled-p100"].gpu) == ("fp16", "Tesla-P100-PCIE-16GB")
    assert by_id["labelled-p100"].labelled and not by_id["bare-p100"].labelled
    # the accelerator-type route gives the same precision as the probe's labels for the same GPU
    assert by_id["bare-p100"].precision == by_id["labelled-p100"].precision
    assert by_id["old-v100"].precision == "fp16" and by_id["old-v100"].accelerator_type == "V100"
    assert by_id["bare-a100"].precision == "bf16"
    assert by_id["p40"].precision == "fp32"
    assert by_id["mystery"].precision == "unknown"
    assert (by_id["cpu-box"].precision, by_id["cpu-box"].gpu, by_id["cpu-box"].num_gpus) == ("fp32", "CPU", 0)


def test_start_node_labels_and_accelerator_fallback_put_a_gpu_in_the_same_group():
    for accelerator, name, capability in [
        ("P100", "Tesla P100-PCIE-16GB", (6, 0)),
        ("V100", "Tesla V100-SXM2-32GB", (7, 0)),
        ("T4", "Tesla T4", (7, 5)),
        ("A10G", "NVIDIA A10G", (8, 6)),
        ("L4", "NVIDIA L4", (8, 9)),
        ("H100", "NVIDIA H100 80GB HBM3", (9, 0)),
        ("P40", "Tesla P40", (6, 1)),
    ]:
        probed = node_labels(plan_for(DeviceInfo("cuda", name, capability)))
        [labelled, bare] = nodes_from_ray(
            [raw_node("a", gpus=1, labels=probed), raw_node("b", gpus=1, accelerator=accelerator)]
        )
        assert labelled.precision == bare.precision, accelerator


def test_groups_sum_gpus_cpus_and_peak_flops():
    found = cluster_of(
        raw_node("a1", cpus=32, gpus=4, labels=A100),
        raw_node("p1", cpus=8, gpus=4, labels=P100),
        raw_node("p2", cpus=8, gpus=4, labels=P100),
        raw_node("cpu", cpus=16),
    )
    assert list(found) == ["bf16", "fp16", "fp32"]
    fp16 = found["fp16"]
    assert (len(fp16.nodes), fp16.gpus, fp16.cpus, fp16.gpu_names) == (2, 8, 16.0, {"Tesla-P100-PCIE-16GB"})
    assert fp16.peak_flops == pytest.approx(8 * 18.7e12)
    assert found["bf16"].peak_flops == pytest.approx(4 * 312e12)
    assert found["fp32"].peak_flops == 0
    table = format_groups(found)
    assert table.splitlines()[0].split(" | ")[0].strip() == "precision"
    assert "Tesla-P100-PCIE-16GB" in table and "149.6" in table and "1248.0" in table


# -----------------------------------------------------------------------------
# Choosing a group
def test_auto_picks_the_group_with_most_peak_flops(capsys):
    four_a100_eight_p100 = cluster_of(
        raw_node("a", gpus=4, labels=A100),
        raw_node("p1", gpus=4, labels=P100),
        raw_node("p2", gpus=4, labels=P100),
    )
    assert choose_group(four_a100_eight_p100, "auto", num_workers=4).precision == "bf16"
    assert "bf16 group" in capsys.readouterr().out
    # 5 workers do not fit on 4 A100s, so the P100s are the only group that can run them
    assert choose_group(four_a100_eight_p100, "auto", num_workers=5).precision == "fp16"

    one_a100_eight_v100 = cluster_of(
        raw_node("a", gpus=1, accelerator="A100"), raw_node("v", gpus=8, accelerator="V100")
    )
    chosen = choose_group(one_a100_eight_v100, "auto", num_workers=1)
    assert chosen.precision == "fp16" and chosen.peak_flops == pytest.approx(8 * 125e12)
    assert "fp16 group" in capsys.readouterr().out


def test_auto_on_cpus_and_ties():
    found = cluster_of(raw_node("f", cpus=4, labels=P100), raw_node("b", cpus=2, labels=A100))
    # no GPUs anywhere: peak FLOP/s and GPUs tie at 0, so the group with more CPUs wins
    assert choose_group(found, "auto", num_workers=2, use_gpu=False).precision == "fp16"
    assert choose_group(found, "auto", num_workers=2, use_gpu=False, cpus_per_worker=2).precision == "fp16"
    with pytest.raises(PrecisionGroupError, match="no single precision group"):
        choose_group(found, "auto", num_workers=3, use_gpu=False, cpus_per_worker=2)


def test_explicit_precision_is_refused_with_the_table_rather_than_mixed():
    found = cluster_of(
        raw_node("a", cpus=16, gpus=2, labels=A100),
        raw_node("p1", cpus=16, gpus=4, labels=P100),
        raw_node("p2", cpus=1, gpus=4, labels=P100),  # 4 GPUs but CPUs for only one worker
    )
    assert choose_group(found, "fp16", num_workers=5).precision == "fp16"
    with pytest.raises(PrecisionGroupError) as err:
        choose_group(found, "fp16", num_workers=6)  # 8 GPUs, but only 5 have a CPU beside them
    assert "holds 5 of the 6" in str(err.value) and format_groups(found) in str(err.value)
    with pytest.raises(PrecisionGroupError) as err:
        choose_group(found, "bf16", num_workers=3)  # needs bf16 and fp16 nodes together
    assert format_groups(found) in str(err.value)
    with pytest.raises(PrecisionGroupError, match="no fp32 nodes"):
        choose_group(found, "fp32", num_workers=1)
    with pytest.raises(PrecisionGroupError, match="unknown precision"):
        choose_group(found, "float16")


def test_scaling_config_selects_the_group():
    labelled = cluster_of(raw_node("p1", gpus=4, labels=P100, accelerator="P100"))["fp16"]
    config = scaling_config(labelled, 4, use_gpu=True, cpus_per_worker=2)
    assert config.label_selector == {LABEL_PRECISION: "fp16"}
    assert config.resources_per_worker == {"CPU": 2, "GPU": 1} and config.num_workers == 4

    # unlabelled nodes are selected by Ray's accelerator type, never by a list of node ids: a replaced spot
    # node (a new id) matches too, and a node our label puts in another group never does
    bare = cluster_of(raw_node("a1", gpus=8, accelerator="A100"), raw_node("a2", gpus=8, accelerator="A100"))
    config = scaling_config(bare["bf16"], 16, use_gpu=True)
    assert config.label_selector == {LABEL_PRECISION: "!in(fp16,fp32,mixed)", LABEL_ACCELERATOR: "in(A100)"}

    mixed = cluster_of(raw_node("v", gpus=8, accelerator="V100"), raw_node("t", gpus=4, labels=P100, accelerator="T4"))
    config = scaling_config(mixed["fp16"], 12, use_gpu=True)
    assert config.label_selector == {LABEL_PRECISION: "!in(bf16,fp32,mixed)", LABEL_ACCELERATOR: "in(T4,V100)"}


def test_the_gcp_cluster_file_can_grow_into_either_group_but_not_past_its_max_workers():
    config = yaml.safe_load((REPO / "cluster" / "gcp-p100-a100.yaml").read_text())
    head = raw_node("head", cpus=0, labels={LABEL_PRECISION: "fp32", LABEL_GPU: "CPU"})
    a100 = raw_node("a", cpus=12, gpus=1, labels=config["available_node_types"]["a100"]["labels"])  # as launched
    assert groups(nodes_from_ray([head])) == {}  # a fresh cluster: nothing alive can run a worker
    could = groups(addable_nodes(config, [head]))
    # fp16: 8 on-demand P100s and 4 spot ones
    assert {p: (len(g.nodes), g.gpus) for p, g in could.items()} == {"bf16": (4, 4), "fp16": (12, 12)}
    assert choose_group(could, "auto", 4).precision == "bf16" and choose_group(could, "auto", 12).precision == "fp16"
    with pytest.raises(PrecisionGroupError):
        choose_group(could, "fp16", 13)
    with pytest.raises(PrecisionGroupError):
        choose_group(could, "bf16", 5)
    # an A100 alive already counts against its type's max_workers
    assert groups(addable_nodes(config, [head, a100]))["bf16"].gpus == 3


def test_a_machine_whose_gpus_disagree_is_labelled_so_no_group_takes_it(capsys):
    p100, a100 = DeviceInfo("cuda", "Tesla P100-PCIE-16GB", (6, 0)), DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
    assert machine_labels([p100, p100]) == node_labels(plan_for(p100))
    labels = machine_labels([a100, p100, a100])
    assert labels[LABEL_PRECISION] == MIXED and "fp16" in labels[LABEL_GPU] and "bf16" in labels[LABEL_GPU]
    assert validate_node_label_syntax(labels) is None
    # one dtype that every GPU runs puts the machine back in a group
    assert machine_labels([a100, p100], "float16")[LABEL_PRECISION] == "fp16"

    found = cluster_of(raw_node("odd", gpus=2, labels=labels), raw_node("p", gpus=1, labels=P100))
    assert choose_group(found, "auto", 1).precision == "fp16"
    with pytest.raises(PrecisionGroupError) as refused:
        choose_group(found, "auto", 2)
    assert "mixed" in refused.value.details

    assert precision_main(["--labels", "--simulate", "Tesla P100-PCIE-16GB:6.0,NVIDIA A100-SXM4-80GB:8.0"]) == 0
    out, err = capsys.readouterr()
    assert "nanochat/precision=mixed" in out and "start one Ray node per kind of GPU" in err


def test_check_worker_precisions():
    agree = [{"rank": r, "host": "a100-box", "gpu": "NVIDIA A100", "dtype": "bf16"} for r in range(4)]
    check_worker_precisions(agree, "bf16")
    with pytest.raises(PrecisionGroupError, match="expected fp16 everywhere"):
        check_worker_precisions(agree, "fp16")  # they agree with each other, not with the group
    mixed = [*agree[:2], {"rank": 2, "host": "p100-box", "gpu": "Tesla P100-PCIE-16GB", "dtype": "fp16"}]
    with pytest.raises(PrecisionGroupError) as err:
        check_worker_precisions(mixed, "bf16")
    message = str(err.value)
    assert "p100-box" in message and "a100-box" in message
    assert [line.split("|")[-1].strip() for line in message.splitlines() if "-box" in line] == [
        "ok",
        "ok",
        "MISMATCH",
    ]


# -----------------------------------------------------------------------------
# Node labels (what cluster/start_node.sh passes to `ray start --labels`)
def test_node_labels_cli(capsys):
    assert precision_main(["--labels", "--simulate", "Tesla P100-PCIE-16GB:6.0"]) == 0
    assert capsys.readouterr().out.strip() == "nanochat/precision=fp16,nanochat/gpu=Tesla-P100-PCIE-16GB"
    assert precision_main(["--labels", "--simulate", "NVIDIA H100 80GB HBM3:9.0"]) == 0
    assert capsys.readouterr().out.strip() == "nanochat/precision=bf16,nanochat/gpu=NVIDIA-H100-80GB-HBM3"
    assert precision_main(["--labels", "--simulate", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "nanochat/precision=fp32,nanochat/gpu=CPU"


def test_node_label_values_fit_ray_syntax(capsys):
    odd = plan_for(DeviceInfo("cuda", " (NVIDIA) GeForce RTX 4090 / " + "x" * 80 + "_", (8, 9)))
    labels = node_labels(odd)
    validate_node_label_syntax(labels)  # raises on anything `ray start --labels` would reject
    assert labels[LABEL_GPU].startswith("NVIDIA-GeForce-RTX-4090-") and len(labels[LABEL_GPU]) <= 63
    # the CLI line is what `ray start --labels` parses back into the same dict
    precision_main(["--labels", "--simulate", "Tesla P100-SXM2-16GB:6.0"])
    parsed = parse_node_labels_string(capsys.readouterr().out.strip())
    assert parsed == node_labels(plan_for(DeviceInfo("cuda", "Tesla P100-SXM2-16GB", (6, 0))))


def test_start_node_script_passes_the_probed_labels_to_ray_start():
    script = REPO / "cluster" / "start_node.sh"
    env = {**os.environ, "NANOCHAT_DRY_RUN": "1", "NANOCHAT_DTYPE": "float32"}
    done = subprocess.run(
        [script, "worker", "10.0.0.1:6379", "--num-cpus", "4"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "+ ray start --address 10.0.0.1:6379 --labels nanochat/precision=fp32,nanochat/gpu=" in done.stdout
    assert done.stdout.rstrip().endswith("--num-cpus 4")
    refused = subprocess.run([script, "worker"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "needs the head's address" in refused.stderr


# -----------------------------------------------------------------------------
# A real cluster: two fp16 "P100" nodes and one bf16 "A100" node, 2 CPUs each, no GPUs
@pytest.fixture(scope="module")
def cluster():
    saved = dict(os.environ)
    # a worker group that cannot start gives up after this long (with controller_failure_limit=0 in
    # fit() below) instead of being retried forever
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "60"
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"  # notice finished workers sooner
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"  # one actor less per run on a small CI box
    # the nodes' worker processes import this checkout (not whatever copy of the package is installed)
    # and, for the train loops defined here, this test module. Set before the nodes start, so every
    # worker inherits it: a runtime_env would need its own, freshly started worker processes.
    paths = [str(REPO), str(REPO / "tests"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    # no dashboard: Ray Train does not need it, and its port may be taken by another cluster on the host
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for labels in (P100, P100, A100):
        cluster.add_node(num_cpus=2, labels=labels)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def report_labels(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    labels = ray.get_runtime_context().get_node_labels()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(labels))


def lying_workers(config: dict) -> None:
    # each worker claims a different dtype, as a node with wrong labels (or a wrong probe) would
    rank = ray.train.get_context().get_world_rank()
    mine = {"rank": rank, "host": socket.gethostname(), "gpu": "CPU", "dtype": ["fp16", "bf16"][rank]}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, mine)
    check_worker_precisions(records, config["expected"])


def fit(loop, precision: str, num_workers: int, out: Path) -> None:
    out.mkdir(parents=True)
    group, scaling = plan_cluster(precision, num_workers, use_gpu=False)
    TorchTrainer(
        loop,
        train_loop_config={"out": str(out), "expected": group.precision},
        scaling_config=scaling,
        run_config=RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
    ).fit()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict[str, tuple[Path, Future]]:
    """Three runs at once, as two jobs per group would share a real cluster: fp16 x2, bf16 x1, and
    a 2-worker fp16 run whose workers disagree about their dtype (the fp16 group has room for both)."""
    root = tmp_path_factory.mktemp("runs")
    pool = ThreadPoolExecutor(3)
    specs = {
        "fp16": (report_labels, "fp16", 2),
        "bf16": (report_labels, "bf16", 1),
        "lying": (lying_workers, "fp16", 2),
    }
    started = {
        name: (root / name, pool.submit(fit, loop, p, n, root / name)) for name, (loop, p, n) in specs.items()
    }
    yield started
    pool.shutdown(wait=True)


def worker_labels(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_plan_cluster_reads_the_live_labels(cluster, capsys):
    nodes = nodes_from_ray(ray.nodes())
    found = groups(nodes)
    assert {p: (len(g.nodes), g.cpus, g.gpu_names) for p, g in found.items()} == {
        "bf16": (1, 2.0, {"NVIDIA-A100-SXM4-80GB"}),
        "fp16": (2, 4.0, {"Tesla-P100-PCIE-16GB"}),
    }
    group, scaling = plan_cluster("fp16", num_workers=2)  # no GPUs in this cluster: use_gpu becomes False
    assert group.precision == "fp16" and not scaling.use_gpu
    assert scaling.label_selector == {LABEL_PRECISION: "fp16"}
    # the CLI view of the same cluster
    assert scheduler_main([]) == 0
    assert capsys.readouterr().out.strip() == format_groups(found)


def test_too_big_a_request_is_refused_before_any_worker_starts(cluster):
    with pytest.raises(PrecisionGroupError) as err:
        plan_cluster("fp16", num_workers=3, cpus_per_worker=2)
    message = str(err.value)
    assert "fp16" in message and "bf16" in message and "Tesla-P100-PCIE-16GB" in message
    assert "NVIDIA-A100-SXM4-80GB" in message


def test_the_selector_of_unlabelled_nodes_matches_nodes_without_our_label_and_no_other_group(cluster):
    """A group of unlabelled nodes is selected by `!in(<other groups>)` on our label: Ray must read that as
    matching a node that lacks the label (here the head, the one node without it) and no labelled node."""
    selector = group_selector(groups(nodes_from_ray([raw_node("bare", cpus=1)]))["fp32"], use_gpu=False)

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    head = next(n["NodeID"] for n in ray.nodes() if LABEL_PRECISION not in n["Labels"])
    assert {ray.get(where.options(label_selector=selector).remote(), timeout=60) for _ in range(4)} == {head}


@pytest.mark.parametrize("precision, num_workers", [("fp16", 2), ("bf16", 1)])
def test_workers_land_only_on_their_group(cluster, runs, precision, num_workers):
    out, run = runs[precision]
    run.result(timeout=180)
    labels = worker_labels(out)
    assert len(labels) == num_workers
    group_ids = {n.node_id for n in nodes_from_ray(ray.nodes()) if n.precision == precision}
    assert all(label[LABEL_PRECISION] == precision for label in labels)
    assert {label[LABEL_NODE_ID] for label in labels} <= group_ids


def test_workers_that_disagree_on_dtype_all_abort_with_the_table(cluster, runs):
    _, run = runs["lying"]
    with pytest.raises(ray.train.TrainingFailedError) as err:
        run.result(timeout=180)
    message = str(err.value)
    assert "PrecisionGroupError" in message and "expected fp16 everywhere" in message
    # Ray reports the first failing rank(s) and shortens long snippets, so which ranks appear and how
    # much of the table survives varies; that every rank raises the same table is checked on the
    # pure function above
    assert "Rank" in message
