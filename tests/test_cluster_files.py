"""The cluster files parse and pass the validation available offline.

Validated: cluster/gcp-p100-a100.yaml goes through Ray's own launcher path, `prepare_config`
(provider defaults merged in) then `validate_config` (the autoscaler's JSON schema, which types node
`labels`), exactly what `ray up` runs before contacting the cloud. Not validated: the GCP side
(project, quotas, images, accelerator availability in the zone).

KubeRay: the RayCluster CRD schema is not installed with Ray and cannot be fetched here, so this
checks the fields the operator requires (apiVersion/kind, headGroupSpec.rayStartParams + template,
each worker group's groupName, replicas bounds, template with containers) and what our scheduler
needs (each group's `labels` parse as Ray labels and match its GPU's precision plan). Not validated:
the full CRD schema and the Kubernetes side (node selector values depend on the cluster's GPU
feature discovery).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from nanochat.precision import DeviceInfo, node_labels, plan_for

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
GPUS = {"Tesla-P100-PCIE-16GB": ("Tesla P100-PCIE-16GB", (6, 0)), "NVIDIA-A100-SXM4-80GB": ("NVIDIA A100-SXM4-80GB", (8, 0)),
        "NVIDIA-A100-SXM4-40GB": ("NVIDIA A100-SXM4-40GB", (8, 0))}


def probe_labels(label_name: str) -> dict[str, str]:
    """What `python -m nanochat.precision --labels` prints on that GPU."""
    name, cap = GPUS[label_name]
    return node_labels(plan_for(DeviceInfo("cuda", name, cap)))


def test_launcher_yaml_passes_rays_validation():
    config = yaml.safe_load((CLUSTER / "gcp-p100-a100.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    for node_type, precision in (("p100", "fp16"), ("a100", "bf16")):
        labels = types[node_type]["labels"]
        assert labels == probe_labels(labels["nanochat/gpu"]) and labels["nanochat/precision"] == precision
    broken = copy.deepcopy(config)
    broken["available_node_types"]["p100"]["labels"] = {"nanochat/precision": 16}  # not a string
    with pytest.raises(Exception, match="16"):
        validate_config(prepare_config(broken))


def test_kuberay_manifest_has_one_labelled_group_per_gpu_generation():
    doc = yaml.safe_load((CLUSTER / "kuberay-p100-a100.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    head = doc["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"p100", "a100"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams values must be strings"
        labels = dict(kv.split("=", 1) for kv in group["rayStartParams"]["labels"].split(","))
        assert labels == probe_labels(labels["nanochat/gpu"])
        spec = group["template"]["spec"]
        assert spec["nodeSelector"]["nvidia.com/gpu.product"] == labels["nanochat/gpu"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["p100"]["rayStartParams"]["labels"].startswith("nanochat/precision=fp16")
    assert groups["a100"]["rayStartParams"]["labels"].startswith("nanochat/precision=bf16")
