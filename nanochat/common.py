"""Small helpers shared by every script: base directory, seeding, the dtype one-liner, JSON results."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch

from nanochat.precision import PrecisionPlan, apply_process_settings, resolve


def autodetect_dtype(device_type: str = "cuda") -> torch.dtype:
    """The compute dtype the precision policy picks for this machine's `device_type`.

    python -c "from nanochat.common import autodetect_dtype; print(autodetect_dtype('cuda'))"
    prints torch.float16 on a P100, torch.bfloat16 on an A100/H100.
    """
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("autodetect_dtype('cuda'): no CUDA GPU is visible; use 'cpu' or check CUDA_VISIBLE_DEVICES")
    return resolve("auto", device_type).torch_dtype


def base_dir() -> Path:
    """Where tokenizers, data and runs live by default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR", Path.home() / ".cache" / "nanochat"))


def write_json(path: str | Path, result: dict) -> None:
    """A script's --out: write `result` as JSON to `path` (nothing when the path is empty)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2))


def save_result(result: dict, out: str, default: Path) -> Path:
    """An evaluation's JSON record: to `out` (a script's --out), else to `default` next to the run."""
    path = Path(out) if out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_process(cfg, device: torch.device | None = None) -> tuple[torch.device, PrecisionPlan]:
    """Every script's first step: the device (cfg.device or the best available), its precision plan
    for cfg.dtype applied to this process, and the seed. `cfg` is any CommonConfig."""
    device = device or torch.device(cfg.device or default_device())
    plan = resolve(cfg.dtype, device)
    apply_process_settings(plan, device)
    seed_everything(cfg.seed)
    return device, plan


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now (the OS picks it; it may be taken again before use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the process group of `proc` (started with start_new_session=True, so its children go
    too), then SIGKILL if it has not ended within `grace_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
