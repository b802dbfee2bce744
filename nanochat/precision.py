"""The precision policy: which dtype, loss scaling, compilation and attention kernels a device gets.

Every decision about numeric precision lives here, so a reader finds it in one file:

    device                          capability      auto dtype  GradScaler  compile  attention
    CPU, Apple MPS                  -               float32     no          no       math
    P100, Jetson TX2/Nano           6.0, 6.2, 5.3   float16     yes         no       efficient
    P40/P4/GTX 10xx, Maxwell, ...   6.1, 5.x, 3.x   float32     no          no       efficient
    V100, Xavier, T4/RTX 20xx       7.0, 7.2, 7.5   float16     yes         yes      efficient
    A100, A10, L4, RTX 30/40, H100  >= 8.0          bfloat16    no          yes      flash

Why: bfloat16 needs Ampere (8.0) tensor cores; below that PyTorch would emulate it slowly, so it is
refused. P100 runs fp16 at twice its fp32 rate, but P40/GTX 10xx (6.1) run fp16 at 1/64 of fp32,
so those stay in fp32. fp16's narrow exponent range needs a GradScaler. torch.compile generates
Triton kernels, and Triton needs compute capability 7.0.

Usage:
    python -m nanochat.precision                      # the plan for this machine
    python -m nanochat.precision --json
    python -m nanochat.precision --simulate "Tesla P100-PCIE-16GB:6.0"
    python -m nanochat.precision --simulate cpu --dtype bfloat16
    python -m nanochat.precision --labels             # Ray node labels: what cluster/start_node.sh passes
    NANOCHAT_EMULATE=p100 python -m nanochat.precision   # behave as a 16 GB P100 on any GPU

`plan_for()` is a pure function of a `DeviceInfo`, so the whole table is testable without hardware;
`detect()` is the only place that probes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_CHOICES = ("auto", *DTYPES)
GB = 1024**3


class PrecisionError(ValueError):
    """A dtype request this device cannot honour, or a malformed device description."""


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" | "cpu" | "mps"
    name: str
    capability: tuple[int, int] | None = None
    total_memory: int | None = None  # bytes
    index: int = 0

    @property
    def capability_str(self) -> str | None:
        return None if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"


# -----------------------------------------------------------------------------
# Peak dense FLOP/s per GPU, for MFU. Vendor datasheets; tensor-core rates without sparsity.
# fp16 on Pascal is the plain (non-tensor) rate: Pascal has no tensor cores. fp32 on >= 8.0 is
# the TF32 tensor-core rate, since we let matmuls use TF32 there. More specific names first.
_PEAKS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("b200",), {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    (("h200",), {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12}),
    (("h100", "pcie"), {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (("h100",), {"bf16": 989e12, "fp16": 989e12, "fp32": 494.7e12}),
    (("a100",), {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    (("a10",), {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    (("l4",), {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    (("4090",), {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12}),
    (("3090",), {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    (("v100", "pcie"), {"fp16": 112e12, "fp32": 14e12}),
    (("v100",), {"fp16": 125e12, "fp32": 15.7e12}),
    (("t4",), {"fp16": 65e12, "fp32": 8.1e12}),
    (("p100", "pcie"), {"fp16": 18.7e12, "fp32": 9.3e12}),
    (("p100",), {"fp16": 21.2e12, "fp32": 10.6e12}),  # SXM2
    (("p40",), {"fp16": 0.18e12, "fp32": 11.8e12}),
    (("p4",), {"fp16": 0.09e12, "fp32": 5.5e12}),
    (("1080 ti",), {"fp16": 0.17e12, "fp32": 11.3e12}),
    (("1080",), {"fp16": 0.14e12, "fp32": 8.9e12}),
)

# What NANOCHAT_EMULATE turns a modern GPU into: name, capability and the memory cap.
EMULATED = {
    "p100": ("Tesla P100-PCIE-16GB", (6, 0), 16 * GB),
    "v100": ("Tesla V100-SXM2-16GB", (7, 0), 16 * GB),
    "t4": ("Tesla T4", (7, 5), 15 * GB),
}


# Memory bandwidth in bytes/s (vendor figures): the bound of one-token decoding, which reads every
# weight and the whole KV cache once per step. Matched like _PEAKS, most specific first.
_BANDWIDTH: tuple[tuple[tuple[str, ...], float], ...] = (
    (("b200",), 8.0e12), (("h200",), 4.8e12), (("h100", "pcie"), 2.0e12), (("h100",), 3.35e12),
    (("a100", "40gb"), 1.555e12), (("a100",), 2.039e12), (("a10",), 0.6e12), (("l4",), 0.3e12),
    (("4090",), 1.008e12), (("3090",), 0.936e12), (("v100",), 0.9e12), (("t4",), 0.32e12),
    (("p100",), 0.732e12), (("p40",), 0.346e12), (("1080 ti",), 0.484e12), (("1080",), 0.32e12),
)


def _lookup(table: tuple, name: str):
    lowered = name.lower()
    return next((value for keys, value in table if all(k in lowered for k in keys)), None)


def peak_flops(name: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of the GPU called `name` in `dtype`, or None when unknown."""
    rates = _lookup(_PEAKS, name)
    return rates.get(SHORT[dtype]) if rates else None


