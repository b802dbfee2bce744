"""A new user's first hour: the demo's outputs (built once, tiny, by the demo's own pieces) through the
commands it prints at the end, with no flags beyond those printed. Checkpoints name their tokenizer and
shards, so nothing else is needed; a tokenizer that moved fails in one line that says where it looked."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import shlex

import pytest

from nanochat import checkpoint
from nanochat.config import parse_config
from nanochat.dataset import list_shards
from nanochat.scripts import base_loss, base_train, chat_cli, chat_sft, demo
from nanochat.tokenizer import Tokenizer
from nanochat.train.base import BaseTrainConfig
from nanochat.train.loop import grad_accum_steps
from nanochat.train.stages import STAGES

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
    files = demo.DemoFiles(out, base=out / "run", chat=out / "sft")
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


def test_printed_serve_command_and_client_snippet(outputs):
    from ray_jobs.serve import ServeConfig

    files, results, printed = outputs
    cfg = parse_config(ServeConfig, printed_commands(printed)["ray_jobs.serve"])
    # what each replica loads (ray_jobs/serve.py ChatServer), without starting Ray
    _, tokenizer, step_dir, _ = checkpoint.load_for_inference(cfg.checkpoint, "cpu", cfg.tokenizer_dir or None)
    assert tokenizer.directory == files.tokenizer and checkpoint.run_dir_of(step_dir) == files.chat
    snippet = printed.split("python - <<'EOF'\n")[1].split("\nEOF")[0]
    compile(snippet, "snippet", "exec")
    assert f'model="{files.chat.name}"' in snippet and len(snippet.splitlines()) == 4


def test_printed_tune_command_parses_and_finds_its_inputs(outputs):
    from ray_jobs import train, tune

    files, _, printed = outputs
    cfg = parse_config(tune.config_class(), printed_commands(printed)["ray_jobs.tune"])
    train.resolve_paths(cfg, STAGES["base"])  # what tune.main does before it starts Ray
    assert Tokenizer.load(cfg.tokenizer_dir).directory == files.tokenizer
    assert list_shards(cfg.data_dir) == list_shards(files.data)


def test_printed_speedrun_command_parses_into_valid_stages(outputs):
    from ray_jobs import speedrun

    files, _, printed = outputs
    run = parse_config(speedrun.SpeedrunConfig, printed_commands(printed)["ray_jobs.speedrun"])
    assert run.data_dir == files.data and list_shards(run.data_dir)
    base = parse_config(BaseTrainConfig, speedrun.stage_command(run, "base", 60.0)[1:])
    base = dataclasses.replace(base, device_batch_size=int(base.device_batch_size))  # as base.setup resolves it
    assert grad_accum_steps(base, base.max_seq_len) == TINY_ACCUMULATION
