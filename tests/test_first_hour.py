"""A new user's first hour: the demo's outputs (built once, tiny, by the demo's own pieces) through the
commands it prints at the end (chat, serve and its client snippet, tune for real; the speedrun in
tests/test_speedrun.py), with no flags beyond those printed but the server's port and, for the sweep, a
tracking server as a cluster has. Checkpoints name their
tokenizer and shards, so nothing else is needed; a tokenizer that moved fails in one line that says where
it looked."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from nanochat import checkpoint
from nanochat.config import parse_config
from nanochat.dataset import list_shards
from nanochat.errors import UsageError
from nanochat.scripts import base_loss, base_train, chat_cli, chat_sft, demo
from nanochat.tokenizer import Tokenizer
from nanochat.train.base import BaseTrainConfig
from nanochat.train.loop import grad_accum_steps
from ray_jobs.train import RunStorage
from tests.conftest import REPO, free_port
from tests.test_storage import s3  # noqa: F401  (moto's S3 server, started once per session)

TINY = demo.DemoConfig(steps=4, depth=1, vocab_size=512)
TINY_ACCUMULATION = demo.TOTAL_BATCH // (demo.DEVICE_BATCH * demo.SEQ_LEN)  # the speedrun at the demo's batch
EVAL = ["--device", "cpu", "--device-batch-size", "4", "--eval-tokens", "512", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """An empty $NANOCHAT_BASE_DIR: no default tokenizer or shards to fall back on, as on a fresh machine
    where the demo wrote elsewhere."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("home") / "nanochat"
        patch.setenv("NANOCHAT_BASE_DIR", str(root))
        patch.delenv("NANOCHAT_DATA", raising=False)
        yield root


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, base_dir):
    """The plain demo's pipeline at a tiny size: its flags with smaller horizons appended (argparse keeps
    the last). SFT and the evaluation get no --tokenizer-dir / --data-dir: the checkpoints name them.
    Returns (files, results, what the demo printed at the end)."""
    out = (tmp_path_factory.mktemp("demo") / "demo").resolve()
    # where the Ray demo (the README's first command) puts its models: the printed lines are the README's
    files = demo.DemoFiles(out, base=out / "ray_results" / "demo", chat=out / "ray_results" / "demo_sft")
    demo.prepare(TINY, files)
    results = {"train": base_train.main([*demo.train_args(TINY, files), "--run-dir", str(files.base), "--eval-tokens", "1024"]),
               "eval": base_loss.main(["--checkpoint", str(files.base), *EVAL])}
    results["sft"] = chat_sft.main([*demo.sft_args(TINY, files), "--run-dir", str(files.chat), "--num-iterations", "2",
                                    "--mixture", "identity:40,spelling:40", "--val-conversations", "8"])
    results["answer"] = demo.chat(files)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo.finish(TINY, files, results)
    return files, results, printed.getvalue()


def printed_commands(text: str) -> dict[str, list[str]]:
    """module -> argv of each `python -m module ...` line the demo printed."""
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith("python -m ")]
    return {argv[2]: argv[3:] for argv in commands}


def test_the_readme_shows_what_the_demo_prints_next(outputs):
    files, _, _ = outputs
    # at the demo's default sizes, its directory written $DEMO
    printed = demo.next_steps(demo.DemoConfig(), files).replace(str(files.out), "$DEMO")
    assert printed in (REPO / "README.md").read_text(), "README.md's 'what next' block is not what the demo prints"


def test_checkpoints_record_their_tokenizer_and_data(outputs):
    files, _, _ = outputs
    fingerprint = Tokenizer.load(files.tokenizer).fingerprint()
    base, sft = checkpoint.read_meta(files.base), checkpoint.read_meta(files.chat)
    assert (base["tokenizer"], base["tokenizer_dir"], base["data_dir"]) == (fingerprint, str(files.tokenizer), str(files.data))
    # SFT found the tokenizer through the base checkpoint (no flag, no default) and records it in turn
    assert (sft["tokenizer"], sft["tokenizer_dir"]) == (fingerprint, str(files.tokenizer))
    assert "data_dir" not in sft  # it reads conversations, not shards


