"""Runs and checkpoints in object storage: a real S3-compatible server (moto's, started here on 127.0.0.1)
read through the same functions as a local disk; shards read from a bucket as from a folder. The Ray Train run that keeps its checkpoints there, is
killed and resumes is in tests/test_ray_train.py (test_killed_worker_resumes_from_its_checkpoint).

    python -m pytest tests/test_storage.py -q
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from nanochat import checkpoint, shardfs
from nanochat.checkpoint import CheckpointError
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_shards, split_shards
from nanochat.scripts import tok_eval, tok_train
from ray_jobs.train import RunStorage
from tests.conftest import free_port

KEY, SECRET = "testing", "testing"  # any pair signs requests to moto


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port

    def uri(self, prefix: str = "") -> str:
        """s3://KEY:SECRET@BUCKET/PREFIX?... on this server (a fresh bucket each call) as --storage-path takes it.
        The key pair rides in the URI: the Ray processes of the tests' shared cluster started before any test
        could export it, and pyarrow pickles a file system's explicit keys to every process that uses it."""
        bucket = f"runs-{uuid.uuid4().hex[:12]}"
        pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1", access_key=KEY,
                          secret_key=SECRET, allow_bucket_creation=True).create_dir(bucket)
        return f"s3://{KEY}:{SECRET}@{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's standalone S3 server in a process of its own, for the whole session (it starts in ~2 s)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"moto's S3 server did not start on 127.0.0.1:{port} (exit code {server.poll()})")
            time.sleep(0.1)
    yield S3Server(f"127.0.0.1:{port}")
    server.terminate()
    server.wait(timeout=10)


def tiny_checkpoint(root: Path, step: int = 3) -> Path:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    return checkpoint.save_checkpoint(root, step, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      scaler=None, loader_state={"row": step}, meta={"run_id": "r1"})


def upload(local_dir: Path, storage: RunStorage) -> str:
    """Copy a local checkpoint dir into the run's folder in storage (as Ray Train does); returns its path there."""
    path = f"{storage.path}/{local_dir.name}"
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=storage.fs)
    return path


def test_a_storage_uri_names_a_folder_in_its_file_system(s3):
    uri = s3.uri("runs")
    storage = RunStorage.of(uri, "base_d2")
    bucket = uri.split("@", 1)[1].split("/")[0]
    assert not storage.local and storage.path == f"{bucket}/runs/base_d2"
    assert storage.show(f"{storage.path}/step_000004") == f"s3://{bucket}/runs/base_d2/step_000004"
    assert storage.run_config() == {"name": "base_d2", "storage_path": f"{bucket}/runs", "storage_filesystem": storage.fs}
    assert storage.latest_checkpoint() is None, "a new run: nothing to restore"
    local = RunStorage.of("relative/runs", "x")
    assert local.local and local.path == str(Path("relative/runs").resolve() / "x")
    assert local.run_config()["storage_filesystem"] is None


def test_a_checkpoint_in_object_storage_reads_as_it_does_on_disk(s3, tmp_path):
    local = tiny_checkpoint(tmp_path)
    storage = RunStorage.of(s3.uri("runs"), "one")
    remote = upload(local, storage)
    on_disk = checkpoint.load_checkpoint(local, restore_rng=False)
    in_storage = checkpoint.read_state(remote, storage.fs)
    assert {k: v for k, v in in_storage.items() if k != "path"} == {k: v for k, v in on_disk.items() if k != "path"}
    checkpoint.verify_checkpoint(remote, storage.fs)  # the full check, on request, reads every object


def test_a_truncated_object_is_refused_without_hashing(s3, tmp_path):
    storage = RunStorage.of(s3.uri("runs"), "one")
    remote = upload(tiny_checkpoint(tmp_path), storage)
    with storage.fs.open_output_stream(f"{remote}/model.pt") as f:  # half an upload, as a cut-short copy leaves it
        f.write((tmp_path / "step_000003" / "model.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.pt has 100 bytes, the manifest says"):
        checkpoint.read_state(remote, storage.fs)
    storage.fs.delete_file(f"{remote}/manifest.json")
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        checkpoint.read_state(remote, storage.fs)


def test_the_run_owner_is_kept_in_object_storage(s3, tmp_path):
    storage = RunStorage.of(s3.uri("runs"), "owned")
    assert checkpoint.run_owner(storage.path, storage.fs) is None
    assert checkpoint.resume_run(storage.path, None, False, "--name", storage.fs)[1] is None, "a new run starts"
    checkpoint.claim_run_dir(storage.path, "r1", storage.fs)
    assert checkpoint.run_owner(storage.path, storage.fs) == "r1"
    with pytest.raises(CheckpointError, match="claimed by run r1"):
        checkpoint.claim_run_dir(storage.path, "r2", storage.fs)
    with pytest.raises(CheckpointError, match=r"already holds run r1 \(stopped before its first checkpoint\); pass --resume"):
        checkpoint.resume_run(storage.path, None, False, "--name", storage.fs)

    # resuming: the owner's run id, and the checkpoint's state read from storage
    remote = upload(tiny_checkpoint(tmp_path), storage)
    run_id, state = checkpoint.resume_run(storage.path, remote, True, "--name", storage.fs)
    assert run_id == "r1" and state["loader_state"] == {"row": 3}
    # a checkpoint another run wrote is refused, as on disk
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "step_000003", other / "step_000005")
    meta = (other / "step_000005" / "meta.json").read_text().replace('"run_id": "r1"', '"run_id": "r9"')
    (other / "step_000005" / "meta.json").write_text(meta)
    foreign = upload(other / "step_000005", storage)
    with pytest.raises(CheckpointError, match="written by run r9"):
        checkpoint.resume_run(storage.path, foreign, True, "--name", storage.fs)


def upload_shards(data_dir: Path, s3: S3Server) -> str:
    """The shards of `data_dir` in a fresh bucket; returns the --data-dir URI of their folder there."""
    uri = s3.uri("data")
    fs, path = shardfs.filesystem(uri)
    pafs.copy_files(str(data_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def test_shards_in_object_storage_stream_as_they_do_from_disk(s3, data_dir, tokenizer):
    uri = upload_shards(data_dir, s3)
    local, remote = list_shards(data_dir), shardfs.list_shards(uri)
    assert [shardfs.name(s) for s in remote] == [s.name for s in local] and all(shardfs.is_uri(s) for s in remote)
    assert checkpoint.shard_set(remote) == checkpoint.shard_set(local), "the same set, wherever it is read from"
    assert tok_eval.validation_texts(uri, None) == tok_eval.validation_texts(data_dir, None)
    texts = functools.partial(tok_train.training_texts, max_chars=10**6, doc_cap=10**4)
    assert list(texts(split_shards(remote, "train"))) == list(texts(split_shards(local, "train")))

    def batches(shards: list) -> list:
        with DataLoader(split_shards(shards, "train"), tokenizer, 4, 64, "cpu") as loader:
            return [(*next(loader), loader.state_dict()) for _ in range(12)]

    for (x, y, state), (rx, ry, remote_state) in zip(batches(local), batches(remote), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry) and state == remote_state
