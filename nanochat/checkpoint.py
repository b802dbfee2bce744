"""Atomic checkpoints of a training state.

A checkpoint is one directory, root/step_000123/, holding:

    model.pt       model.state_dict() with any torch.compile "_orig_mod." prefix removed
    optim.pt       optimizer.state_dict() (absent when saved without an optimizer)
    meta.json      step, data-loader position, GradScaler state, RNG states and the caller's metadata
    manifest.json  size and sha256 of every other file; written last

Everything is written into a hidden temp dir in `root`, fsync'd, and renamed into place, so a
reader sees either a complete checkpoint or none. The manifest is the second line of defence: a
directory whose files do not match it (a truncated copy, a half-synced bucket) is never resumed from.
Hashes are checked once, by the writer, against the bytes it serialized; readers check that the manifest
is there and every file has its size (verify_checkpoint hashes everything, on request), so a restart of
many workers does not re-read whole checkpoints to hash them. Readers take a pyarrow file system
(object storage: a Ray Train checkpoint's `filesystem`) where the checkpoint is not on local disk.

    save_checkpoint(root, step, model=m, optimizer=opt, scaler=sc, loader_state=ls, meta=meta)
    writer.submit(root, snapshot(step, model=m, ...))   # the same, written on a thread (BackgroundWriter)
    path = find_latest(root)
    state = load_checkpoint(path, model=m, optimizer=opt, scaler=sc, expect={"model_config": cfg})

A run directory belongs to one run: `run.json` names its run id, every checkpoint's meta carries it, and
a `RunLock` keeps a second live writer out (open_run_dir, claim_run_dir).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from nanochat.common import base_dir
from nanochat.errors import UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
OPTIM_FILE = "optim.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
COMPILE_PREFIX = "_orig_mod."
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".del-")  # hidden dirs of saves/deletes that were cut short
ORPHAN_RE = re.compile(r"^\.old-(step_\d+)-")  # a step moved aside by _publish; its replacement may never have landed
OWNER_FILE = "run.json"  # in a run dir: the run id of the run that owns it
LOCK_FILE = "writer.lock"  # in a run dir: flock'ed by the live process that writes its checkpoints


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, damaged, or does not belong to the run that tries to load it."""


# ---------------------------------------------------------------------------------------------------
# small file helpers


def _fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory holding the entry is flushed too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems (and Windows) cannot open directories; nothing more we can do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingFile:
    """A binary file that keeps the size and sha256 of the bytes written to it: what the manifest records is
    what was serialized, so the writer's check of the file on disk against it means something."""

    def __init__(self, f: Any):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_file(path: Path, dump: Callable[[Any], None]) -> dict:
    """Write `path` with `dump(file)` and fsync it; returns its manifest entry (size, sha256 as serialized)."""
    with open(path, "wb") as f:
        hashing = _HashingFile(f)
        dump(hashing)
        f.flush()
        os.fsync(f.fileno())
    return {"size": hashing.size, "sha256": hashing.sha256.hexdigest()}


def _write_torch(obj: Any, path: Path) -> dict:
    return _write_file(path, lambda f: torch.save(obj, f))


