"""The multi-GPU and mixed-generation runs, in one command that reruns them on a machine with several
NVIDIA GPUs and leaves every result under --out (docs/scaling.md and docs/cluster.md quote them):

    python -m ray_jobs.gpu_runs --out gpu_runs                      # every run, on all visible GPUs
    python -m ray_jobs.gpu_runs --out gpu_runs --only scaling,memory
    python -m ray_jobs.gpu_runs --dry-run                          # the commands, nothing run

* scaling  bench_scaling at 1, 2, 4, 8 workers (as many as there are GPUs), depth 12 and 20, bf16 and
           fp16 + GradScaler, fixed tokens per GPU per step, overlapped + sharded and replicated
* memory   under NANOCHAT_EMULATE=p100 (16 GB each), at 1, 2 and 4 workers with sharded optimizer
           state: the deepest model the memory model says fits at sequence 2048, and the next depth,
           each trained for real, the prediction beside the measured peak
* mixed    two Ray nodes on this host, one GPU each, through cluster/start_node.sh: GPU 0 an emulated
           P100 (fp16), GPU 1 bf16. A 2-worker job refused with the group table; --precision auto
           picking bf16; a bf16 training run while a Serve replica pinned to fp16 answers bench_serve;
           the speedrun submitted with an fp16 label selector; one Tune sweep per group at once
* faults   under NCCL: a worker SIGKILLed mid-run, the group restarted from its checkpoint; a run
           saved at 4 workers (2 with 2-3 GPUs) resumed at half as many

Each command's output goes to <out>/logs/<name>.log and a line to <out>/runs.jsonl (command, exit
status, seconds); the runs that answer a question write <out>/<section>.json. A failing command is
recorded and the next one runs: the point is the whole table. Needs Ray, MLflow and the project
installed (or the device pack on PYTHONPATH); `ray` may be missing from PATH (a shim is made).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import stop_process_group
from nanochat.config import option, parse_config
from nanochat.errors import UsageError, run_main
from nanochat.tokenizer import Tokenizer
from ray_jobs.serve import wait_for_http

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("scaling", "memory", "mixed", "faults")
WORKER_COUNTS = (1, 2, 4, 8)
RAY_PORT, DASHBOARD_PORT, SERVE_PORT = 6390, 8265, 8011
FP16_NODE = {"CUDA_VISIBLE_DEVICES": "0", "NANOCHAT_EMULATE": "p100"}
BF16_NODE = {"CUDA_VISIBLE_DEVICES": "1"}


@dataclass
class GpuRunsConfig:
    out: str = option("gpu_runs", "folder for every result: JSON per section, logs, runs.jsonl")
    only: str = option(",".join(SECTIONS), "comma-separated sections to run: " + ", ".join(SECTIONS))
    gpus: int = option(0, "GPUs to use; 0 = every visible one")
    dry_run: bool = option(False, "print the commands instead of running them")
    scaling_steps: int = option(10, "timed steps per scaling point")


@dataclass
class Runner:
    """Runs commands with their logs under `out`, or prints them (`dry`)."""

    out: Path
    dry: bool
    env: dict = field(default_factory=dict)

    def _env(self, extra: dict | None) -> dict:
        return {**os.environ, **self.env, **(extra or {})}

    def _show(self, name: str, argv: list[str], extra: dict | None) -> str:
        prefix = " ".join(f"{k}={v}" for k, v in (extra or {}).items())
        return f"[{name}] {prefix + ' ' if prefix else ''}{shlex.join(map(str, argv))}"

    def run(self, name: str, argv: list, extra: dict | None = None, timeout: float = 3600) -> tuple[int, str]:
        """(exit status, output) of `argv`; 0 and "" in a dry run."""
        print(self._show(name, argv, extra), flush=True)
        if self.dry:
            return 0, ""
        log, start = self.out / "logs" / f"{name}.log", time.monotonic()
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([str(a) for a in argv], env=self._env(extra), cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
            rc, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as late:
            rc, text = 124, f"{late.stdout or ''}{late.stderr or ''}\n(timed out after {timeout:.0f} s)"
        log.write_text(text)
        self.record({"name": name, "argv": [str(a) for a in argv], "env": extra or {}, "rc": rc,
                     "seconds": round(time.monotonic() - start, 1)})
        print(f"  -> exit {rc} in {time.monotonic() - start:.0f} s ({log})", flush=True)
        return rc, text

    def start(self, name: str, argv: list, extra: dict | None = None) -> subprocess.Popen | None:
        """A background process (its own process group), output in its log; None in a dry run."""
        print(self._show(name, argv, extra) + " &", flush=True)
        if self.dry:
            return None
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            return subprocess.Popen([str(a) for a in argv], env=self._env(extra), cwd=REPO, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def record(self, row: dict) -> None:
        with (self.out / "runs.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write(self, section: str, result: object) -> None:
        if not self.dry:
            (self.out / f"{section}.json").write_text(json.dumps(result, indent=1))


def py(module: str, *args) -> list:
    return [sys.executable, "-m", module, *args]


# -----------------------------------------------------------------------------
# the sections
def scaling(r: Runner, gpus: int, steps: int) -> None:
    counts = ",".join(str(n) for n in WORKER_COUNTS if n <= gpus)
    results = {}
    for depth, batch in ((12, 32), (20, 16)):
        for dtype in ("bfloat16", "float16"):
            for sharded in (True, False):
                name = f"scaling_d{depth}_{dtype}_{'sharded' if sharded else 'replicated'}"
                out = r.out / f"{name}.json"
                r.run(name, py("nanochat.scripts.bench_scaling", "--depth", depth, "--workers", counts, "--dtype", dtype,
                               "--device-batch-size", batch, "--max-seq-len", 2048, "--steps", steps,
                               *([] if sharded else ["--no-shard-optimizer"]), "--out", out))
                if out.exists():
                    results[name] = json.loads(out.read_text())
    r.write("scaling", results)


def memory(r: Runner, gpus: int) -> None:
    """The memory model's deepest fit per worker count, and one depth deeper, each trained for real."""
    from nanochat.train.memory import FitQuestion, fit_table

    rows = []
    for workers in (n for n in (1, 2, 4) if n <= gpus):
        table = fit_table(FitQuestion(workers=workers, depths=",".join(map(str, range(4, 34, 2)))))
        fits = [row for row in table if row["sharded"]["device_batch_size"]]
        deeper = [row for row in table if row["depth"] > fits[-1]["depth"]][:1]
        for row in [fits[-1], *deeper]:
            batch = row["sharded"]["device_batch_size"] or 1
            name = f"memory_w{workers}_d{row['depth']}"
            out = r.out / f"{name}.json"
            rc, _ = r.run(name, py("nanochat.scripts.bench_scaling", "--depth", row["depth"], "--workers", workers,
                                   "--device-batch-size", batch, "--max-seq-len", 2048, "--steps", 2, "--warmup", 1,
                                   "--out", out), {"NANOCHAT_EMULATE": "p100"})
            measured = json.loads(out.read_text()) if out.exists() else None
            rows.append({"workers": workers, "depth": row["depth"], "device_batch_size": batch,
                         "predicted_peak": row["sharded"]["peak"], "model_says_fits": bool(row["sharded"]["device_batch_size"]),
                         "trained": rc == 0, "measured": measured})
    r.write("memory", rows)


