"""Mistakes fail fast: each entry point, run as a real `python -m` process, refuses a missing checkpoint,
tokenizer or shards, a damaged shard, a busy port or a precision group the machine does not have in
ONE line on stderr (`error: ...`, no traceback), with exit status 2, in under FAST_CPU_S seconds of work
(most of it importing torch), before starting Ray, a server or an MLflow run. `--debug` shows the
traceback. A row group damaged past its footer can only show when a Ray Data actor reads it: that run
(slow: Ray starts) must end the same way, its MLflow run FAILED."""

from __future__ import annotations

import importlib
import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.checkpoint import find_latest
from tests.conftest import REPO
from tests.test_chat_eval import tiny_run  # noqa: F401  (the shared tiny checkpoint fixture)

# The issue asks for 10 s on a 2-core machine. A failure's cost is the CPU time of its process (importing
# torch and the checks: 3-6 s), which is its wall-clock time on an idle machine; a loaded machine stretches
# the wall-clock time, not the work, so that gets more room. A run that started Ray, a server or an MLflow
# run would show in the wall-clock time (and in the files checked), not in the CPU time of its process.
FAST_CPU_S = 10.0
FAST_WALL_S = 30.0
TINY = ["--depth", "1", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
        "--num-iterations", "4", "--eval-tokens", "256", "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1",
        "--compile", "off"]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NANOCHAT_DATA", "NANOCHAT_DEBUG")}
    env["NANOCHAT_BASE_DIR"] = str(tmp_path / "base")  # nothing to fall back on
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def children_cpu_seconds() -> float:
    """CPU time (user + system) of this process's finished child processes so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def fails_fast(args: list[str], tmp_path: Path) -> tuple[str, str]:
    """(the one error line, stdout) of a run that must fail fast as a user error."""
    start, cpu_before = time.perf_counter(), children_cpu_seconds()
    out = run(args, tmp_path)
    seconds, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_before
    print(f"python -m {args[0]}: exit {out.returncode} in {seconds:.1f} s, {cpu:.1f} s of CPU")  # pytest -s
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert cpu < FAST_CPU_S and seconds < FAST_WALL_S, f"took {seconds:.1f} s, {cpu:.1f} s of CPU"
    return lines[0], out.stdout


def damaged_copy(data_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(data_dir, copy)
    return copy


# -----------------------------------------------------------------------------
# ray_jobs.train and ray_jobs.tune: checked before Ray or MLflow start


def train(tmp_path: Path, *flags: str) -> list[str]:
    return ["ray_jobs.train", *TINY, "--storage-path", str(tmp_path / "storage"), *flags]


def test_train_without_shards(tmp_path, tokenizer_dir):
    empty = tmp_path / "no_shards"
    empty.mkdir()
    line, _ = fails_fast(train(tmp_path, "--data-dir", str(empty), "--tokenizer-dir", str(tokenizer_dir)), tmp_path)
    assert f"no shard_*.parquet files in {empty}" in line and "python -m nanochat.dataset build" in line
    assert not (tmp_path / "storage").exists()  # no MLflow store, no Ray Train folder


def test_train_without_a_tokenizer(tmp_path, data_dir):
    line, _ = fails_fast(train(tmp_path, "--data-dir", str(data_dir), "--tokenizer-dir", str(tmp_path / "tok")), tmp_path)
    assert f"no tokenizer at {tmp_path / 'tok'}" in line and "tok_train" in line
    assert not (tmp_path / "storage").exists()


def test_train_with_a_shard_whose_footer_is_damaged(tmp_path, data_dir, tokenizer_dir):
    shards = damaged_copy(data_dir, tmp_path)
    bad = shards / "shard_00001.parquet"
    bad.write_bytes(bad.read_bytes()[:-100])  # the footer is the end of the file
    line, _ = fails_fast(train(tmp_path, "--data-dir", str(shards), "--tokenizer-dir", str(tokenizer_dir)), tmp_path)
    assert f"{bad} is not a readable parquet file" in line and "--overwrite" in line
    assert not (tmp_path / "storage").exists()


def test_train_in_a_precision_group_this_machine_lacks(tmp_path, data_dir, tokenizer_dir):
    # a local cluster is this machine: with --device cpu, one fp32 node
    line, stdout = fails_fast(train(tmp_path, "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
                                    "--precision", "bf16", "--device", "cpu"), tmp_path)
    assert "no bf16 nodes in this cluster (it has fp32: 1 node(s)" in line
    assert "precision | nodes" in stdout  # the cluster's table, on stdout
    assert not (tmp_path / "storage").exists()


def test_train_over_an_earlier_run_without_resume(tmp_path, data_dir, tokenizer_dir, tiny_run):  # noqa: F811
    run_dir = tmp_path / "storage" / "base_d1"
    latest = find_latest(tiny_run / "checkpoints")
    shutil.copytree(latest, run_dir / latest.name)
    line, _ = fails_fast(train(tmp_path, "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir)), tmp_path)
    assert f"{run_dir} already holds checkpoints" in line and "--resume" in line
    assert not list((tmp_path / "storage").rglob("mlflow.db"))


def test_tune_without_shards(tmp_path, tokenizer_dir):
    line, _ = fails_fast(["ray_jobs.tune", *TINY, "--data-dir", str(tmp_path / "none"), "--tokenizer-dir", str(tokenizer_dir),
                          "--storage-path", str(tmp_path / "storage")], tmp_path)
    assert "no shard_*.parquet files" in line
    assert not (tmp_path / "storage").exists()


# -----------------------------------------------------------------------------
# ray_jobs.serve: checked before Ray, Serve or a replica start


def serve(*flags: str) -> list[str]:
    return ["ray_jobs.serve", "--device", "cpu", *flags]


def test_serve_without_a_checkpoint(tmp_path):
    line, _ = fails_fast(serve("--checkpoint", str(tmp_path / "runs" / "sft_d1")), tmp_path)
    assert f"no complete checkpoint under {tmp_path / 'runs' / 'sft_d1'}" in line


def test_serve_without_its_tokenizer(tmp_path, tiny_run):  # noqa: F811
    line, _ = fails_fast(serve("--checkpoint", str(tiny_run), "--tokenizer-dir", str(tmp_path / "moved")), tmp_path)
    assert "no tokenizer" in line and str(tmp_path / "moved") in line


def test_serve_on_a_busy_port(tmp_path, tiny_run, tokenizer_dir):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line, _ = fails_fast(serve("--checkpoint", str(tiny_run), "--tokenizer-dir", str(tokenizer_dir),
                                   "--port", str(port)), tmp_path)
    assert f"127.0.0.1:{port} is in use" in line and "--port" in line


def test_serve_in_a_precision_group_this_machine_lacks(tmp_path, tiny_run, tokenizer_dir):  # noqa: F811
    line, stdout = fails_fast(serve("--checkpoint", str(tiny_run), "--tokenizer-dir", str(tokenizer_dir),
                                    "--precision", "fp16"), tmp_path)
    assert "no fp16 nodes in this cluster" in line and "replica" in line
    assert "precision | nodes" in stdout


# -----------------------------------------------------------------------------
# the plain scripts, and --debug


def test_plain_training_without_shards(tmp_path, tokenizer_dir):
    line, _ = fails_fast(["nanochat.scripts.base_train", *TINY, "--device", "cpu", "--data-dir", str(tmp_path / "none"),
                          "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(tmp_path / "run")], tmp_path)
    assert "no shard_*.parquet files" in line


def test_chat_cli_without_a_checkpoint(tmp_path):
    line, _ = fails_fast(["nanochat.scripts.chat_cli", "--device", "cpu", "--checkpoint", str(tmp_path / "none"),
                          "-p", "hi"], tmp_path)
    assert f"no complete checkpoint under {tmp_path / 'none'}" in line


def test_debug_shows_the_traceback(tmp_path):
    out = run(serve("--checkpoint", str(tmp_path / "none"), "--debug"), tmp_path)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "CheckpointError: no complete checkpoint" in out.stderr


# -----------------------------------------------------------------------------
# a row group damaged past its footer: read by a Ray Data actor, reported by the driver


@pytest.mark.slow
def test_a_damaged_row_group_read_through_ray(tmp_path, data_dir, tokenizer_dir):
    shards = damaged_copy(data_dir, tmp_path)
    bad = shards / "shard_00000.parquet"
    chunk = pq.ParquetFile(bad).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(bad.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle:middle + 64] = b"\xff" * 64  # the footer still reads: only row group 1 is damaged
    bad.write_bytes(bytes(data))

    out = run(train(tmp_path, "--data-dir", str(shards), "--tokenizer-dir", str(tokenizer_dir)), tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"error: {bad}: row group 1 is unreadable") and "--overwrite" in errors[0]
    assert "Failed to apply UDF" not in errors[0]  # Ray's retry advice stays out of the message
    with sqlite3.connect(tmp_path / "storage" / "mlflow.db") as db:
        assert [row[0] for row in db.execute("SELECT status FROM runs")] == ["FAILED"]


# -----------------------------------------------------------------------------
# --debug in every entry point's help


INTERNAL_SCRIPTS = {"nanochat.execution"}  # run as a file by the code that needs it (run_python's launcher), not a command


def entry_points() -> list[str]:
    """Every module of the project that runs as `python -m ...`."""
    files = [*(REPO / "nanochat").rglob("*.py"), *(REPO / "ray_jobs").glob("*.py")]
    modules = {".".join(f.relative_to(REPO).with_suffix("").parts) for f in files
               if re.search(r'^if __name__ == "__main__":', f.read_text(), re.MULTILINE)}
    return sorted(modules - INTERNAL_SCRIPTS)


def test_every_entry_point_offers_debug_in_its_help(capsys):
    modules = entry_points()
    assert {"nanochat.scripts.base_train", "ray_jobs.serve", "ray_jobs.train", "nanochat.dataset"} <= set(modules)
    for module in modules:
        with pytest.raises(SystemExit) as shown:
            importlib.import_module(module).main(["--help"])
        assert shown.value.code == 0, module
        assert "--debug" in capsys.readouterr().out, f"python -m {module} --help does not list --debug"
