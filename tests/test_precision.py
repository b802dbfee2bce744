"""The precision table of DESIGN.md section 2, through the real CLI (`--simulate`), plus override
and emulation rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from nanochat import precision
from nanochat.precision import DeviceInfo, PrecisionError, plan_for


def cli(capsys, *args: str) -> tuple[int, dict | str]:
    code = precision.main([*args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


# (simulate spec, dtype, grad_scaler, compile, attention)
TABLE = [
    ("cpu", "float32", False, False, "math"),
    ("mps", "float32", False, False, "math"),
    ("Tesla P100-PCIE-16GB:6.0", "float16", True, False, "efficient"),
    ("Tesla P100-SXM2-16GB:6.0", "float16", True, False, "efficient"),
    ("NVIDIA Jetson TX2:6.2", "float16", True, False, "efficient"),
    ("NVIDIA Jetson Nano:5.3", "float16", True, False, "efficient"),
    ("Tesla P40:6.1", "float32", False, False, "efficient"),
    ("NVIDIA GeForce GTX 1080 Ti:6.1", "float32", False, False, "efficient"),
    ("Tesla M40:5.2", "float32", False, False, "efficient"),
    ("Tesla K80:3.7", "float32", False, False, "efficient"),
    ("Tesla V100-SXM2-32GB:7.0", "float16", True, True, "efficient"),
    ("Xavier:7.2", "float16", True, True, "efficient"),
    ("Tesla T4:7.5", "float16", True, True, "efficient"),
    ("NVIDIA GeForce RTX 2080 Ti:7.5", "float16", True, True, "efficient"),
    ("NVIDIA A100-SXM4-80GB:8.0", "bfloat16", False, True, "flash"),
    ("NVIDIA A10:8.6", "bfloat16", False, True, "flash"),
    ("NVIDIA L4:8.9", "bfloat16", False, True, "flash"),
    ("NVIDIA GeForce RTX 4090:8.9", "bfloat16", False, True, "flash"),
    ("NVIDIA H100 80GB HBM3:9.0", "bfloat16", False, True, "flash"),
    ("NVIDIA B200:10.0", "bfloat16", False, True, "flash"),
]


@pytest.mark.parametrize("spec,dtype,scaler,compile_,attention", TABLE)
def test_table_row(capsys, monkeypatch, spec, dtype, scaler, compile_, attention):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.delenv("NANOCHAT_EMULATE", raising=False)
    code, plan = cli(capsys, "--simulate", spec)
    assert code == 0
    assert (plan["dtype"], plan["grad_scaler"], plan["compile"], plan["attention"]) == (dtype, scaler, compile_, attention)
    assert set(plan) >= {"device", "name", "capability", "dtype", "grad_scaler", "compile", "attention", "peak_flops", "reason"}
    assert plan["reason"]
    # Newton-Schulz runs in bf16 only where bf16 is native
    assert plan["muon_dtype"] == ("bfloat16" if dtype == "bfloat16" else "float32")


@pytest.mark.parametrize(
    "spec,peak",
    [
        ("Tesla P100-PCIE-16GB:6.0", 18.7e12),  # fp16 non-tensor rate
        ("Tesla P100-SXM2-16GB:6.0", 21.2e12),
        ("Tesla P40:6.1", 11.8e12),  # fp32
        ("Tesla V100-SXM2-16GB:7.0", 125e12),  # fp16 tensor cores
        ("Tesla T4:7.5", 65e12),
        ("NVIDIA A10:8.6", 125e12),
        ("NVIDIA A100-SXM4-40GB:8.0", 312e12),
        ("NVIDIA L4:8.9", 121e12),
        ("NVIDIA GeForce RTX 3090:8.6", 71e12),
        ("NVIDIA GeForce RTX 4090:8.9", 165.2e12),
        ("NVIDIA H100 80GB HBM3:9.0", 989e12),
        ("NVIDIA H100 PCIe:9.0", 756e12),
        ("NVIDIA H200:9.0", 989e12),
        ("NVIDIA B200:10.0", 2250e12),
    ],
)
def test_peak_flops_in_plan_dtype(capsys, monkeypatch, spec, peak):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert cli(capsys, "--simulate", spec)[1]["peak_flops"] == peak


def test_cpu_has_no_peak_and_unknown_gpu_is_none():
    assert plan_for(DeviceInfo("cpu", "CPU")).peak_flops is None
    assert plan_for(DeviceInfo("cuda", "Mystery GPU", (8, 0))).peak_flops is None


def test_bf16_below_sm80_is_refused_naming_the_gpu(capsys):
    code, err = cli(capsys, "--simulate", "Tesla P100-PCIE-16GB:6.0", "--dtype", "bfloat16")
    assert code == 2
    assert "Tesla P100-PCIE-16GB" in err and "float16" in err and "float32" in err
    with pytest.raises(PrecisionError, match="Tesla T4"):
        plan_for(DeviceInfo("cuda", "Tesla T4", (7, 5)), "bfloat16")


def test_explicit_overrides_apply_exactly():
    h100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
    fp16 = plan_for(h100, "float16")
    assert (fp16.dtype, fp16.grad_scaler, fp16.compile) == ("float16", True, True)
    fp32 = plan_for(h100, "float32")
    assert (fp32.dtype, fp32.grad_scaler, fp32.attention, fp32.peak_flops) == ("float32", False, "efficient", 494.7e12)
    p100_fp32 = plan_for(DeviceInfo("cuda", "Tesla P100-PCIE-16GB", (6, 0)), "float32")
    assert (p100_fp32.dtype, p100_fp32.grad_scaler) == ("float32", False)
    assert plan_for(DeviceInfo("cpu", "CPU"), "bfloat16").dtype == "bfloat16"  # CPU autocast supports bf16
    with pytest.raises(PrecisionError, match="unknown dtype"):
        plan_for(h100, "float8")


def test_bfloat16_on_a_cpu_is_accepted_with_one_note_of_its_cost(capsys, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.delenv("NANOCHAT_EMULATE", raising=False)
    precision.note_cpu_bfloat16.cache_clear()  # as in a fresh process
    assert precision.main(["--simulate", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    precision.resolve("bfloat16", "cpu")
    out, err = capsys.readouterr()
    assert json.loads(out)["dtype"] == "bfloat16"  # stdout stays one JSON object
    note = err.splitlines()
    assert len(note) == 1, note  # once per process
    assert re.fullmatch(r"note: bfloat16 on this CPU.* [\d.]+x .*\(timed now\).*", note[0]), note  # measured here
    # no note where there is nothing to say: float32 on a CPU, bfloat16 on a GPU that has it
    precision.note_cpu_bfloat16.cache_clear()
    precision.resolve("float32", "cpu")
    precision.resolve("bfloat16", DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0)))
    assert capsys.readouterr().err == ""


def test_the_cpu_bfloat16_note_says_why_when_it_is_slow():
    slow, native = precision.cpu_bfloat16_note(41.6), precision.cpu_bfloat16_note(0.8)
    assert "emulated, 42x slower than float32" in slow and "--dtype float32" in slow
    assert "0.8x the time of float32" in native and "slower" not in native
    assert "\n" not in slow + native


def test_env_dtype_applies_when_flag_is_auto(capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    assert cli(capsys, "--simulate", "Tesla T4:7.5")[1]["dtype"] == "float32"
    # the flag wins over the environment
    assert cli(capsys, "--simulate", "Tesla T4:7.5", "--dtype", "float16")[1]["dtype"] == "float16"
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert cli(capsys, "--simulate", "Tesla T4:7.5")[0] == 2


@pytest.mark.parametrize(
    "target,name,cap_gib",
    [("p100", "Tesla P100-PCIE-16GB", 16), ("v100", "Tesla V100-SXM2-16GB", 16), ("t4", "Tesla T4", 15)],
)
def test_emulation_behaves_as_the_old_gpu(capsys, monkeypatch, target, name, cap_gib):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.setenv("NANOCHAT_EMULATE", target)
    code, plan = cli(capsys, "--simulate", "NVIDIA H100 80GB HBM3:9.0")
    assert code == 0
    assert plan["name"] == name and plan["dtype"] == "float16" and plan["grad_scaler"]
    assert plan["attention"] == "efficient" and plan["emulating"] == target
    assert plan["memory_cap"] == cap_gib * 2**30
    assert plan["compile"] is False  # host-GPU Triton kernels would not represent the old GPU
    assert plan["peak_flops"] == 989e12  # MFU counts against the chip that really computes
    assert "emulated on NVIDIA H100" in plan["reason"]
    # bf16 is refused exactly as on the real GPU
    assert cli(capsys, "--simulate", "NVIDIA H100 80GB HBM3:9.0", "--dtype", "bfloat16")[0] == 2


def test_emulation_needs_a_gpu_and_a_known_target(capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EMULATE", "p100")
    code, err = cli(capsys, "--simulate", "cpu")
    assert code == 2 and "CUDA GPU" in err
    monkeypatch.setenv("NANOCHAT_EMULATE", "k80")
    code, err = cli(capsys, "--simulate", "NVIDIA H100 80GB HBM3:9.0")
    assert code == 2 and "p100" in err


def test_bad_simulate_spec(capsys):
    code, err = cli(capsys, "--simulate", "P100")
    assert code == 2 and "MAJOR.MINOR" in err


def test_compute_context_autocasts_to_plan_dtype():
    plan = plan_for(DeviceInfo("cpu", "CPU"), "bfloat16")
    a = torch.randn(4, 4)
    with plan.compute_context():
        assert (a @ a).dtype == torch.bfloat16
    with plan_for(DeviceInfo("cpu", "CPU")).compute_context():
        assert (a @ a).dtype == torch.float32


def test_module_cli_and_autodetect_one_liner():
    out = subprocess.run([sys.executable, "-m", "nanochat.precision"], capture_output=True, text=True, check=True).stdout
    assert "dtype" in out and "reason" in out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    one = f"from nanochat.common import autodetect_dtype; print(autodetect_dtype({device!r}))"
    got = subprocess.run([sys.executable, "-c", one], capture_output=True, text=True, check=True).stdout.strip()
    assert got == str(precision.resolve("auto", device).torch_dtype)
