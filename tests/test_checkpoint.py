"""Checkpoints: a resumed run must match an uninterrupted one, and damage must never be resumed from.

    python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanochat.checkpoint import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    load_model_state,
    restore_orphans,
    save_checkpoint,
    verify_checkpoint,
)

META = {"model_config": {"n_layer": 2, "n_embd": 8}, "tokenizer": "fp-abc", "precision": {"dtype": "float32"}}


def make_state(seed: int):
    torch.manual_seed(seed)
    # Dropout makes the forward pass itself draw from the torch RNG, so RNG restore is exercised.
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A small scale that grows every 2 steps, so the scaler state changes during the test.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return model, optimizer, scaler


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model, optimizer, scaler, loader_state: dict, steps: int) -> None:
    """Toy steps whose data depends on all three RNGs and on the loader position."""
    for _ in range(steps):
        pos = loader_state["pos"]
        x = torch.randn(4, 8) * random.random() + float(np.random.randn()) + pos
        y = torch.randn(4, 4)
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loader_state["pos"] = pos + 1


def rng_draws() -> tuple:
    return torch.randn(5), random.random(), float(np.random.rand())


def save(root, step, model, optimizer=None, scaler=None, loader_state=None, meta=META, **kw) -> Path:
    return save_checkpoint(
        root, step, model=model, optimizer=optimizer, scaler=scaler, loader_state=loader_state, meta=meta, **kw
    )


# ---------------------------------------------------------------------------------------------------
# resume == uninterrupted


def test_resume_matches_uninterrupted_run(tmp_path):
    k, m = 5, 4
    seed_all(0)
    ref_model, ref_opt, ref_scaler = make_state(0)
    ref_loader = {"pos": 0}
    train(ref_model, ref_opt, ref_scaler, ref_loader, k + m)

    seed_all(0)
    model, opt, scaler = make_state(0)
    loader = {"pos": 0}
    train(model, opt, scaler, loader, k)
    path = save(tmp_path, k, model, opt, scaler, loader)

    # A fresh process would start from different weights, RNG and scaler scale.
    seed_all(99)
    model2, opt2, scaler2 = make_state(99)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2)
    state = load_checkpoint(path, model=model2, optimizer=opt2, scaler=scaler2, expect=META)
    assert state["step"] == k
    assert state["loader_state"] == {"pos": k}
    assert state["meta"] == META
    assert scaler2.get_scale() == scaler.get_scale()

    train(model2, opt2, scaler2, state["loader_state"], m)
    for (name, p_ref), p in zip(ref_model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p_ref, p), f"{name} differs after resume"
    assert scaler2.get_scale() == ref_scaler.get_scale()


def test_rng_after_load_equals_rng_after_save(tmp_path):
    seed_all(1)
    model, opt, scaler = make_state(1)
    path = save(tmp_path, 1, model, opt, scaler, {"pos": 0})
    after_save = rng_draws()

    seed_all(2)
    load_checkpoint(path, model=make_state(2)[0])
    after_load = rng_draws()
    assert torch.equal(after_save[0], after_load[0])
    assert after_save[1:] == after_load[1:]

    seed_all(3)
    load_checkpoint(path, restore_rng=False)
    assert not torch.equal(rng_draws()[0], after_save[0])


# ---------------------------------------------------------------------------------------------------
# damaged checkpoints


def truncate_model(path: Path) -> str:
    f = path / "model.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "model.pt"


def corrupt_optim(path: Path) -> str:
    # Same size, one byte flipped: only the full check (verify_checkpoint) can tell.
    f = path / "optim.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return "optim.pt"


def remove_manifest(path: Path) -> str:
    (path / "manifest.json").unlink()
    return "manifest.json"


def remove_meta(path: Path) -> str:
    (path / "meta.json").unlink()
    return "meta.json"


@pytest.mark.parametrize("damage", [truncate_model, remove_manifest, remove_meta])
def test_damaged_newest_is_skipped_and_refused(tmp_path, caplog, damage):
    model, opt, scaler = make_state(0)
    good = save(tmp_path, 1, model, opt, scaler, {"pos": 1})
    bad = save(tmp_path, 2, model, opt, scaler, {"pos": 2})
    filename = damage(bad)

    with caplog.at_level(logging.WARNING, logger="nanochat.checkpoint"):
        assert find_latest(tmp_path) == good
    assert "step_000002" in caplog.text and filename in caplog.text

    with pytest.raises(CheckpointError, match=filename) as err:
        load_checkpoint(bad, model=model, optimizer=opt)
    assert "earlier" in str(err.value)
    assert load_checkpoint(good, model=model, optimizer=opt)["loader_state"] == {"pos": 1}


def test_readers_check_sizes_and_the_full_check_finds_a_flipped_byte(tmp_path):
    # the writer checked the hashes when it wrote the checkpoint: readers (every worker of a restart) do
    # not read whole checkpoints again to hash them, unless asked to
    model, opt, scaler = make_state(0)
    flipped = save(tmp_path, 1, model, opt, scaler, {"pos": 1})
    corrupt_optim(flipped)
    assert find_latest(tmp_path) == flipped
    with pytest.raises(CheckpointError, match=r"optim\.pt does not match its sha256"):
        verify_checkpoint(flipped)
    with pytest.raises(CheckpointError, match="optim.pt"):
        load_checkpoint(flipped, model=model, optimizer=opt, check_hashes=True)


def test_the_manifest_holds_the_hashes_of_the_serialized_bytes(tmp_path):
    # two routes to one hash: the bytes torch.save makes of the state, and the file the writer left
    model, opt, scaler = make_state(0)
    path = save(tmp_path, 1, model, opt, scaler, {"pos": 1})
    serialized = io.BytesIO()
    torch.save(dict(model.state_dict()), serialized)  # the weights alone, as a checkpoint holds them
    entry = json.loads((path / "manifest.json").read_text())["files"]["model.pt"]
    assert entry == {"size": len(serialized.getvalue()), "sha256": hashlib.sha256(serialized.getvalue()).hexdigest()}
    assert entry["sha256"] == hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()
    verify_checkpoint(path)


def test_leftover_temp_dir_is_ignored_with_warning(tmp_path, caplog):
    model, opt, _ = make_state(0)
    good = save(tmp_path, 1, model, opt)
    leftover = tmp_path / ".tmp-step_000002-12345-deadbeef"
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"half a model")

    with caplog.at_level(logging.WARNING, logger="nanochat.checkpoint"):
        assert find_latest(tmp_path) == good
    assert leftover.name in caplog.text


def test_find_latest_of_missing_or_empty_root(tmp_path):
    assert find_latest(tmp_path / "nope") is None
    assert find_latest(tmp_path) is None


# ---------------------------------------------------------------------------------------------------
# a process killed in the middle of a save


def write_half_then_die(obj, f, *args, **kwargs):
    """Stands in for torch.save: the file gets half its bytes, then the process is SIGKILLed."""
    buf = io.BytesIO()
    REAL_TORCH_SAVE(obj, buf)
    data = buf.getvalue()
    with open(f, "wb") if isinstance(f, (str, os.PathLike)) else nullcontext(f) as out:
        out.write(data[: len(data) // 2])
        out.flush()  # into the kernel: the SIGKILL below leaves these bytes in the file
    die()


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


REAL_TORCH_SAVE = torch.save


def save_in_child_that_dies(root: Path, mode: str) -> int:
    """Fork; the child starts a save that SIGKILLs itself partway. Returns the child's wait status.

    A fork rather than a fresh interpreter: it skips a multi-second torch import per case.
    """
    model, opt, _ = make_state(1)
    pid = os.fork()
    if pid == 0:
        try:
            if mode == "mid_write":
                torch.save = write_half_then_die
            else:
                os.replace = os.rename = die
            if mode == "replacing_same_step":
                model[0].weight.data.zero_()
            save(root, 2 if mode != "replacing_same_step" else 1, model, opt, loader_state={"pos": 2})
        finally:
            os._exit(1)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("mode", ["mid_write", "before_rename", "replacing_same_step"])
def test_kill_during_save_leaves_previous_checkpoint(tmp_path, mode):
    model, opt, _ = make_state(0)
    previous = save(tmp_path, 1, model, opt, loader_state={"pos": 1})

    status = save_in_child_that_dies(tmp_path, mode)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"

    assert not (tmp_path / "step_000002").exists()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()), "the kill should hit mid-save"
    assert find_latest(tmp_path) == previous
    state_dict, _ = load_model_state(previous)
    assert torch.equal(state_dict["0.weight"], model[0].weight)  # the old weights, intact


def first_rename_then_die(real_replace):
    """Stands in for os.replace in a save of a step that exists: the old copy is moved aside (the first
    rename), then the process is SIGKILLed before the new copy takes its place (the second)."""
    calls = []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            die()
        real_replace(src, dst)

    return replace


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_step_orphaned_between_the_two_renames_is_restored(tmp_path, caplog):
    model, opt, _ = make_state(0)
    save(tmp_path, 1, model, opt, loader_state={"pos": 1})
    save(tmp_path, 2, model, opt, loader_state={"pos": 2})
    pid = os.fork()
    if pid == 0:
        try:
            os.replace = first_rename_then_die(os.replace)
            save(tmp_path, 2, make_state(1)[0], loader_state={"pos": 99})  # step 2 saved again, cut short
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"
    [orphan] = [p for p in tmp_path.iterdir() if p.name.startswith(".old-step_000002-")]
    assert not (tmp_path / "step_000002").exists()

    with caplog.at_level(logging.WARNING, logger="nanochat.checkpoint"):
        assert find_latest(tmp_path).name == "step_000001"
        [said] = [r.getMessage() for r in caplog.records if orphan.name in r.getMessage()]
        assert "holds the only copy of step_000002" in said and "safe to remove" not in said
        assert restore_orphans(tmp_path) == [tmp_path / "step_000002"]
    assert f"restored {tmp_path / 'step_000002'} from {orphan.name}" in caplog.text
    restored = find_latest(tmp_path)
    assert restored == tmp_path / "step_000002" and not orphan.exists()
    fresh, fresh_opt, _ = make_state(3)
    assert load_checkpoint(restored, model=fresh, optimizer=fresh_opt)["loader_state"] == {"pos": 2}
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_parameters_are_never_saved(tmp_path, bad):
    model, opt, _ = make_state(0)
    save(tmp_path, 1, model, opt)
    with torch.no_grad():
        model[2].bias[1] = bad
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: model tensor '2.bias' holds 1 of 4 values that are NaN or inf"):
        save(tmp_path, 2, model, opt, keep_last=1)
    assert step_dirs(tmp_path) == ["step_000001"] and find_latest(tmp_path).name == "step_000001"


# ---------------------------------------------------------------------------------------------------
# run identity


def test_mismatched_meta_is_refused(tmp_path):
    model, opt, _ = make_state(0)
    path = save(tmp_path, 1, model, opt)
    other = {**META, "model_config": {"n_layer": 3, "n_embd": 8}}
    with pytest.raises(CheckpointError, match="model_config") as err:
        load_checkpoint(path, model=model, expect=other)
    assert "tokenizer" not in str(err.value)
    assert "'n_layer': 2" in str(err.value) and "'n_layer': 3" in str(err.value)

    with pytest.raises(CheckpointError, match="missing_key"):
        load_checkpoint(path, expect={"missing_key": 1})


def test_wrong_model_shape_is_refused(tmp_path):
    model, _, _ = make_state(0)
    path = save(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(path, model=nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 4)))


def test_optimizer_requested_but_not_saved(tmp_path):
    model, opt, _ = make_state(0)
    path = save(tmp_path, 1, model, optimizer=None)
    with pytest.raises(CheckpointError, match="optimizer=None"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_unserializable_meta_writes_nothing(tmp_path):
    model, _, _ = make_state(0)
    with pytest.raises(CheckpointError, match="JSON"):
        save(tmp_path, 1, model, meta={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# keep_last, same-step replacement


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model, opt, _ = make_state(0)
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    assert step_dirs(tmp_path) == ["step_000004", "step_000005"]

    # A save with a lower step (a run restarted from an earlier point) is still never pruned.
    save(tmp_path, 3, model, opt, keep_last=2)
    assert step_dirs(tmp_path) == ["step_000003", "step_000005"]

    save(tmp_path, 6, model, opt, keep_last=1)
    assert step_dirs(tmp_path) == ["step_000006"]


def test_same_step_is_replaced(tmp_path):
    model, _, _ = make_state(0)
    save(tmp_path, 7, model)
    model2, _, _ = make_state(1)
    path = save(tmp_path, 7, model2)
    assert step_dirs(tmp_path) == ["step_000007"]
    state_dict, _ = load_model_state(path)
    assert torch.equal(state_dict["0.weight"], model2[0].weight)


# ---------------------------------------------------------------------------------------------------
# compiled and eager models share checkpoints


def compile_whole(model: nn.Module) -> nn.Module:
    return torch.compile(model)  # keys become "_orig_mod.0.weight"


def compile_first_layer(model: nn.Module) -> nn.Module:
    model[0] = torch.compile(model[0])  # keys become "0._orig_mod.weight"
    return model


@pytest.mark.parametrize("compile_fn", [compile_whole, compile_first_layer])
def test_compiled_and_eager_models_share_checkpoints(tmp_path, compile_fn):
    # torch.compile only wraps the module here; nothing is compiled until a forward pass.
    source, _, _ = make_state(0)
    compiled = compile_fn(make_state(0)[0])
    assert any("_orig_mod." in k for k in compiled.state_dict())

    path = save(tmp_path, 1, compiled)
    state_dict, meta = load_model_state(path)
    assert not any("_orig_mod." in k for k in state_dict)
    assert meta == META

    eager, _, _ = make_state(1)
    load_checkpoint(path, model=eager)
    for p_src, p in zip(source.parameters(), eager.parameters(), strict=True):
        assert torch.equal(p_src, p)

    # And the other way round: eager weights into a compiled model.
    path = save(tmp_path, 2, eager)
    target = compile_fn(make_state(2)[0])
    load_checkpoint(path, model=target)
    for p_src, p in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(p_src, p)