def test_base_loss_finds_data_and_tokenizer_from_the_checkpoint(outputs):
    files, results, _ = outputs
    explicit = base_loss.main(["--checkpoint", str(files.base), "--data-dir", str(files.data),
                               "--tokenizer-dir", str(files.tokenizer), *EVAL])
    found = results["eval"]
    assert math.isfinite(found["val_bpb"]) and found["checkpoint"] == explicit["checkpoint"]
    assert (found["train_bpb"], found["val_bpb"]) == (explicit["train_bpb"], explicit["val_bpb"])


def test_printed_chat_command_answers_as_the_demo_did(outputs):
    files, results, printed = outputs
    argv = printed_commands(printed)["nanochat.scripts.chat_cli"]
    assert argv == ["--checkpoint", str(files.chat)]
    again = chat_cli.main([*argv, "--device", "cpu", "--temperature", "0", "--max-tokens", "48", "-p", demo.DEMO_QUESTION])
    assert again == results["answer"] and again.strip()


def test_a_moved_tokenizer_fails_in_one_line_naming_where_it_looked(outputs, base_dir, tmp_path):
    files, results, _ = outputs
    ask = ["--checkpoint", str(files.chat), "--device", "cpu", "--temperature", "0", "--max-tokens", "48", "-p", demo.DEMO_QUESTION]
    moved = tmp_path / "moved_tokenizer"
    files.tokenizer.rename(moved)
    try:
        with pytest.raises(SystemExit) as failed:
            chat_cli.main(ask)
        message = str(failed.value.code)
        assert "\n" not in message
        assert str(files.tokenizer) in message and str(base_dir / "tokenizer") in message
        assert "--tokenizer-dir" in message and "tok_train" not in message  # find it, do not train another
        assert chat_cli.main([*ask, "--tokenizer-dir", str(moved)]) == results["answer"]  # the flag wins
    finally:
        moved.rename(files.tokenizer)


def test_a_wrong_tokenizer_flag_is_refused_and_the_right_one_named(outputs, tokenizer_dir):
    files, _, _ = outputs
    with pytest.raises(SystemExit) as failed:
        chat_cli.main(["--checkpoint", str(files.chat), "--tokenizer-dir", str(tokenizer_dir), "--device", "cpu", "-p", "hi"])
    message = str(failed.value.code)
    assert "\n" not in message and "is not the one" in message
    assert f"pass --tokenizer-dir {files.tokenizer}" in message


def port_is_free(host: str, port: int) -> bool:
    from ray_jobs.serve import check_port

    try:
        check_port(host, port)
    except UsageError:
        return False
    return True