def peak_bandwidth(name: str) -> float | None:
    """Memory bandwidth (bytes/s) of the GPU called `name`, or None when unknown."""
    return _lookup(_BANDWIDTH, name)


# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionPlan:
    device: str  # "cuda" | "cpu" | "mps"
    name: str
    capability: str | None
    dtype: str  # "float32" | "bfloat16" | "float16": the autocast compute dtype
    grad_scaler: bool
    compile: bool
    attention: str  # preferred SDPA backend: "flash" | "efficient" | "math"
    muon_dtype: str  # dtype of Muon's Newton-Schulz iteration
    peak_flops: float | None  # for MFU, in the plan's dtype on the device that actually runs
    reason: str
    emulating: str | None = None
    memory_cap: int | None = None  # bytes the process may allocate (emulation); None = all

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def short(self) -> str:
        """bf16 | fp16 | fp32: the label Ray nodes advertise as their precision group."""
        return SHORT[self.dtype]

    def sdpa_backends(self) -> list:
        from torch.nn.attention import SDPBackend

        # cuDNN attention is left out: it builds an execution plan per input shape, and with a KV
        # cache the key length changes at every decoded token (measured on an H100: 76 ms per decode
        # step with it, 16 without, for depth 12)
        order = {
            "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "math": [],
        }[self.attention]
        # MATH stays as the last resort so unusual shapes (e.g. head_dim > 256) still run
        return [*order, SDPBackend.MATH]

    @contextlib.contextmanager
    def compute_context(self) -> Iterator[None]:
        """Autocast to the plan's dtype plus the plan's attention kernels: wrap every forward pass."""
        from torch.nn.attention import sdpa_kernel

        autocast = (
            torch.autocast(device_type=self.device, dtype=self.torch_dtype)
            if self.dtype != "float32"
            else contextlib.nullcontext()
        )
        with autocast, sdpa_kernel(self.sdpa_backends()):
            yield

    def make_grad_scaler(self) -> torch.amp.GradScaler | None:
        """One GradScaler for all optimizers when the plan trains in fp16, else None."""
        return torch.amp.GradScaler(self.device) if self.grad_scaler else None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        cap = f" (sm {self.capability})" if self.capability else ""
        peak = f"{self.peak_flops / 1e12:.1f} TFLOP/s" if self.peak_flops else "unknown"
        lines = [
            f"device      : {self.device} - {self.name}{cap}",
            f"dtype       : {self.dtype}",
            f"grad scaler : {'yes' if self.grad_scaler else 'no'}",
            f"compile     : {'yes' if self.compile else 'no'}",
            f"attention   : SDPA {self.attention}",
            f"muon NS     : {self.muon_dtype}",
            f"peak FLOP/s : {peak}",
        ]
        if self.memory_cap:
            lines.append(f"memory cap  : {self.memory_cap / GB:.0f} GiB")
        lines.append(f"reason      : {self.reason}")
        return "\n".join(lines)


