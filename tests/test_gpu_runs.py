"""ray_jobs.gpu_runs, the multi-GPU runs' script, as far as a CPU machine can take it: its dry run plans
every section for 8 GPUs, and every flag it passes is one its target command takes (read from that
command's own --help), so the script does not fail on a typo once GPUs are lent."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess

import pytest

from ray_jobs import gpu_runs

# the commands whose flags are read from their parser, and the arguments that show that parser's help
HELP_ARGV = {("nanochat.dataset", "build"): ["build", "--help"]}


def planned(capsys, *argv: str) -> list[tuple[str, list[str]]]:
    gpu_runs.main(["--dry-run", *argv])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    return [(line[1:line.index("]")], shlex.split(line[line.index("]") + 1:].removesuffix(" &"))) for line in lines]


def help_text(module: str, sub: str | None, capsys) -> str:
    with pytest.raises(SystemExit) as shown:
        importlib.import_module(module).main(HELP_ARGV.get((module, sub), ["--help"]))
    assert shown.value.code == 0
    return capsys.readouterr().out


def test_the_dry_run_plans_every_section_and_each_flag_exists(tmp_path, capsys):
    commands = planned(capsys, "--out", str(tmp_path), "--gpus", "8")
    names = [name for name, _ in commands]
    assert {f"scaling_d{d}_{t}_{m}" for d in (12, 20) for t in ("bfloat16", "float16")
            for m in ("sharded", "replicated")} <= set(names)
    assert {"memory_w1", "memory_w2", "memory_w4"} <= {n.rsplit("_", 1)[0] for n in names if n.startswith("memory")}
    assert {"mixed_head", "mixed_worker", "mixed_refused", "mixed_auto", "mixed_serve", "mixed_bf16_train",
            "mixed_bench_serve", "mixed_speedrun", "mixed_tune_fp16", "mixed_tune_bf16", "faults_kill",
            "faults_resize_first", "faults_resize_resume"} <= set(names)
    assert not list(tmp_path.glob("*.json")), "a dry run writes no results"

    checked = set()
    for name, argv in commands:
        env = [a for a in argv if re.match(r"^[A-Z_]+=", a)]
        argv = argv[len(env):]
        if argv[1:2] != ["-m"] or argv[2] == "ray.scripts.scripts":
            continue
        module, sub = argv[2], (argv[3] if argv[2] == "nanochat.dataset" else None)
        text = help_text(module, sub, capsys)
        for flag in (a for a in argv[3:] if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}(?![\w-])", text), f"{name}: python -m {module} takes no {flag}"
        checked.add(module)
    assert {"nanochat.scripts.bench_scaling", "ray_jobs.train", "ray_jobs.serve", "ray_jobs.tune",
            "nanochat.scripts.bench_serve", "nanochat.dataset", "nanochat.scripts.tok_train"} <= checked


def test_the_job_submission_uses_flags_the_ray_cli_takes(tmp_path, capsys):
    [(_, argv)] = [c for c in planned(capsys, "--out", str(tmp_path), "--only", "mixed") if c[0] == "mixed_speedrun"]
    argv = argv[[i for i, a in enumerate(argv) if not re.match(r"^[A-Z_]+=", a)][0]:]
    cli = argv[:argv.index("job")]
    shown = subprocess.run([*cli, "job", "submit", "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in (a for a in argv[:argv.index("--")] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}(?![\w-])", shown), f"ray job submit takes no {flag}"


def test_sections_that_need_two_gpus_are_refused_on_one(tmp_path):
    with pytest.raises(SystemExit, match=r"1 GPU\(s\) visible: .* faults and mixed 2"):
        gpu_runs.main(["--out", str(tmp_path), "--gpus", "1"])
    with pytest.raises(SystemExit, match="unknown section"):
        gpu_runs.main(["--out", str(tmp_path), "--only", "scaling,speed", "--dry-run"])
