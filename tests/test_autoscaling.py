"""The group check on a cluster that can grow: a fake autoscaling cluster on this machine (Ray's fake
multi-node provider under the v2 autoscaler, what `ray up` runs), whose head has no CPUs and whose only
node type is a labelled fp16 "GPU" node, as in cluster/gcp-p100-a100.yaml.

Run alone (it starts its own head with `ray start --block` and stops only that one, by process group):
    python -m pytest -q tests/test_autoscaling.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE

from nanochat.config import parse_config
from ray_jobs.scheduler import AUTOSCALER_CONFIG_ENV, LABEL_PRECISION, PrecisionGroupError, plan_cluster
from ray_jobs.serve import ServeConfig, check_capacity
from tests.conftest import free_port

P100_TYPE = {"resources": {"CPU": 2, "GPU": 1}, "labels": {LABEL_PRECISION: "fp16", "nanochat/gpu": "Tesla-P100-PCIE-16GB"},
             "node_config": {}, "min_workers": 0, "max_workers": 1}


def autoscaler_config(gcs_address: str) -> dict:
    # the fake provider's own defaults file is not shipped in Ray's wheel: load it as an external provider
    provider = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
    return {
        "cluster_name": "fake", "max_workers": 1, "idle_timeout_minutes": 5, "upscaling_speed": 1,
        "provider": {"type": "external", "module": provider, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"}, "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": {FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 "p100": P100_TYPE},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autoscaling")
    port = free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    config = tmp / "autoscaler.json"
    config.write_text(json.dumps(autoscaler_config(address)))
    saved = os.environ.get(AUTOSCALER_CONFIG_ENV)
    os.environ[AUTOSCALER_CONFIG_ENV] = str(config)
    # `ray start` turns token auth on when ~/.ray/auth_token exists (a local ray.init makes one), and this
    # process's Ray, imported already, would not send the token
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
           "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=0", f"--temp-dir={tmp}",
         "--include-dashboard=false", "--disable-usage-stats", "--dashboard-agent-listen-port=0",
         f"--ray-client-server-port={free_port()}", f"--autoscaling-config={config}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 40
        while not (tmp / "ray_current_cluster").exists():
            assert head.poll() is None and time.monotonic() < deadline, "the fake autoscaling head did not start"
            time.sleep(0.5)
        ray.init(address=address, logging_level="ERROR")
        yield address
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGKILL)  # the head, its autoscaler and the nodes the autoscaler started
        head.wait(timeout=30)
        if saved is None:
            os.environ.pop(AUTOSCALER_CONFIG_ENV)
        else:
            os.environ[AUTOSCALER_CONFIG_ENV] = saved


def test_a_request_no_node_type_can_serve_is_refused_at_once_with_both_tables(cluster):
    start = time.monotonic()
    with pytest.raises(PrecisionGroupError) as refused:
        plan_cluster("bf16", 1, wait_for_nodes_s=60)
    assert time.monotonic() - start < 5
    assert "Not even the nodes the autoscaler can add" in refused.value.message
    assert "the cluster has:" in refused.value.details and "the autoscaler can add:" in refused.value.details
    assert "Tesla-P100-PCIE-16GB" in refused.value.details  # the node type that could come, and its group
    with pytest.raises(PrecisionGroupError, match="Not even"):
        plan_cluster("auto", 2, wait_for_nodes_s=60)  # one p100 at most


def test_serve_counts_the_nodes_the_autoscaler_can_add(cluster):
    def check(*argv: str) -> None:
        check_capacity(parse_config(ServeConfig, ["--checkpoint", "unused", "--num-gpus", "1", *argv]), ray.nodes())

    assert not [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    check("--precision", "any")  # Serve's pending replica makes the autoscaler add the p100 node
    start = time.monotonic()
    with pytest.raises(PrecisionGroupError, match="Not even"):
        check("--precision", "bf16")
    assert time.monotonic() - start < 5
    with pytest.raises(PrecisionGroupError, match="holds 1 of the 2 replica"):
        check("--precision", "any", "--replicas", "2")


def test_a_job_on_a_cluster_without_workers_waits_for_the_autoscalers_labelled_node(cluster, capsys):
    assert not [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    with pytest.raises(PrecisionGroupError):
        plan_cluster("auto", 1)  # no wait asked: refused on what is alive now, as on a local cluster
    start = time.monotonic()
    group, scaling = plan_cluster("auto", 1, wait_for_nodes_s=45)
    assert group.precision == "fp16" and group.gpus == 1 and {n.gpu for n in group.nodes} == {"Tesla-P100-PCIE-16GB"}
    assert scaling.label_selector == {LABEL_PRECISION: "fp16"} and scaling.use_gpu
    assert "waiting up to 45 s" in capsys.readouterr().out
    assert time.monotonic() - start < 45
    # the standing request was withdrawn: the node may scale down again when the job is done
    from ray.autoscaler.v2.sdk import get_cluster_status
    assert not [d for d in get_cluster_status(cluster).resource_demands.cluster_constraint_demand if d.bundles_by_count]