def ray_cli() -> list[str]:
    return ["ray"] if shutil.which("ray") else [sys.executable, "-m", "ray.scripts.scripts"]


def with_ray_on_path(r: Runner) -> None:
    """start_node.sh runs `ray start`: where the CLI is not installed (a PYTHONPATH pack), a shim runs it."""
    if shutil.which("ray"):
        return
    shim = r.out / "bin" / "ray"
    if not r.dry:
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ray.scripts.scripts \"$@\"\n")
        shim.chmod(0o755)
    r.env["PATH"] = f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}"


def prepare_data(r: Runner, work: Path) -> tuple[Path, Path]:
    data, tokenizer = work / "data", work / "tokenizer"
    if not (data.exists() and Tokenizer.saved_in(tokenizer)):
        r.run("data", py("nanochat.dataset", "build", "--source", "embedded", "--out", data))
        r.run("tokenizer", py("nanochat.scripts.tok_train", "--data-dir", data, "--vocab-size", 8192, "--out", tokenizer))
    return data, tokenizer


def train_args(data: Path, tokenizer: Path, work: Path, name: str, *extra) -> list:
    return py("ray_jobs.train", "--data-dir", data, "--tokenizer-dir", tokenizer, "--storage-path", work / "ray_results",
              "--name", name, "--max-seq-len", 1024, "--eval-every", -1, "--sample-every", -1, *extra)