# -----------------------------------------------------------------------------
# The table
def _auto_cuda(cap: tuple[int, int]) -> tuple[str, str]:
    """(dtype, reason) for a CUDA GPU of compute capability `cap` when the user asked for auto."""
    if cap >= (8, 0):
        return "bfloat16", "native bfloat16 tensor cores (compute capability >= 8.0)"
    if cap[0] == 7:
        return "float16", "tensor cores run fp16 but there is no native bfloat16 below 8.0; fp16 needs a GradScaler"
    if cap in ((6, 0), (6, 2), (5, 3)):
        return "float16", "fp16 runs at twice the fp32 rate here but there is no bfloat16; fp16 needs a GradScaler"
    return "float32", "fp16 arithmetic on this GPU runs at a small fraction of fp32 (e.g. 1/64 on sm 6.1)"


def _attention(info: DeviceInfo, dtype: str) -> str:
    if info.type != "cuda":
        return "math"
    if info.capability >= (8, 0) and dtype != "float32":
        return "flash"  # FlashAttention-2 kernels need sm80+ and a 16-bit dtype
    return "efficient"


def plan_for(info: DeviceInfo, requested: str = "auto", emulate: str | None = None) -> PrecisionPlan:
    """The precision plan for `info` and a `--dtype` request. Pure: no hardware is touched."""
    if requested not in DTYPE_CHOICES:
        raise PrecisionError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    real = info
    memory_cap = None
    if emulate:
        info, memory_cap = _emulated(info, emulate)

    if info.type == "cuda":
        auto_dtype, why = _auto_cuda(info.capability)
    else:
        auto_dtype, why = "float32", f"{info.type.upper()} has no fast low-precision training path"
    dtype = auto_dtype if requested == "auto" else requested
    if requested != "auto":
        why = f"requested {requested} (auto would pick {auto_dtype})"
        _check_request(info, dtype)

    cap = info.capability
    native_bf16 = info.type == "cuda" and cap >= (8, 0)
    plan = PrecisionPlan(
        device=info.type,
        name=info.name,
        capability=info.capability_str,
        dtype=dtype,
        grad_scaler=dtype == "float16",
        compile=info.type == "cuda" and cap >= (7, 0),
        attention=_attention(info, dtype),
        muon_dtype="bfloat16" if native_bf16 else "float32",
        # MFU is measured against the chip that actually computes, also while emulating
        peak_flops=peak_flops(real.name, dtype) if real.type == "cuda" else None,
        reason=why,
        memory_cap=memory_cap,
    )
    if emulate:
        # no compile while emulating: Triton would generate kernels for the host GPU, which the
        # emulated one could not run (P100) or would run differently (V100/T4)
        plan = replace(plan, compile=False, emulating=emulate, reason=f"{why}; emulated on {real.name}")
    return plan


def _check_request(info: DeviceInfo, dtype: str) -> None:
    if dtype == "bfloat16" and info.type == "cuda" and info.capability < (8, 0):
        raise PrecisionError(
            f"bfloat16 was requested but {info.name} (compute capability {info.capability_str}) has no native "
            "bfloat16 (it needs 8.0 or newer; below that PyTorch only emulates it, slowly). "
            "Use --dtype float16 (with its GradScaler) or --dtype float32, or --dtype auto."
        )
    if dtype == "float16" and info.type == "mps":
        raise PrecisionError("float16 training is not supported on Apple MPS here; use --dtype float32 or auto.")


