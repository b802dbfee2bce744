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

Locks: requirements.lock and requirements-dev.lock must pin, with hashes, every dependency
pyproject.toml declares, inside its declared range, for every Python the project serves; torch is
pinned by version in requirements-torch.txt. CI, the README, docs/cluster.md and the cluster files
must install from them, and cluster/start_node.sh refuses a node whose Ray or torch is not the locked
one. Not checked here: that a lock holds every transitive dependency (that needs each package's
metadata: `pip check` after an install from the lock shows it, and CI installs from it).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from nanochat.precision import DeviceInfo, node_labels, plan_for

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
REPO = CLUSTER.parent
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
    for node_type, precision in (("p100", "fp16"), ("p100-spot", "fp16"), ("a100", "bf16")):
        labels = types[node_type]["labels"]
        probed = probe_labels(labels["nanochat/gpu"])
        assert labels.items() >= probed.items() and labels["nanochat/precision"] == precision
    # the spot type differs from the on-demand one by its scheduling and a label (the autoscaler-aware check
    # tells the types' nodes apart by their labels), nothing else
    spot, on_demand = types["p100-spot"], types["p100"]
    assert {"preemptible": True} in spot["node_config"]["scheduling"]
    assert (spot["labels"]["nanochat/capacity"], on_demand["labels"]["nanochat/capacity"]) == ("spot", "on-demand")
    assert {**spot["node_config"], "scheduling": None} == {**on_demand["node_config"], "scheduling": None}
    # the dashboard serves the Jobs API, which runs any command: loopback only, reached by port-forward
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["p100"]["labels"] = {"nanochat/precision": 16}  # not a string
    with pytest.raises(Exception, match="16"):
        validate_config(prepare_config(broken))