def wait_for_line(log: Path, process: subprocess.Popen, start: str, timeout: float) -> None:
    """Until a line of `log` (the output of `process`) starts with `start`; fails with the log's tail when the
    process ends first or the time is up."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(start) for line in log.read_text().splitlines()):
        tail = "\n".join(log.read_text().splitlines()[-30:])
        assert process.poll() is None, f"exited with {process.returncode} before {start!r}:\n{tail}"
        assert time.monotonic() < deadline, f"no {start!r} line after {timeout:.0f} s:\n{tail}"
        time.sleep(0.5)


@pytest.mark.timeout(600)  # about half a minute on a 2-core machine, most of it Serve and its replica starting
def test_printed_serve_command_answers_the_printed_client_snippet(outputs, local_ray, tmp_path):
    """The printed server as a real process, stopped by SIGTERM, and the printed snippet against it. Two things
    differ from a user's terminal: the server joins the session's local Ray through $RAY_ADDRESS (one Ray start
    less), and it listens on a free port, as the snippet's URL then says (8000 may be taken on a test machine)."""
    import ray
    from openai import OpenAI
    from ray import serve

    from ray_jobs.serve import ServeConfig

    files, results, printed = outputs
    argv = printed_commands(printed)["ray_jobs.serve"]
    assert argv == ["--checkpoint", str(files.chat)]  # the checkpoint names its tokenizer: nothing else needed
    default, port = ServeConfig(), free_port()
    snippet = printed.split("python - <<'EOF'\n")[1].split("\nEOF")[0]
    printed_url = f'base_url="http://{default.host}:{default.port}/v1"'
    assert printed_url in snippet  # the snippet asks the server the printed command starts
    url = f"http://{default.host}:{port}/v1"
    snippet = snippet.replace(printed_url, f'base_url="{url}"')

    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "ray_jobs.serve", *argv, "--port", str(port)], cwd=REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log, server, "serving ", timeout=300)
        asked = subprocess.run([sys.executable, "-"], input=snippet, capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr
        client = OpenAI(base_url=url, api_key="none")
        model = client.models.list().data[0].id
        assert f'model="{model}"' in snippet
        # the served model is the one the demo asked: the same greedy answer as its chat CLI
        greedy = client.chat.completions.create(model=model, messages=[{"role": "user", "content": demo.DEMO_QUESTION}],
                                                temperature=0, max_tokens=48)
        assert greedy.choices[0].message.content == results["answer"]

        server.send_signal(signal.SIGTERM)  # what `ray job stop` and `kill` send
        assert server.wait(timeout=120) == 0
        # Serve's proxy stopped with it: the port is free again (Ray ends the proxy's process a moment later)
        deadline = time.monotonic() + 30
        while not port_is_free(default.host, port):
            assert time.monotonic() < deadline, f"port {port} still held 30 s after the server exited"
            time.sleep(0.5)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        serve.shutdown()  # a server that failed half-way leaves no Serve in the shared Ray
        print(log.read_text()[-5000:])  # shown when the test fails


@pytest.mark.timeout(900)  # a trainer start per trial: one to two minutes of CPU, most of it Ray starting processes
def test_printed_tune_command_stops_early_logs_everything_and_its_best_config_trains(outputs, base_dir, local_ray,
                                                                                      tracking_server, s3, tmp_path):  # noqa: F811
    """The printed sweep, run as printed but as on a cluster: logging to a tracking server, its experiment
    in object storage (an S3 bucket; the outputs users read are also written locally). Two trials one after
    the other, so ASHA's verdict is deterministic (the default search seed samples the same second trial, CPU
    training is deterministic): the first (nanochat's defaults) runs to the end, the second is judged at the first
    rung against it and stopped there. Its trials are MLflow runs on the server that end with ASHA's verdict, hold
    each step once and nothing after the verdict, and whose artifacts went through the server into its store; its
    best_config.json trains; the same sweep again needs --resume, which trains nothing."""
    from mlflow.tracking import MlflowClient

    from ray_jobs import tune

    files, _, printed = outputs
    uri, server_dir = tracking_server
    sweeps = s3.uri("sweeps")
    argv = [*printed_commands(printed)["ray_jobs.tune"], "--mlflow-uri", uri, "--storage-path", sweeps]
    cfg = parse_config(tune.config_class(), argv)
    out = tune.main(argv)
    trials = out["trials"]
    assert len(trials) == cfg.num_samples == 2 and not [t for t in trials if t["status"] == "error"]
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert stopped and all(t["tokens"] < cfg.token_budget for t in stopped), "ASHA stopped no trial"
    assert any(t["status"] == "completed" and t["tokens"] == cfg.token_budget for t in trials)
    defaults = BaseTrainConfig()  # the first trial: the baseline the sweep reports against
    assert any(t["matrix_lr"] == defaults.matrix_lr and t["embedding_lr"] == defaults.embedding_lr for t in trials)
    experiment = Path(out["experiment_dir"])
    assert experiment.parent == base_dir / "ray_results"  # where docs/tuning.md says a sweep's outputs go
    # the experiment Tune restores from, its trials' checkpoints, and a copy of the outputs: in the bucket
    from ray import tune as ray_tune

    storage = RunStorage.of(sweeps, experiment.name)
    assert ray_tune.Tuner.can_restore(storage.path, storage_filesystem=storage.fs)
    stored = {i.base_name for i in storage.fs.get_file_info(pafs.FileSelector(storage.path))}
    assert {"best_config.json", "trials.csv", "train_runs"} <= stored

    # every trial is one MLflow run on the server, experiment = the sweep, with its parameters and its bpb,
    # ended with ASHA's verdict; the last evaluation in MLflow is the one Tune saw last
    assert out["mlflow_uri"] == uri
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment.name)
    assert found.artifact_location.startswith("mlflow-artifacts:")  # uploaded through the server, not to a path
    runs = client.search_runs([found.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in trials)
    for run in runs:
        row = next(t for t in trials if t["trial_id"] == run.data.tags["trial_id"])
        assert float(run.data.params["matrix_lr"]) == pytest.approx(row["matrix_lr"])
        assert int(run.data.params["device_batch_size"]) == row["device_batch_size"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_bpb"))
        assert history[-1] == (row["steps"], pytest.approx(row["val_bpb"]))
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, row["steps"] + 1)), "each step once, none past the verdict"
        assert run.info.status == ("FINISHED" if row["status"] == "completed" else "KILLED")
    # the finished trial's summary, uploaded by its worker: in the server's artifact store, read back through it
    finished = next(r for r in runs if r.info.status == "FINISHED")
    assert "summary.json" in [a.path for a in client.list_artifacts(finished.info.run_id)]
    uploaded = list((server_dir / "artifacts").rglob(f"{finished.info.run_id}/artifacts/summary.json"))
    assert len(uploaded) == 1 and json.loads(uploaded[0].read_text())["steps"] == next(
        t["steps"] for t in trials if t["trial_id"] == finished.data.tags["trial_id"])

    # best_config.json: the winner's base_train settings at the demo's shape, and base_train trains with them
    best_file = experiment / "best_config.json"
    best = json.loads(best_file.read_text())
    assert best == out["best_config"] and set(best) <= {f.name for f in dataclasses.fields(BaseTrainConfig)}
    assert (best["depth"], best["max_seq_len"], best["head_dim"]) == (TINY.depth, demo.SEQ_LEN, demo.HEAD_DIM)
    winner = min((t for t in trials if t["status"] == "completed"), key=lambda t: t["val_bpb"])
    assert {k: best[k] for k in tune.TUNED} == {k: winner[k] for k in tune.TUNED}
    assert (experiment / "trials.csv").read_text().count("\n") == len(trials) + 1
    assert (experiment / "bpb_vs_params.png").stat().st_size > 0
    from_best = ["--config", str(best_file), "--device", "cpu", "--data-dir", str(files.data), "--tokenizer-dir",
                 str(files.tokenizer), "--num-iterations", "2", "--eval-every", "-1", "--sample-every", "-1",
                 "--save-every", "-1", "--eval-tokens", "1024", "--run-dir", str(tmp_path / "from_best")]
    assert {k: getattr(parse_config(BaseTrainConfig, from_best), k) for k in best} == best
    summary = base_train.main(from_best)
    assert summary["steps"] == 2 and summary["final_loss"] > 0

    # the same place again needs --resume; resuming the finished sweep trains nothing and rewrites the
    # same outputs, still one MLflow run per trial
    with pytest.raises(SystemExit, match="--resume"):
        tune.main(argv)
    best_file.unlink()
    again = tune.main([*argv, "--resume"])
    assert json.loads(best_file.read_text()) == best
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(t["trial_id"] for t in trials)
    assert len(client.search_runs([client.get_experiment_by_name(experiment.name).experiment_id])) == len(trials)


def test_printed_speedrun_command_parses_into_valid_stages(outputs):
    from ray_jobs import speedrun

    files, _, printed = outputs
    run = parse_config(speedrun.SpeedrunConfig, printed_commands(printed)["ray_jobs.speedrun"])
    assert run.data_dir == files.data and list_shards(run.data_dir)
    base = parse_config(BaseTrainConfig, speedrun.stage_command(run, "base", 60.0)[1:])
    base = dataclasses.replace(base, device_batch_size=int(base.device_batch_size))  # as base.setup resolves it
    assert grad_accum_steps(base, base.max_seq_len) == TINY_ACCUMULATION