def wait_for(url: str, seconds: float) -> bool:
    """Whether `url` answered within `seconds` (ray_jobs.serve's own wait, as a yes or no for the report)."""
    try:
        wait_for_http(url, seconds)
    except UsageError as e:
        print(e, file=sys.stderr)
        return False
    return True


def mixed(r: Runner, work: Path) -> None:
    """Two Ray nodes on one host (GPU 0 as a P100 in fp16, GPU 1 in bf16) and the jobs that must keep apart."""
    data, tokenizer = prepare_data(r, work)
    with_ray_on_path(r)
    address, node = f"127.0.0.1:{RAY_PORT}", REPO / "cluster" / "start_node.sh"
    unlocked = {"NANOCHAT_UNLOCKED": "1", "PYTHON": sys.executable}  # the GPU machine's own torch build
    r.run("mixed_head", [node, "head", "--port", RAY_PORT, "--num-gpus", 1, "--dashboard-port", DASHBOARD_PORT],
          {**FP16_NODE, **unlocked})
    r.run("mixed_worker", [node, "worker", address, "--num-gpus", 1], {**BF16_NODE, **unlocked})
    r.env["RAY_ADDRESS"] = address
    result: dict = {}
    try:
        r.run("mixed_groups", py("ray_jobs.scheduler"))
        rc, text = r.run("mixed_refused", train_args(data, tokenizer, work, "refused", "--num-workers", 2, "--depth", 4,
                                                   "--num-iterations", 10, "--wait-for-nodes-s", 0))
        result["two_workers_refused"] = rc != 0 and "group" in text
        rc, text = r.run("mixed_auto", train_args(data, tokenizer, work, "auto", "--precision", "auto", "--depth", 8,
                                                "--num-iterations", 60, "--save-every", 60))
        result["auto"] = {"rc": rc, "picked_bf16": "training on the bf16 group" in text}
        result["train_beside_serve"] = train_beside_serve(r, data, tokenizer, work)
        result["speedrun_on_fp16"] = submit_speedrun(r, work)
        result["tune_per_group"] = tune_both_groups(r, data, tokenizer, work)
    finally:
        r.run("mixed_stop", [*ray_cli(), "stop"])
        r.env.pop("RAY_ADDRESS", None)
    r.write("mixed", result)


def train_beside_serve(r: Runner, data: Path, tokenizer: Path, work: Path) -> dict:
    serve = r.start("mixed_serve", py("ray_jobs.serve", "--checkpoint", work / "ray_results" / "auto", "--tokenizer-dir",
                                      tokenizer, "--precision", "fp16", "--port", SERVE_PORT))
    try:
        up = r.dry or wait_for(f"http://127.0.0.1:{SERVE_PORT}/health", 600)
        train = r.start("mixed_bf16_train", train_args(data, tokenizer, work, "beside_serve", "--precision", "bf16",
                                                       "--depth", 12, "--num-iterations", 200, "--save-every", -1))
        rc, text = r.run("mixed_bench_serve", py("nanochat.scripts.bench_serve", "--url", f"http://127.0.0.1:{SERVE_PORT}",
                                                 "--concurrency", 16, "--requests", 64, "--max-tokens", 128))
        train_rc = train.wait() if train else 0
        return {"serve_up": up, "bench_serve_rc": rc, "bench_serve": text[-2000:], "train_rc": train_rc}
    finally:
        if serve:
            stop_process_group(serve)