def test_kuberay_manifest_has_one_labelled_group_per_gpu_generation():
    doc = yaml.safe_load((CLUSTER / "kuberay-p100-a100.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    head = doc["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
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


# -----------------------------------------------------------------------------
# Locks: what every machine installs
# where the locks must hold: CI and CPU machines, the GPU machines, the GCP image of
# gcp-p100-a100.yaml (Python 3.10), and a Mac
ENVIRONMENTS = {
    "linux-py3.10": ("3.10.14", "linux", "Linux", "x86_64"),
    "linux-py3.11": ("3.11.7", "linux", "Linux", "x86_64"),
    "linux-py3.12": ("3.12.8", "linux", "Linux", "x86_64"),
    "macos-py3.12": ("3.12.8", "darwin", "Darwin", "arm64"),
}
LOCKS = {"requirements.lock": [], "requirements-dev.lock": ["dev"]}  # lock -> the extras it holds
# what the GPU wheels of torch bring and pin themselves: never in a lock (requirements-torch.txt)
TORCH_ONLY = re.compile(r"^(torch|nvidia-.*|cuda-.*)$")


def marker_env(name: str) -> dict[str, str]:
    version, sys_platform, system, machine = ENVIRONMENTS[name]
    return {**default_environment(), "python_full_version": version, "python_version": version.rsplit(".", 1)[0],
            "sys_platform": sys_platform, "platform_system": system, "platform_machine": machine,
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def read_lock(name: str) -> list[tuple[Requirement, list[str]]]:
    """Each entry of a lock: its requirement (name==version ; marker) and its hashes."""
    text = (REPO / name).read_text().replace("\\\n", " ")
    entries = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            hashes = re.findall(r"--hash=(\S+)", line)
            entries.append((Requirement(re.sub(r"--hash=\S+", "", line).strip()), hashes))
    return entries


def pins_for(entries: list[tuple[Requirement, list[str]]], env: str) -> dict[str, str]:
    """name -> pinned version, for the entries whose marker holds in `env` (each name at most once)."""
    pins: dict[str, str] = {}
    for req, _ in entries:
        if req.marker is None or req.marker.evaluate(marker_env(env)):
            name = canonicalize_name(req.name)
            assert name not in pins, f"{name} is pinned twice for {env}"
            pins[name] = str(req.specifier).removeprefix("==")
    return pins


def torch_pin() -> str:
    lines = [line for line in (REPO / "requirements-torch.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, f"requirements-torch.txt must hold one line, torch==VERSION: {lines}"
    req = Requirement(lines[0])
    assert req.name == "torch" and str(req.specifier).startswith("==") and len(req.specifier) == 1
    return str(req.specifier).removeprefix("==")


def test_locks_pin_every_declared_dependency_inside_its_range_for_every_python():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for lock, extras in LOCKS.items():
        declared = [Requirement(r) for r in project["dependencies"]]
        declared += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
        entries = read_lock(lock)
        for env in ENVIRONMENTS:
            pins = pins_for(entries, env) | {"torch": torch_pin()}
            for req in declared:
                if req.marker is not None and not req.marker.evaluate(marker_env(env)):
                    continue
                name = canonicalize_name(req.name)
                assert name in pins, f"pyproject.toml declares {req} but {lock} pins no {name} for {env}: run cluster/lock.sh"
                source = "requirements-torch.txt" if name == "torch" else lock
                assert req.specifier.contains(pins[name], prereleases=True), (
                    f"{source} pins {name}=={pins[name]} for {env}, outside pyproject.toml's {req}: run cluster/lock.sh")


def test_lock_entries_are_exact_hashed_and_the_two_locks_agree():
    locks = {lock: read_lock(lock) for lock in LOCKS}
    for lock, entries in locks.items():
        for req, hashes in entries:
            assert re.fullmatch(r"==[\w.]+", str(req.specifier)), f"{lock}: {req} is not one exact version"
            assert hashes and all(h.startswith("sha256:") for h in hashes), f"{lock}: {req} has no sha256 hash"
            assert not TORCH_ONLY.match(canonicalize_name(req.name)), f"{lock} holds {req.name}: torch's own (requirements-torch.txt)"
    # the run-time lock is the dev lock less the dev extra: same versions, and no Triton (torch's GPU wheels bring theirs)
    for env in ENVIRONMENTS:
        run, dev = pins_for(locks["requirements.lock"], env), pins_for(locks["requirements-dev.lock"], env)
        assert {name: dev.get(name) for name in run} == run, f"the locks disagree for {env}"
        assert "triton" not in run and ("triton" in dev) == env.startswith("linux")


def install_commands(name: str) -> list[str]:
    """Every `pip install ...` a reader or a machine runs from this file (code, not prose)."""
    text = (REPO / name).read_text()
    if name.endswith(".md"):  # fenced code only
        text = "\n".join(text.split("```")[1::2])
    lines = text.splitlines()
    if name.endswith(".yaml"):  # the KubeRay image's Dockerfile lines live in a comment
        lines = [line.strip().removeprefix("#").strip().removeprefix("RUN").rstrip("\\") for line in lines]
    else:  # shell comments are prose
        lines = [line for line in lines if not line.strip().startswith("#")]
    commands = [part.strip() for line in lines for part in line.split("&&")]
    return [command.split("#")[0].strip() for command in commands if "pip install" in command]


def test_ci_readme_docs_and_cluster_files_install_from_the_locks():
    files = [".ci/run", "README.md", "docs/cluster.md", "cluster/gcp-p100-a100.yaml", "cluster/kuberay-p100-a100.yaml"]
    for name in files:
        commands = install_commands(name)
        assert any("-r requirements" in c and ".lock" in c for c in commands), f"{name} installs no lock"
        for command in commands:
            args = command.split()[command.split().index("install") + 1:]
            lock = re.fullmatch(r"requirements(-dev)?\.lock", args[args.index("-r") + 1]) if "-r" in args else None
            if lock:  # the lock is complete: --no-deps spares pip's hash-checking mode the extras it mishandles
                assert {"--require-hashes", "--no-deps"} <= set(args), f"{name}: `{command}` needs --require-hashes --no-deps"
            elif "requirements-torch.txt" in args:
                pass  # torch by version, from the index of the build the machine needs
            else:  # nothing resolved: only the project itself, or one exact version
                targets = [a for a in args if not a.startswith("-")]
                assert "--no-deps" in args and all(t == "." or "==" in t for t in targets), (
                    f"{name}: `{command}` installs unpinned dependencies; install from requirements.lock")
    # CI runs the README's install lines, word for word
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("pip install")]
    assert ci and all(line in (REPO / "README.md").read_text().splitlines() for line in ci)
    # every GPU node of the launcher gets the CUDA 12.6 build (sm_60 for the P100), the same on each
    setup = " ".join(yaml.safe_load((CLUSTER / "gcp-p100-a100.yaml").read_text())["setup_commands"])
    assert "-r requirements-torch.txt --index-url https://download.pytorch.org/whl/cu126" in setup, setup
    ray_pins = {v for env in ENVIRONMENTS for k, v in pins_for(read_lock("requirements.lock"), env).items() if k == "ray"}
    kuberay = yaml.safe_load((CLUSTER / "kuberay-p100-a100.yaml").read_text())
    assert ray_pins == {kuberay["spec"]["rayVersion"]}, f"KubeRay's rayVersion is not the locked Ray {ray_pins}"


def test_start_node_refuses_a_node_whose_ray_or_torch_is_not_the_locked_one(tmp_path):
    """A copy of the repository whose lock pins another Ray: this machine's Ray no longer matches (the
    start with matching versions is tests/test_scheduler.py's start_node test)."""
    (tmp_path / "cluster").mkdir()
    shutil.copy(CLUSTER / "start_node.sh", tmp_path / "cluster")
    shutil.copy(REPO / "requirements-torch.txt", tmp_path)
    (tmp_path / "nanochat").symlink_to(REPO / "nanochat")
    lock = (REPO / "requirements.lock").read_text()
    assert f"\nray=={ray.__version__} " in lock, f"this environment's Ray {ray.__version__} is not the locked one"
    (tmp_path / "requirements.lock").write_text(lock.replace(f"\nray=={ray.__version__} ", "\nray==2.0.0 "))
    env = {**os.environ, "NANOCHAT_DRY_RUN": "1", "NANOCHAT_DTYPE": "float32"}
    run = [tmp_path / "cluster" / "start_node.sh", "head"]
    refused = subprocess.run(run, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "the locks pin ray 2.0.0" in refused.stderr, refused.stderr
    assert f"this node has ray {ray.__version__}" in refused.stderr and "+ ray start" not in refused.stdout
