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
Triton kernels, and Triton needs compute capability 7.0. A CPU takes --dtype bfloat16 (autocast supports
it) with a one-line note of what it costs there: most CPUs emulate its matmuls, tens of times slower.

Usage:
    python -m nanochat.precision                      # the plan for this machine
    python -m nanochat.precision --json
    python -m nanochat.precision --simulate "Tesla P100-PCIE-16GB:6.0"
    python -m nanochat.precision --simulate cpu --dtype bfloat16
    python -m nanochat.precision --labels             # Ray node labels: what cluster/start_node.sh passes
    NANOCHAT_EMULATE=p100 python -m nanochat.precision   # behave as a 16 GB P100 on any GPU

`plan_for()` is a pure function of a `DeviceInfo`, so the whole table is testable without hardware;
`detect()` is the only place that probes. `GPUS` is the one table of GPU facts (peak FLOP/s,
bandwidth, memory, emulation presets, Ray accelerator types) that MFU, the decode bound, the
scheduler and Tune read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch

from nanochat.config import DTYPE_CHOICES, option, parse_config
from nanochat.errors import UsageError

DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}
GB = 1024**3


class PrecisionError(UsageError, ValueError):
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
# GPU facts, one row per family. A row matches a device name containing all its fragments
# (lowercase); a lookup takes the first matching row that has the fact (None = ask the next row),
# so more specific rows come first. Peak dense FLOP/s (for MFU) are vendor figures for tensor cores
# without sparsity; fp16 on Pascal is the plain rate (no tensor cores); fp32 on >= 8.0 is the TF32
# rate, since matmuls may use TF32 there. Bandwidth (bytes/s) bounds one-token decoding, which
# reads every weight and the whole KV cache once per step. GB: memory, for names that do not carry
# it ("NVIDIA L4"; "Tesla P100-PCIE-16GB" does). An unlabelled Ray node of one of the family's
# accelerator types is taken to be `device`; NANOCHAT_EMULATE=<emulate> makes any GPU act as
# `device`, capped to its memory.
@dataclass(frozen=True)
class GPU:
    match: tuple[str, ...]
    capability: tuple[int, int]
    bf16: float | None
    fp16: float | None
    fp32: float | None
    bandwidth: float | None
    memory_gb: int | None = None
    ray_types: tuple[str, ...] = ()
    device: str = ""
    emulate: str = ""


GPUS = (
    #   fragments          sm        bf16       fp16       fp32       bytes/s    GB     Ray types                  device                         emulate
    GPU(("b200",),         (10, 0),  2250e12,   2250e12,   1100e12,   8.0e12,    180,   ("B200",),                 "NVIDIA B200"),
    GPU(("h200",),         (9, 0),   989e12,    989e12,    494.7e12,  4.8e12,    141,   ("H200",),                 "NVIDIA H200"),
    GPU(("h20",),          (9, 0),   None,      None,      None,      None,      96,    ("H20",),                  "NVIDIA H20"),
    GPU(("h100", "pcie"),  (9, 0),   756e12,    756e12,    378e12,    2.0e12),
    GPU(("h100",),         (9, 0),   989e12,    989e12,    494.7e12,  3.35e12,   None,  ("H100",),                 "NVIDIA H100 80GB HBM3"),
    GPU(("a100", "40gb"),  (8, 0),   None,      None,      None,      1.555e12,  None,  ("A100-40G",),             "NVIDIA A100-SXM4-40GB"),
    GPU(("a100",),         (8, 0),   312e12,    312e12,    156e12,    2.039e12,  None,  ("A100", "A100-80G"),      "NVIDIA A100-SXM4-80GB"),
    GPU(("a10g",),         (8, 6),   None,      None,      None,      None,      None,  ("A10G",),                 "NVIDIA A10G"),
    GPU(("a10",),          (8, 6),   125e12,    125e12,    62.5e12,   0.6e12,    24,    ("A10",),                  "NVIDIA A10"),
    GPU(("l40s",),         (8, 9),   None,      None,      None,      None,      48,    ("L40S",),                 "NVIDIA L40S"),
    GPU(("l4",),           (8, 9),   121e12,    121e12,    60e12,     0.3e12,    24,    ("L4",),                   "NVIDIA L4"),
    GPU(("4090",),         (8, 9),   165.2e12,  165.2e12,  82.6e12,   1.008e12,  24,    ("GeForce-RTX-4090",),     "NVIDIA GeForce RTX 4090"),
    GPU(("3090",),         (8, 6),   71e12,     71e12,     35.6e12,   0.936e12,  24,    ("GeForce-RTX-3090",),     "NVIDIA GeForce RTX 3090"),
    GPU(("v100", "pcie"),  (7, 0),   None,      112e12,    14e12,     0.9e12),
    GPU(("v100",),         (7, 0),   None,      125e12,    15.7e12,   0.9e12,    None,  ("V100",),                 "Tesla V100-SXM2-16GB",        "v100"),
    GPU(("t4",),           (7, 5),   None,      65e12,     8.1e12,    0.32e12,   15,    ("T4",),                   "Tesla T4",                    "t4"),
    GPU(("p100", "pcie"),  (6, 0),   None,      18.7e12,   9.3e12,    0.732e12,  None,  ("P100",),                 "Tesla P100-PCIE-16GB",        "p100"),
    GPU(("p100",),         (6, 0),   None,      21.2e12,   10.6e12,   0.732e12),  # SXM2
    GPU(("p40",),          (6, 1),   None,      0.18e12,   11.8e12,   0.346e12,  24,    ("P40",),                  "Tesla P40"),
    GPU(("p4",),           (6, 1),   None,      0.09e12,   5.5e12,    None,      8,     ("P4",),                   "Tesla P4"),
    GPU(("k80",),          (3, 7),   None,      None,      None,      None,      12,    ("K80",),                  "Tesla K80"),
    GPU(("1080 ti",),      (6, 1),   None,      0.17e12,   11.3e12,   0.484e12,  11,    ("GeForce-GTX-1080-Ti",),  "NVIDIA GeForce GTX 1080 Ti"),
    GPU(("1080",),         (6, 1),   None,      0.14e12,   8.9e12,    0.32e12,   8,     ("GeForce-GTX-1080",),     "NVIDIA GeForce GTX 1080"),
)
# Ray accelerator type -> (device name, compute capability): what the scheduler assumes of an unlabelled node
ACCELERATOR_TYPES = {ray_type: (gpu.device, gpu.capability) for gpu in GPUS for ray_type in gpu.ray_types}
EMULATED = {gpu.emulate: gpu for gpu in GPUS if gpu.emulate}  # NANOCHAT_EMULATE presets