def submit_speedrun(r: Runner, work: Path) -> dict:
    selector = json.dumps({"nanochat/precision": "fp16"})
    rc, text = r.run("mixed_speedrun", [*ray_cli(), "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
                                        "--working-dir", ".", "--entrypoint-num-gpus", 1, "--entrypoint-label-selector",
                                        selector, "--", "bash", "ray_jobs/speedrun_p100.sh", "--time-budget", "20m",
                                        "--run", work / "speedrun", "--depth", 8],
                     {"RAY_AUTH_MODE": "token"}, timeout=2400)
    return {"rc": rc, "ran_in_fp16": "float16" in text, "tail": text[-2000:]}


def tune_both_groups(r: Runner, data: Path, tokenizer: Path, work: Path) -> dict:
    """A sweep compares trials in one dtype, so each group gets its own sweep; both run at once."""
    sweeps = {precision: r.start(f"mixed_tune_{precision}", py(
        "ray_jobs.tune", "--precision", precision, "--data-dir", data, "--tokenizer-dir", tokenizer, "--depth", 8,
        "--max-seq-len", 1024, "--num-samples", 2, "--max-concurrent", 1, "--storage-path", work / "ray_results",
        "--name", f"sweep_{precision}")) for precision in ("fp16", "bf16")}
    return {precision: (proc.wait() if proc else 0) for precision, proc in sweeps.items()}


def faults(r: Runner, gpus: int, work: Path) -> None:
    data, tokenizer = prepare_data(r, work)
    many = 4 if gpus >= 4 else 2
    batch = ("--depth", 12, "--device-batch-size", 16, "--total-batch-size", 16 * 1024 * many * 2)
    result = {}
    rc, _ = r.run("faults_kill", train_args(data, tokenizer, work, "killed", "--num-workers", many, *batch,
                                            "--num-iterations", 60, "--save-every", 20, "--report-every", 5,
                                            "--max-failures", 1), {"NANOCHAT_FAULT_INJECT": "1:30"})
    result["killed_and_restarted"] = {"rc": rc, "summary": summary(work, "killed")}
    # saved at `many` workers (the run dies after step 40 with no restart allowed), resumed at half as many
    r.run("faults_resize_first", train_args(data, tokenizer, work, "resized", "--num-workers", many, *batch,
                                            "--num-iterations", 80, "--save-every", 20, "--max-failures", 0),
          {"NANOCHAT_FAULT_INJECT": "0:40"})
    rc, _ = r.run("faults_resize_resume", train_args(data, tokenizer, work, "resized", "--num-workers", many // 2, *batch,
                                                     "--num-iterations", 80, "--save-every", 20, "--resume"))
    result["resumed_at_fewer_workers"] = {"from": many, "to": many // 2, "rc": rc, "summary": summary(work, "resized")}
    r.write("faults", result)


def summary(work: Path, name: str) -> dict | None:
    path = work / "ray_results" / name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GpuRunsConfig, argv, description=__doc__.splitlines()[0])
    wanted = [s.strip() for s in cfg.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--only {cfg.only}: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    gpus = cfg.gpus or (8 if cfg.dry_run else visible_gpus())
    needs_two = {"mixed", "faults"} & set(wanted)
    if gpus < 1 or (needs_two and gpus < 2):
        raise SystemExit(f"{gpus} GPU(s) visible: scaling and memory need 1, {' and '.join(sorted(needs_two))} 2; "
                         "run on a machine with more GPUs (--dry-run prints the commands anywhere)")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    r, work = Runner(out, cfg.dry_run), out / "work"
    print(f"{gpus} GPU(s); sections: {', '.join(wanted)}; results in {out}", flush=True)
    if "scaling" in wanted:
        scaling(r, gpus, cfg.scaling_steps)
    if "memory" in wanted:
        memory(r, gpus)
    if "mixed" in wanted:
        mixed(r, work)
    if "faults" in wanted:
        faults(r, gpus, work)


if __name__ == "__main__":
    run_main(main)