def _emulated(info: DeviceInfo, emulate: str) -> tuple[DeviceInfo, int]:
    key = emulate.lower()
    if key not in EMULATED:
        raise PrecisionError(f"NANOCHAT_EMULATE={emulate!r} is not known; choose one of {', '.join(EMULATED)}")
    if info.type != "cuda":
        raise PrecisionError(
            f"NANOCHAT_EMULATE={emulate} needs a CUDA GPU to emulate on, but this device is {info.type}; unset it."
        )
    name, cap, memory = EMULATED[key]
    return DeviceInfo("cuda", name, cap, memory, info.index), memory


# -----------------------------------------------------------------------------
# Probing and applying
def detect(device: str | torch.device | None = None) -> DeviceInfo:
    """Probe the device that will run: CUDA if present, else MPS, else CPU (or the one named)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo("cuda", props.name, (props.major, props.minor), props.total_memory, index)
    if device.type == "mps":
        return DeviceInfo("mps", "Apple MPS")
    return DeviceInfo("cpu", "CPU")


def parse_simulated(spec: str) -> DeviceInfo:
    """'cpu', 'mps' or 'NAME:MAJOR.MINOR' (e.g. 'Tesla P100-PCIE-16GB:6.0') -> DeviceInfo."""
    if spec.lower() in ("cpu", "mps"):
        return DeviceInfo(spec.lower(), "Apple MPS" if spec.lower() == "mps" else "CPU")
    name, sep, cap = spec.rpartition(":")
    try:
        major, minor = (int(x) for x in cap.split("."))
    except ValueError:
        major = None
    if not sep or not name or major is None:
        raise PrecisionError(f"cannot parse --simulate {spec!r}: use cpu, mps or 'GPU NAME:MAJOR.MINOR'")
    return DeviceInfo("cuda", name, (major, minor))


def resolve(requested: str | None = "auto", device: DeviceInfo | str | torch.device | None = None) -> PrecisionPlan:
    """The plan for this process: `--dtype` first, then $NANOCHAT_DTYPE, then auto; honours $NANOCHAT_EMULATE."""
    info = device if isinstance(device, DeviceInfo) else detect(device)
    if requested in (None, "auto"):
        requested = os.environ.get("NANOCHAT_DTYPE") or "auto"
    return plan_for(info, requested, os.environ.get("NANOCHAT_EMULATE") or None)


def apply_process_settings(plan: PrecisionPlan, device: torch.device | str | None = None) -> None:
    """Process-wide knobs the plan implies: TF32 matmuls, and the memory cap of an emulated GPU."""
    if plan.device != "cuda":
        return
    # fp32 matmuls (incl. the master-weight optimizer math) may use TF32 tensor cores where present
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if plan.memory_cap:
        device = torch.device(device or "cuda")
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.memory_cap / total), index)


def node_labels(plan: PrecisionPlan) -> dict[str, str]:
    """The Ray node labels that put this machine in its precision group (see ray_jobs/scheduler.py)."""
    return {"nanochat/precision": plan.short, "nanochat/gpu": _label_value(plan.name)}


def _label_value(text: str) -> str:
    # Ray label values follow Kubernetes syntax: <= 63 chars of [A-Za-z0-9_.-], alphanumeric at both ends
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value) or "unknown"


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """The one `--dtype` flag every training, eval and chat script shares."""
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="compute dtype: auto picks per device (bf16 on sm80+, fp16+GradScaler on P100/V100/T4, "
        "fp32 on CPU and slow-fp16 GPUs); env NANOCHAT_DTYPE is used when this is auto",
    )


# -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the precision plan for this machine (or a simulated one).")
    add_dtype_argument(parser)
    parser.add_argument("--simulate", help="plan for another device: cpu, mps or 'GPU NAME:MAJOR.MINOR'")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--labels", action="store_true", help="print the Ray node labels for the plan, as `ray start --labels` takes them"
    )
    args = parser.parse_args(argv)
    try:
        device = parse_simulated(args.simulate) if args.simulate else None
        plan = resolve(args.dtype, device)
    except PrecisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.labels:
        print(",".join(f"{key}={value}" for key, value in node_labels(plan).items()))
    else:
        print(json.dumps(plan.to_dict()) if args.json else plan.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