def _gpu_fact(lowered: str, fact: str):
    rows = (gpu for gpu in GPUS if all(k in lowered for k in gpu.match) and getattr(gpu, fact) is not None)
    return next((getattr(gpu, fact) for gpu in rows), None)


def peak_flops(name: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of the GPU called `name` in `dtype`, or None when unknown."""
    return _gpu_fact(name.lower(), precision_label(dtype))


def peak_bandwidth(name: str) -> float | None:
    """Memory bandwidth (bytes/s) of the GPU called `name`, or None when unknown."""
    return _gpu_fact(name.lower(), "bandwidth")


def gpu_memory(name: str) -> int | None:
    """Memory (bytes) of the GPU called `name`: the size its name carries, else the table's; None when unknown."""
    lowered = name.lower().replace("-", " ")
    found = re.search(r"(\d+)\s*gb", lowered)
    size = int(found.group(1)) if found else _gpu_fact(lowered, "memory_gb")
    return None if size is None else size * GB


def precision_label(dtype: str) -> str:
    """bf16 | fp16 | fp32 for a dtype name: the precision group Ray nodes advertise."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


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
        return precision_label(self.dtype)

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
    gpu = EMULATED[key]
    memory = gpu_memory(gpu.device)
    return DeviceInfo("cuda", gpu.device, gpu.capability, memory, info.index), memory


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
    """The plan for this process: `--dtype` first, then $NANOCHAT_DTYPE, then auto; honours $NANOCHAT_EMULATE.
    bfloat16 on a CPU is accepted with a one-line note on stderr (once per process) saying what it costs."""
    info = device if isinstance(device, DeviceInfo) else detect(device)
    if requested in (None, "auto"):
        requested = os.environ.get("NANOCHAT_DTYPE") or "auto"
    plan = plan_for(info, requested, os.environ.get("NANOCHAT_EMULATE") or None)
    if plan.device == "cpu" and plan.dtype == "bfloat16":
        note_cpu_bfloat16()
    return plan


def cpu_bfloat16_slowdown(size: int = 128, seconds: float = 0.01) -> float:
    """How many times longer a size x size matmul takes in bfloat16 than in float32 on one core of this CPU
    (the fastest of the calls made in `seconds` each, after a warm-up)."""

    def fastest(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        a @ a  # warm-up: the first call picks and prepares the kernel
        best, end = math.inf, time.perf_counter() + seconds
        while best == math.inf or time.perf_counter() < end:
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        return best

    # one thread: on a busy machine a multi-threaded float32 matmul would time the wait for its threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fastest(torch.bfloat16) / fastest(torch.float32)
    finally:
        torch.set_num_threads(threads)


def cpu_bfloat16_note(slowdown: float) -> str:
    """The note for bfloat16 on a CPU whose bfloat16 matmuls take `slowdown` times as long as float32 ones.
    CPUs without bfloat16 instructions (AVX512-BF16, AMX) convert every element: tens of times slower."""
    if slowdown >= 1.5:
        return (f"note: bfloat16 on this CPU runs its matmuls emulated, {slowdown:.0f}x slower than float32 ones here "
                "(timed now); --dtype float32, what auto picks on a CPU, is faster")
    return f"note: bfloat16 on this CPU: its matmuls take {slowdown:.1f}x the time of float32 ones here (timed now)"


@functools.cache
def note_cpu_bfloat16() -> None:
    """The note on stderr, once per process however many times a plan is resolved."""
    print(cpu_bfloat16_note(cpu_bfloat16_slowdown()), file=sys.stderr, flush=True)


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


MIXED = "mixed"  # the precision label of a node whose GPUs disagree: no precision group takes it


def node_labels(plan: PrecisionPlan) -> dict[str, str]:
    """The Ray node labels that put a machine of one kind of device in its precision group (ray_jobs/scheduler.py)."""
    return {"nanochat/precision": plan.short, "nanochat/gpu": _label_value(plan.name)}


def detect_all() -> list[DeviceInfo]:
    """Every device a Ray node offers its workers: each visible CUDA GPU, else the one device detect() finds."""
    if torch.cuda.is_available():
        return [detect(f"cuda:{index}") for index in range(torch.cuda.device_count())]
    return [detect()]


def machine_labels(devices: list[DeviceInfo], requested: str | None = "auto") -> dict[str, str]:
    """The node labels of a machine with these devices: those of its plan when every device gets the same dtype,
    else precision `mixed`, which no group takes: a worker on the odd GPU would train in another dtype than its
    group (the all-gathered check would abort the run once it started)."""
    plans = [resolve(requested, device) for device in devices]
    if len({plan.short for plan in plans}) == 1:
        return node_labels(plans[0])
    kinds = "_".join(sorted({f"{plan.name}={plan.short}" for plan in plans}))
    return {"nanochat/precision": MIXED, "nanochat/gpu": _label_value(kinds)}


def mixed_note(labels: dict[str, str]) -> str | None:
    """What to do about a machine labelled `mixed`; None for any other."""
    if labels.get("nanochat/precision") != MIXED:
        return None
    return (f"this machine's GPUs need different dtypes ({labels['nanochat/gpu']}), so its node is labelled "
            f"nanochat/precision={MIXED} and no precision group schedules on it: start one Ray node per kind of GPU "
            "(CUDA_VISIBLE_DEVICES=<ids of one kind> cluster/start_node.sh ... --num-gpus <count>), or force one "
            "dtype every GPU runs with NANOCHAT_DTYPE")


def _label_value(text: str) -> str:
    # Ray label values follow Kubernetes syntax: <= 63 chars of [A-Za-z0-9_.-], alphanumeric at both ends
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value) or "unknown"


# -----------------------------------------------------------------------------
@dataclass
class PrecisionOptions:
    """Print the precision plan for this machine (or a simulated one)."""

    dtype: str = option("auto", "compute dtype: auto picks per device (bf16 on sm80+, fp16+GradScaler on P100/V100/T4, "
                        "fp32 on CPU and slow-fp16 GPUs); env NANOCHAT_DTYPE is used when this is auto",
                        choices=DTYPE_CHOICES)
    simulate: str = option("", "plan for another device: cpu, mps or 'GPU NAME:MAJOR.MINOR' (--labels: a comma-separated "
                           "list, one per GPU of the machine)")
    json: bool = option(False, "print one JSON object")
    labels: bool = option(False, "print the Ray node labels for the plan, as `ray start --labels` takes them")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(PrecisionOptions, argv, description=PrecisionOptions.__doc__)
    try:
        devices = [parse_simulated(spec) for spec in args.simulate.split(",")] if args.simulate else detect_all()
        plan = resolve(args.dtype, devices[0])
        labels = machine_labels(devices, args.dtype)
    except PrecisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.labels:
        note = mixed_note(labels)
        if note:
            print(f"warning: {note}", file=sys.stderr)
        print(",".join(f"{key}={value}" for key, value in labels.items()))
    else:
        print(json.dumps(plan.to_dict()) if args.json else plan.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