def _write_json(obj: Any, path: Path) -> dict:
    return _write_file(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def _location(path: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(file system, path in it) of a checkpoint file or dir: in `filesystem` (e.g. object storage), else on local disk."""
    if filesystem is None:
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    return filesystem, str(path).rstrip("/")


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------------
# state pieces: model keys, RNG


def _strip_compile_prefix(key: str) -> str:
    # torch.compile wraps a module as `_orig_mod`; the prefix can sit at the front (whole model
    # compiled) or mid-key (one block compiled), so drop it wherever it appears.
    return key.replace(COMPILE_PREFIX, "")


def _canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_strip_compile_prefix(k): v for k, v in model.state_dict().items()}


def _match_model_keys(saved: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename saved keys to the target model's own keys, so compiled and eager models share files."""
    own_keys = {_strip_compile_prefix(k): k for k in model.state_dict()}
    return {own_keys.get(_strip_compile_prefix(k), k): v for k, v in saved.items()}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _capture_rng() -> dict:
    # Stored as JSON (no pickle) so meta.json stays readable and safe to load.
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    rng = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": _b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available():
        rng["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return rng


def _restore_rng(rng: dict) -> None:
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npr = rng["numpy"]
    np.random.set_state(
        {
            "bit_generator": npr["bit_generator"],
            "state": {"key": np.array(npr["key"], dtype=np.uint32), "pos": npr["pos"]},
            "has_gauss": npr["has_gauss"],
            "gauss": npr["gauss"],
        }
    )
    torch.set_rng_state(_from_b64(rng["torch"]))
    saved_cuda = rng.get("cuda") or []
    if saved_cuda and torch.cuda.is_available():
        n_now = torch.cuda.device_count()
        if n_now != len(saved_cuda):
            log.warning(
                "checkpoint holds CUDA RNG states for %d devices, this process sees %d; "
                "restoring the first %d only",
                len(saved_cuda), n_now, min(n_now, len(saved_cuda)),
            )
        for i, s in enumerate(saved_cuda[:n_now]):
            torch.cuda.set_rng_state(_from_b64(s), device=i)


# ---------------------------------------------------------------------------------------------------
# manifest


def _write_manifest(directory: Path, step: int, files: dict[str, dict]) -> None:
    """manifest.json listing `files` (name -> size and sha256 as serialized), written last."""
    _write_json({"format_version": FORMAT_VERSION, "step": step, "files": files}, directory / MANIFEST_FILE)


def _manifest_problem(directory: str | Path, filesystem: pafs.FileSystem | None = None, hashes: bool = False) -> str | None:
    """What is wrong with a checkpoint dir's files versus its manifest, or None when it is intact: the
    manifest present and readable, every file it lists present with its size, and with `hashes` its sha256."""
    fs, base = _location(directory, filesystem)
    manifest_path = f"{base}/{MANIFEST_FILE}"
    try:
        files = json.loads(_read_bytes(fs, manifest_path))["files"]
    except FileNotFoundError:
        return f"{manifest_path} is missing (the save never finished)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    # one listing for every size (one request on object storage, not one per file)
    found = {info.base_name: info for info in fs.get_file_info(pafs.FileSelector(base))}
    for name, entry in files.items():
        path, info = f"{base}/{name}", found.get(name)
        if info is None or info.type != pafs.FileType.File:
            return f"{path} is listed in the manifest but missing"
        if info.size != entry.get("size"):
            return f"{path} has {info.size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if hashes and _sha256(fs, path) != entry.get("sha256"):
            return f"{path} does not match its sha256 in the manifest (corrupted)"
    if MODEL_FILE not in files or META_FILE not in files:
        return f"{manifest_path} does not list {MODEL_FILE} and {META_FILE}"
    return None


def _verify(directory: str | Path, filesystem: pafs.FileSystem | None = None, hashes: bool = False) -> None:
    problem = _manifest_problem(directory, filesystem, hashes)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {directory} is damaged: {problem}. Delete this directory or load an earlier "
            f"checkpoint (find_latest() skips damaged ones)."
        )


def verify_checkpoint(path: str | Path, filesystem: pafs.FileSystem | None = None) -> None:
    """Hash every file of the checkpoint at `path` against its manifest (a full read); raises CheckpointError
    naming the first that differs. Loading checks only sizes: the writer checked the hashes when it wrote it."""
    _verify(path, filesystem, hashes=True)


# ---------------------------------------------------------------------------------------------------
# listing


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_N directory under root, newest first; warns about leftovers."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
        elif (orphaned := _orphaned_step(p)) is not None:
            log.warning("%s holds the only copy of %s (a save of that step was cut between its two renames): "
                        "do not remove it; --resume puts it back", p, orphaned)
        elif p.name.startswith(LEFTOVER_PREFIXES):
            log.warning("ignoring leftover %s (an interrupted save or delete); safe to remove", p)
    return sorted(found, reverse=True)


def _orphaned_step(p: Path) -> str | None:
    """The step_N name a `.old-step_N-...` dir stands for when step_N itself is missing, else None."""
    m = ORPHAN_RE.match(p.name)
    return m.group(1) if m and p.is_dir() and not (p.parent / m.group(1)).exists() else None


def restore_orphans(root: str | Path) -> list[Path]:
    """Rename back every complete `.old-step_N-...` whose step_N is missing: a save that replaced step N
    moved the old copy aside and was killed before its new copy landed. Returns the steps restored.
    Only the run's writer may call it (under its RunLock): a live save passes through that state."""
    root, restored = Path(root), []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        name = _orphaned_step(p)
        if name is None or (root / name).exists():  # a second orphan of the same step: the first one won
            continue
        problem = _manifest_problem(p)
        if problem is not None:
            log.warning("cannot restore %s as %s: %s", p, name, problem)
            continue
        os.replace(p, root / name)
        _fsync_dir(root)
        log.warning("restored %s from %s (a save of that step was cut between its two renames)", root / name, p.name)
        restored.append(root / name)
    return restored


def find_latest(root: str | Path) -> Path | None:
    """The highest-step checkpoint under `root` whose files match its manifest (present, with their sizes), or None."""
    for _, path in _step_dirs(Path(root)):
        problem = _manifest_problem(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def _remove_dir(path: Path) -> None:
    # Rename first (atomic) so a crash during rmtree leaves a hidden leftover, not a half-deleted
    # step dir that looks like a checkpoint.
    trash = path.parent / f".del-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, keep_last: int, new_path: Path) -> None:
    complete = [p for _, p in _step_dirs(root) if p != new_path and (p / MANIFEST_FILE).is_file()]
    for old in complete[max(keep_last - 1, 0):]:
        log.info("keep_last=%d: removing %s", keep_last, old)
        _remove_dir(old)


# ---------------------------------------------------------------------------------------------------
# save / load


@dataclass
class Snapshot:
    """A training state copied to host memory: it can be written while training changes the originals."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict | None
    record: dict  # what meta.json holds


def _to_host(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU (a copy even when it is there already)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def snapshot(
    step: int,
    *,
    model: nn.Module,
    optimizer: Optimizer | dict | None,  # or its state_dict(), e.g. gathered from several ranks
    scaler: GradScaler | None,
    loader_state: dict | None,
    meta: dict,
) -> Snapshot:
    """Copy what a checkpoint of `step` holds to host memory (RNG states as of now).

    `loader_state` and `meta` must be JSON-serializable: that is checked here, before anything hits disk."""
    record = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "loader_state": loader_state,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": _capture_rng(),
        "meta": meta,
    }
    try:
        record = json.loads(json.dumps(record))  # also a copy: later changes to meta do not leak in
    except TypeError as e:
        raise CheckpointError(f"meta and loader_state must be JSON-serializable: {e}") from e
    weights = _canonical_state_dict(model)
    _check_finite(step, weights)
    optimizer_state = None if optimizer is None else optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    return Snapshot(step, _to_host(weights), _to_host(optimizer_state), record)


def _check_finite(step: int, weights: dict[str, torch.Tensor]) -> None:
    """Refuse to save NaN/inf weights: a diverged checkpoint would replace (keep_last) the good ones
    a run could still resume from. One flag per tensor, read back once, so the check costs one sync."""
    floats = [(k, v) for k, v in weights.items() if v.is_floating_point()]
    if not floats:
        return
    device = floats[0][1].device
    finite = torch.stack([torch.isfinite(v).all().to(device) for _, v in floats])
    if bool(finite.all()):
        return
    name, bad = floats[int((~finite).nonzero()[0])]
    count = int((~torch.isfinite(bad)).sum())
    raise CheckpointError(
        f"refusing to save step {step}: model tensor {name!r} holds {count} of {bad.numel()} values that are NaN or "
        "inf (the run diverged). Nothing was written; resume from the last checkpoint (--resume) with a lower "
        "learning rate or another --dtype."
    )


def write_snapshot(root: str | Path, snap: Snapshot, keep_last: int | None = None) -> Path:
    """Write root/step_{step:06d}/ atomically and return its path; `keep_last=N` then removes all but the
    N newest complete checkpoints (the one just written always stays)."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_dir_name(snap.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {MODEL_FILE: _write_torch(snap.model, tmp / MODEL_FILE)}
        if snap.optimizer is not None:
            files[OPTIM_FILE] = _write_torch(snap.optimizer, tmp / OPTIM_FILE)
        files[META_FILE] = _write_json(snap.record, tmp / META_FILE)
        _write_manifest(tmp, snap.step, files)
        _fsync_dir(tmp)
        # the one full check of this checkpoint: what reached the disk is what was serialized
        _verify(tmp, hashes=True)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if keep_last is not None:
        _prune(root, keep_last, final)
    return final


def save_checkpoint(root: str | Path, step: int, *, keep_last: int | None = None, **state: Any) -> Path:
    """Snapshot (model=, optimizer=, scaler=, loader_state=, meta=: see `snapshot`) and write it now."""
    return write_snapshot(root, snapshot(step, **state), keep_last)


class BackgroundWriter:
    """Writes checkpoints on a thread, one at a time, so training goes on while the disk works.

    `submit` first waits for the previous write (at most one snapshot is held in host memory besides the
    one being taken) and re-raises its error, if any; `wait` does the same at the end of a run. The
    snapshot itself is taken by the caller, at the step boundary, so the checkpoint is that step's."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: Path | None = None

    def submit(self, root: str | Path, snap: Snapshot, keep_last: int | None = None) -> None:
        self.wait()

        def write() -> None:
            try:
                self.last = write_snapshot(root, snap, keep_last)
            except BaseException as e:  # re-raised in the training thread by the next submit/wait
                self._error = e

        self._thread = threading.Thread(target=write, name=f"checkpoint-step-{snap.step}", daemon=False)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the write in flight is on disk; returns the latest checkpoint written."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint in the background failed: {error}") from error
        return self.last


def _publish(tmp: Path, final: Path) -> None:
    # os.replace cannot overwrite a non-empty directory, so an existing checkpoint of the same step
    # is moved aside first and deleted only once the new one is in place.
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_expect(path: Path, saved: dict, expect: dict) -> None:
    # Compare through JSON so tuples vs lists and int keys vs str keys do not count as differences.
    diffs = []
    for key, want in expect.items():
        want = json.loads(json.dumps(want))
        have = saved.get(key, "<missing>")
        if have != want:
            diffs.append(f"  {key}: saved {have!r} vs expected {want!r}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not match this run:\n" + "\n".join(diffs) + "\n"
            "Resume with the settings it was saved with, or start a new checkpoint directory."
        )


def _load_torch(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path}: {e}. Delete this checkpoint or load an earlier one."
        ) from e


def _read_record(path: str | Path, filesystem: pafs.FileSystem | None = None) -> dict:
    fs, base = _location(path, filesystem)
    record = json.loads(_read_bytes(fs, f"{base}/{META_FILE}"))
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{base}/{META_FILE} has format_version {record.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}. Load it with the nanochat version that wrote it."
        )
    return record


def read_state(path: str | Path, filesystem: pafs.FileSystem | None = None) -> dict:
    """{"step", "loader_state", "meta", "path"} of the checkpoint at `path` (in `filesystem`, e.g. a Ray Train
    checkpoint's object storage; else local disk), its manifest and sizes checked, no weights read."""
    _verify(path, filesystem)
    record = _read_record(path, filesystem)
    return {"step": record["step"], "loader_state": record["loader_state"], "meta": record["meta"], "path": path}


def _load_model_weights(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(_match_model_keys(state, model), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / MODEL_FILE} does not fit this model: {e}") from e


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: Optimizer | None = None,
    scaler: GradScaler | None = None,
    map_location: Any = "cpu",
    expect: dict | None = None,
    restore_rng: bool = True,
    check_hashes: bool = False,
) -> dict:
    """Check and load the checkpoint at `path` into the given objects (each optional).

    The manifest and every file's size are checked; `check_hashes` hashes every file too (verify_checkpoint).
    `expect` maps meta keys to the values this run needs (model config, tokenizer fingerprint,
    precision plan...); any difference raises CheckpointError before anything is loaded.
    Returns {"step", "loader_state", "meta", "path"}.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; use find_latest(root) to locate one")
    _verify(path, hashes=check_hashes)
    record = _read_record(path)
    if expect:
        _check_expect(path, record["meta"], expect)

    if model is not None:
        _load_model_weights(model, _load_torch(path / MODEL_FILE, map_location), path)
    if optimizer is not None:
        if not (path / OPTIM_FILE).is_file():
            raise CheckpointError(
                f"{path} was saved without optimizer state; pass optimizer=None to load weights only"
            )
        optimizer.load_state_dict(_load_torch(path / OPTIM_FILE, map_location))
    if scaler is not None and scaler.is_enabled():
        if record["scaler"]:
            scaler.load_state_dict(record["scaler"])
        else:
            log.warning("%s has no GradScaler state (saved without fp16); the scale starts fresh", path)
    if restore_rng:
        _restore_rng(record["rng"])
    return {
        "step": record["step"],
        "loader_state": record["loader_state"],
        "meta": record["meta"],
        "path": path,
    }


def resolve_checkpoint(path: str | Path) -> Path:
    """A step_* dir as given, or the latest complete one under a checkpoint root or a run dir
    (whose checkpoints live in <run dir>/checkpoints, as the plain training scripts write them)."""
    path = Path(path)
    if STEP_DIR_RE.match(path.name):
        return path
    latest = find_latest(path) or find_latest(path / "checkpoints")
    if latest is None:
        raise CheckpointError(f"no complete checkpoint under {path}; train one first (python -m nanochat.scripts.base_train)")
    return latest


def stage_run_dir(stage: str, depth: int, root: str | Path | None = None) -> Path:
    """<root>/<stage>_d<depth>, where a stage writes and the next one looks (root: $NANOCHAT_BASE_DIR/runs)."""
    return Path(root or base_dir() / "runs") / f"{stage}_d{depth}"


def run_dir_of(step_dir: str | Path) -> Path:
    """The run directory a checkpoint belongs to: <run>/checkpoints/step_N (plain scripts) or
    <run>/step_N (Ray Train storage). Evaluation results and reports are written there."""
    parent = Path(step_dir).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


# ---------------------------------------------------------------------------------------------------
# run directories: one run each, one live writer


def new_run_id() -> str:
    return uuid.uuid4().hex


def run_owner(run_dir: str | Path, filesystem: pafs.FileSystem | None = None) -> str | None:
    """The run id `run_dir`'s run.json names (in `filesystem`, else on local disk), or None where there is none."""
    fs, base = _location(run_dir, filesystem)
    path = f"{base}/{OWNER_FILE}"
    try:
        return json.loads(_read_bytes(fs, path))["run_id"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); it names the run that owns {run_dir}: restore it, "
                              "or move the run's checkpoints to a new directory") from e


def _holds_checkpoints(root: Path) -> bool:
    return root.is_dir() and any(STEP_DIR_RE.match(p.name) or p.name.startswith(LEFTOVER_PREFIXES) for p in root.iterdir())


def check_run_id(step_dir: str | Path, meta: dict, run_id: str, run_dir: str | Path) -> None:
    """Refuse to resume a checkpoint another run wrote (a checkpoint from before run ids were recorded passes)."""
    theirs = meta.get("run_id")
    if theirs is not None and theirs != run_id:
        raise CheckpointError(
            f"{step_dir} was written by run {theirs}, but {run_dir}/{OWNER_FILE} says {run_dir} belongs to run "
            f"{run_id}: two runs wrote checkpoints here. Move the other run's checkpoints out, or resume in its own directory."
        )


def open_run_dir(run_dir: str | Path, ckpt_root: str | Path, resume: bool, elsewhere: str) -> tuple[str, Path | None]:
    """(run id, checkpoint to resume from or None) of a run starting in `run_dir`, whose checkpoints go
    to `ckpt_root`. Without `resume`, a directory that holds a run (run.json, or checkpoints) is refused
    (`elsewhere` names the flags that pick another one); with it, the run id is the directory's owner's
    (or the latest checkpoint's, where no run.json was written) and a checkpoint of another run is refused.
    Reads only: the writer then restores orphaned steps (restore_orphans) and claims it (claim_run_dir)."""
    latest = find_latest(ckpt_root)
    run_id, _ = resume_run(run_dir, latest, resume, elsewhere, holds_checkpoints=_holds_checkpoints(Path(ckpt_root)))
    return run_id, latest


def resume_run(run_dir: str | Path, latest: str | Path | None, resume: bool, elsewhere: str,
               filesystem: pafs.FileSystem | None = None, holds_checkpoints: bool = False) -> tuple[str, dict | None]:
    """(run id, read_state of `latest` or None) of a run starting in `run_dir`, whose latest checkpoint is
    `latest` as the caller found it (find_latest on disk; for Ray Train, the checkpoint it restores), both
    in `filesystem` (else on local disk). The rules of open_run_dir; `holds_checkpoints` says the directory
    holds checkpoint dirs though none is complete."""
    owner = run_owner(run_dir, filesystem)
    if not resume:
        if owner is None and latest is None and not holds_checkpoints:
            return new_run_id(), None
        of_run = f" of run {owner}" if owner else ""
        what = (f"checkpoints (latest: {Path(latest).name}){of_run}" if latest else f"checkpoints{of_run}"
                if holds_checkpoints else f"run {owner} (stopped before its first checkpoint)")
        raise CheckpointError(f"{run_dir} already holds {what}; pass --resume to continue that run, or {elsewhere} for a new one")
    state = read_state(latest, filesystem) if latest is not None else None
    meta = state["meta"] if state else {}
    run_id = owner or meta.get("run_id") or new_run_id()
    if latest is not None:
        check_run_id(latest, meta, run_id, run_dir)
    return run_id, state


def claim_run_dir(run_dir: str | Path, run_id: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write `run_dir`'s run.json naming `run_id` (call it holding the RunLock); refused when another run
    claimed the directory since open_run_dir looked. In object storage (`filesystem`) there is no RunLock
    (no flock there): the owner check is the only guard, and one object is written whole or not at all."""
    owner = run_owner(run_dir, filesystem)
    if owner == run_id:
        return
    if owner is not None:
        raise CheckpointError(f"{run_dir} was claimed by run {owner} while this run ({run_id}) started; "
                              "pass --resume to continue that run, or choose another directory")
    record = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
    if filesystem is not None:
        filesystem.create_dir(str(run_dir), recursive=True)
        with filesystem.open_output_stream(f"{str(run_dir).rstrip('/')}/{OWNER_FILE}") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True).encode())
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{OWNER_FILE}.{os.getpid()}"
    _write_json(record, tmp)
    os.replace(tmp, run_dir / OWNER_FILE)
    _fsync_dir(run_dir)


class RunLock:
    """An advisory lock (flock) on <run_dir>/writer.lock, held by the one process that writes the run's
    checkpoints for the run's whole life: a second writer is refused, naming the holder. The kernel drops
    it when the holder dies, however it dies, so a killed run never leaves the directory locked."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # not "w": truncating would erase the holder's name before we know we hold it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise CheckpointError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end or stop "
                                  "it, or choose another directory for this one") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        # the file stays: removing it would let a third process lock a new file while a second holds the old one
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------------
# the shards a run trains on


def shard_set(shards: list[Path | str]) -> dict:
    """What a checkpoint records of the shards it was trained on (local paths or URIs): names in order and
    a fingerprint of names and sizes (nanochat.shardfs.fingerprint)."""
    from nanochat import shardfs

    return {"fingerprint": shardfs.fingerprint(shards), "names": [shardfs.name(s) for s in shards]}


def check_shard_set(step_dir: Path, saved: dict | None, current: dict, allow: bool) -> None:
    """Refuse to resume on other shards than `step_dir` was trained on, unless `allow`ed (--allow-new-shards):
    the last shard is the validation split and the data position counts the training shards in order."""
    if saved is None or saved["fingerprint"] == current["fingerprint"]:
        return
    before, now = saved["names"], current["names"]
    changes = [f"{verb} {', '.join(names)}" for verb, names in (
        ("added", [n for n in now if n not in before]), ("removed", [n for n in before if n not in now])) if names]
    if before[-1:] != now[-1:]:
        changes.append(f"the validation shard was {before[-1]}, now {now[-1]}")
    what = "; ".join(changes) or "the same names, other sizes (a shard was rewritten)"
    if allow:
        log.warning("--allow-new-shards: %s was trained on other shards (%s); continuing on these", step_dir, what)
        return
    raise CheckpointError(
        f"the shards are not the set {step_dir} was trained on: {what}. The last shard is the validation split and "
        "the saved data position counts the training shards in order, so the run would evaluate on other data and "
        "resume at another place in it. Restore those shards, or pass --allow-new-shards to continue on these."
    )


def load_model_state(path: str | Path, map_location: Any = "cpu") -> tuple[dict, dict]:
    """(state_dict without compile prefixes, meta) of a verified checkpoint, for eval and inference."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; use find_latest(root) to locate one")
    _verify(path)
    record = _read_record(path)
    state = _load_torch(path / MODEL_FILE, map_location)
    return {_strip_compile_prefix(k): v for k, v in state.items()}, record["meta"]


def read_meta(path: str | Path) -> dict:
    """The caller's metadata of the checkpoint at `path` (a step_* dir, or a root / run dir: its latest
    complete one), read without loading or hashing any weights."""
    step_dir = resolve_checkpoint(path)
    if not (step_dir / META_FILE).is_file():
        raise CheckpointError(f"{step_dir} is not a checkpoint (no {META_FILE}); pass a step_* directory or a run directory")
    return _read_record(step_dir)["meta"]


def _search_order(requested: str | Path | None, flag: str, recorded: str | None, default: Path,
                  default_name: str) -> list[tuple[Path, str]]:
    """(directory, why it is tried): an explicit flag alone; without one, what the checkpoint recorded, then the default."""
    if requested:
        return [(Path(requested), flag)]
    places = [(Path(recorded), "recorded in the checkpoint")] if recorded else []
    if not recorded or Path(recorded).resolve() != default.resolve():
        places.append((default, default_name))
    return places


def _first_holding(what: str, holds: Callable[[Path], bool], places: list[tuple[Path, str]], step_dir: Path, fix: str) -> Path:
    """The first of `places` that holds `what`, else one line naming every place tried and `fix`."""
    for directory, _ in places:
        if holds(directory):
            return directory
    tried = "; ".join(f"{directory} ({why})" for directory, why in places)
    raise CheckpointError(f"no {what} for {step_dir}: looked in {tried}. {fix}")


def tokenizer_dir_for(meta: dict, requested: str | Path | None, step_dir: Path) -> Path:
    """The directory to load the tokenizer of the checkpoint at `step_dir` (its `meta`) from: `requested`
    (--tokenizer-dir), else the one the checkpoint recorded, else $NANOCHAT_BASE_DIR/tokenizer. Only a
    missing tokenizer is refused here; check_tokenizer refuses a wrong one."""
    from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

    recorded = meta.get("tokenizer_dir")
    # the checkpoint's tokenizer is the only one that works: a new one would give its ids other meanings
    if recorded and Tokenizer.saved_in(recorded):  # only a wrong --tokenizer-dir gets here
        fix = f"It was trained with the tokenizer in {recorded}: drop --tokenizer-dir to use it."
    elif recorded:
        fix = f"It was trained with the tokenizer saved in {recorded}: if that moved, pass --tokenizer-dir <its new place>."
    else:
        fix = "Pass --tokenizer-dir <the directory of the tokenizer it was trained with>."
    places = _search_order(requested, "--tokenizer-dir", recorded, default_tokenizer_dir(), "$NANOCHAT_BASE_DIR/tokenizer")
    return _first_holding("tokenizer", Tokenizer.saved_in, places, step_dir, fix)


def data_dir_for(meta: dict, requested: str | Path | None, step_dir: Path) -> Path:
    """The shards to evaluate the checkpoint at `step_dir` (its `meta`) on: `requested` (--data-dir), else
    those it was trained on (recorded), else $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data."""
    from nanochat.dataset import BUILD_COMMAND, SHARD_GLOB, default_data_dir

    recorded, default = meta.get("data_dir"), default_data_dir()
    fix = (f"It was trained on the shards in {recorded}: if they moved, pass --data-dir <their new place>."
           if recorded else f"Pass --data-dir DIR, or build shards with `{BUILD_COMMAND} --out {default}`.")
    places = _search_order(requested, "--data-dir", recorded, default, "$NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    return _first_holding("shards", lambda d: any(d.glob(SHARD_GLOB)), places, step_dir, fix)


def load_for_inference(path: str | Path, device: str | torch.device, tokenizer_dir: str | Path | None = None) -> tuple:
    """(model in eval mode, its tokenizer, the step dir, meta) for evaluation and chat. The tokenizer is
    `tokenizer_dir` or the one the checkpoint recorded (tokenizer_dir_for), found and checked before any
    weights load; another tokenizer than the checkpoint's is refused."""
    # imported here: this module stays free of tokenizer logic
    from nanochat.tokenizer import Tokenizer

    step_dir = resolve_checkpoint(path)
    directory = tokenizer_dir_for(read_meta(step_dir), tokenizer_dir, step_dir)
    tokenizer = Tokenizer.load(directory)
    model, meta = load_model(step_dir, device)
    check_tokenizer(meta, tokenizer.fingerprint(), directory, step_dir)
    return model, tokenizer, step_dir, meta


def check_tokenizer(meta: dict, fingerprint: str, tokenizer_dir: str | Path, step_dir: Path) -> None:
    """Refuse a tokenizer other than the one the checkpoint was trained with: its ids would mean
    other strings, and every answer would be garbage without any error."""
    from nanochat.tokenizer import Tokenizer

    trained_with = meta.get("tokenizer")
    if trained_with in (None, fingerprint):
        return
    recorded = meta.get("tokenizer_dir")
    elsewhere = recorded and Path(recorded).resolve() != Path(tokenizer_dir).resolve() and Tokenizer.saved_in(recorded)
    fix = f"pass --tokenizer-dir {recorded}" if elsewhere else "pass --tokenizer-dir <the directory of the tokenizer it was trained with>"
    raise CheckpointError(f"the tokenizer in {tokenizer_dir} (fingerprint {fingerprint}) is not the one {step_dir} was "
                          f"trained with ({trained_with}{f', saved in {recorded}' if recorded else ''}); {fix}")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the GPT saved at `path` (a step_* dir, or a root whose latest complete one is used).

    Returns (model in eval mode on `device`, meta)."""
    from nanochat.gpt import GPT, GPTConfig  # the model module stays free of checkpoint logic

    state, meta = load_model_state(resolve_checkpoint(path), map_location=device)
    model = GPT(GPTConfig(**meta["model_config"])).to(device)
    model.load_state_dict(state)
    return model.eval(), meta
