"""The Ray Data pipeline against the plain DataLoader and an independent reconstruction of the stream.

On the session's shared local Ray instance (conftest.py's `local_ray`).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import shutil
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader, pack_rows
from nanochat.dataset import DataError, list_shards, split_shards
from nanochat.tokenized import tokenize_shards
from ray_jobs.data import (
    POSITION_KEYS,
    build_dataset,
    check_shards,
    epochs_per_pass,
    iter_train_batches,
    resume_position,
)
from tests.test_data import write_row_groups
from tests.test_tokenized import http_server  # noqa: F401 (a fixture)

SEQ_LEN, BATCH = 64, 4
ROW_LEN = SEQ_LEN + 1
# half a CPU per tokenizer: two of them plus the packer fit in 2 CPUs
TOKENIZER_CPUS = 0.5


@pytest.fixture(scope="module")
def train_shards(data_dir):
    return split_shards(list_shards(data_dir), "train")


@pytest.fixture(scope="module")
def row_group_streams(train_shards, tokenizer) -> dict[tuple[int, int], np.ndarray]:
    """(shard, row_group) -> its BOS-prefixed token stream, read with pyarrow, one document at a time."""
    streams = {}
    for s, path in enumerate(train_shards):
        shard = pq.ParquetFile(path)
        for g in range(shard.num_row_groups):
            tokens = []
            for doc in shard.read_row_group(g).column("text").to_pylist():
                tokens += [tokenizer.bos_token_id] + tokenizer.encode(doc)
            streams[(s, g)] = np.array(tokens, dtype=np.int64)
    return streams


def stream_index(position: dict, streams: dict) -> int:
    """Index in the stream of epochs of a position (its offset may run past its row group)."""
    before = position["epoch"] * sum(len(tokens) for tokens in streams.values())
    for location, tokens in streams.items():
        if location == (position["shard"], position["row_group"]):
            return before + position["offset"]
        before += len(tokens)
    raise AssertionError(f"no row group {position}")


def take(batches, count: int) -> list:
    """The first `count` items of an endless batch generator, which is then closed (stops its executor)."""
    got = list(itertools.islice(batches, count))
    batches.close()
    return got


@pytest.fixture(scope="module")
def two_epochs(local_ray, train_shards, tokenizer_dir, row_group_streams):
    """All full batches of a pass of two epochs, tokenized by two actors: [(x, y, position)]."""
    total = sum(len(t) for t in row_group_streams.values())
    num_batches = 2 * total // ROW_LEN // BATCH
    ds = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, epochs=2, tokenize_num_cpus=TOKENIZER_CPUS)
    return take(iter_train_batches(ds.iterator(), BATCH, "cpu", epochs_per_pass=2), num_batches)


@pytest.fixture(scope="module")
def epoch(two_epochs):
    """The batches of the first epoch."""
    return [batch for batch in two_epochs if batch[2]["epoch"] == 0]


# -----------------------------------------------------------------------------


def test_streamed_batches_equal_the_plain_loader(two_epochs, epoch, train_shards, tokenizer, row_group_streams):
    """Across the epoch boundary too: the packer carries the first epoch's last tokens into the second."""
    plain = DataLoader(train_shards, tokenizer, BATCH, SEQ_LEN)
    for i, (x, y, position) in enumerate(two_epochs):
        px, py = next(plain)
        assert torch.equal(x, px) and torch.equal(y, py), f"batch {i} differs"
        assert x.dtype == torch.int64 and x.shape == (BATCH, SEQ_LEN)
        # two routes to the same place in the stream: our position and the plain loader's state
        assert position["epoch"] == plain.state_dict()["epoch"]
        assert stream_index(position, row_group_streams) == stream_index(
            plain.state_dict(), row_group_streams
        )
    assert {p["epoch"] for _, _, p in two_epochs} == {0, 1}
    assert len({p["shard"] for _, _, p in epoch}) == len(train_shards) >= 3
    assert len({(p["shard"], p["row_group"]) for _, _, p in epoch}) == len(row_group_streams) >= 12


def test_resume_continues_exactly(epoch, train_shards, tokenizer_dir, row_group_streams):
    def length(p: dict) -> int:
        return len(row_group_streams[(p["shard"], p["row_group"])])

    # A: a position whose offset runs past the end of shard 0's last row group, so resuming drops
    # tokens from there into shard 1. B: a position inside its row group, near the end of the epoch.
    last_of_shard0 = max(g for s, g in row_group_streams if s == 0)
    a = next(
        i
        for i, (_, _, p) in enumerate(epoch)
        if p["shard"] == 0 and p["row_group"] == last_of_shard0 and p["offset"] > length(p)
    )
    b = next(i for i in range(len(epoch) - 4, 0, -1) if epoch[i][2]["offset"] < length(epoch[i][2]))
    from_a = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, start=epoch[a][2], tokenize_concurrency=1)
    from_b = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, start=epoch[b][2], tokenize_concurrency=1)
    # One pass from A (the rest of the epoch), then every later pass from B: B stands in for the
    # full dataset here, so that one run checks both starts and the epoch count.
    batches = iter_train_batches(from_a.iterator(), BATCH, "cpu", epoch=5, next_passes=from_b.iterator())
    expected = epoch[a + 1 :] + epoch[b + 1 :]
    got = take(batches, len(expected))
    assert got[0][2]["shard"] == 1, "resuming from A starts in shard 1"
    for i, ((x, y, position), (ex, ey, expected_position)) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"resumed batch {i} differs"
        assert {**position, "epoch": 0} == expected_position
    assert [p["epoch"] for _, _, p in got] == [5] * (len(epoch) - a - 1) + [6] * (len(epoch) - b - 1)


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected) > 0
    for i, ((x, y, position), (ex, ey, expected_position)) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"batch {i} differs"
        assert position == expected_position, f"batch {i}: position {position} != {expected_position}"


@pytest.fixture(scope="module")
def token_files(train_shards, tokenizer, tmp_path_factory):
    return tokenize_shards(train_shards, tokenizer, tmp_path_factory.mktemp("tokens"))


def test_token_files_stream_the_batches_and_positions_of_the_tokenizing_pipeline(two_epochs, train_shards, tokenizer_dir,
                                                                                  token_files):
    ds = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, epochs=2, token_files=token_files)
    assert_same_batches(take(iter_train_batches(ds.iterator(), BATCH, "cpu", epochs_per_pass=2), len(two_epochs)),
                        two_epochs)


def test_token_files_resume_from_a_position_as_the_tokenizing_pipeline_does(epoch, train_shards, tokenizer_dir,
                                                                           token_files, row_group_streams):
    # a position whose offset runs past its row group (the end of shard 0), then passes from the start
    last_of_shard0 = max(g for s, g in row_group_streams if s == 0)
    a = next(i for i, (_, _, p) in enumerate(epoch) if (p["shard"], p["row_group"]) == (0, last_of_shard0)
             and p["offset"] > len(row_group_streams[(0, last_of_shard0)]))
    resumed = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, start=epoch[a][2], token_files=token_files)
    full = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, token_files=token_files)
    batches = iter_train_batches(resumed.iterator(), BATCH, "cpu", epoch=3, next_passes=full.iterator())
    expected = [(x, y, {**p, "epoch": 3}) for x, y, p in epoch[a + 1:]] + [(x, y, {**p, "epoch": 4}) for x, y, p in epoch]
    assert_same_batches(take(batches, len(expected)), expected)


def test_token_files_resumed_with_less_than_a_row_left_go_on_to_the_next_pass(epoch, train_shards, tokenizer_dir,
                                                                             token_files, row_group_streams):
    shard, row_group = max(row_group_streams)
    end = {"shard": shard, "row_group": row_group, "offset": len(row_group_streams[(shard, row_group)]) - 1}
    resumed = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, start=end, token_files=token_files)
    full = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, token_files=token_files)
    batches = iter_train_batches(resumed.iterator(), BATCH, "cpu", epoch=2, next_passes=full.iterator())
    assert_same_batches(take(batches, 3), [(x, y, {**p, "epoch": 3}) for x, y, p in epoch[:3]])


def test_a_pass_over_token_files_holds_the_run_when_its_length_is_known(train_shards, token_files, row_group_streams):
    actual = sum(len(tokens) for tokens in row_group_streams.values())
    for epochs_read in (0.5, 3, 7.5):
        assert epochs_per_pass(train_shards, int(epochs_read * actual), token_files) == math.ceil(epochs_read) + 1


def test_shards_listed_as_urls_stream_the_same_batches(local_ray, http_server, epoch, tokenizer_dir):  # noqa: F811
    shards = check_shards(f"{http_server}/shards.txt")
    assert all(str(s).startswith("http://") for s in shards)
    ds = build_dataset(shards, tokenizer_dir, SEQ_LEN, tokenize_concurrency=1, tokenize_num_cpus=TOKENIZER_CPUS)
    assert_same_batches(take(iter_train_batches(ds.iterator(), BATCH, "cpu"), len(epoch)), epoch)


def test_a_pass_holds_many_epochs_of_a_small_corpus_and_one_of_a_large(train_shards, row_group_streams, monkeypatch):
    from ray_jobs import data

    actual = sum(len(tokens) for tokens in row_group_streams.values())
    assert 0.25 < data.estimated_tokens(train_shards) / actual < 4, "the footer estimate is off by more than 4x"
    epochs = epochs_per_pass(train_shards)
    assert 1 < epochs and epochs * len(row_group_streams) <= data.ROW_GROUPS_PER_PASS
    monkeypatch.setattr(data, "ROW_GROUPS_PER_PASS", 10**9)
    assert epochs_per_pass(train_shards) * data.estimated_tokens(train_shards) >= data.TOKENS_PER_PASS
    # a run of known length gets no more epochs than it reads, with room for the estimate's error
    for epochs_read in (0.5, 3, 7.5):
        short = epochs_per_pass(train_shards, run_tokens=int(epochs_read * actual))
        assert epochs_read <= short < epochs_per_pass(train_shards) and short <= 2 * 4 * epochs_read + 1
    monkeypatch.setattr(data, "TOKENS_PER_PASS", actual // 10)  # a corpus ten times a pass: one epoch
    assert epochs_per_pass(train_shards) == 1


def test_resume_position_is_the_earliest():
    positions = [
        {"epoch": 1, "shard": 0, "row_group": 0, "offset": 10},
        {"epoch": 0, "shard": 2, "row_group": 1, "offset": 5},
        {"epoch": 0, "shard": 2, "row_group": 0, "offset": 900},  # runs past its row group: still earlier
        {"epoch": 0, "shard": 2, "row_group": 1, "offset": 0},
    ]
    assert resume_position(positions) == positions[2]
    assert resume_position(positions[:1]) == positions[0]
    with pytest.raises(ValueError, match="at least one"):
        resume_position([])


# -----------------------------------------------------------------------------
# bad shards: the error names the file, whichever stage finds the damage


def copy_shards(data_dir, tmp_path):
    for shard in list_shards(data_dir):
        shutil.copy(shard, tmp_path / shard.name)
    return split_shards(list_shards(tmp_path), "train")


def test_garbage_shard_is_named(local_ray, data_dir, tokenizer_dir, tmp_path):
    shards = copy_shards(data_dir, tmp_path)
    shards[1].write_bytes(b"this is not parquet" * 100)
    with pytest.raises(DataError, match=shards[1].name):
        build_dataset(shards, tokenizer_dir, SEQ_LEN)


def test_shard_without_text_column_is_named(local_ray, data_dir, tokenizer_dir, tmp_path):
    shards = copy_shards(data_dir, tmp_path)
    pq.write_table(pa.table({"body": ["a document"] * 8}), shards[2])
    with pytest.raises(DataError, match=shards[2].name):
        build_dataset(shards, tokenizer_dir, SEQ_LEN)


# -----------------------------------------------------------------------------


def test_two_consumers_get_disjoint_rows(local_ray, train_shards, tokenizer_dir, row_group_streams):
    stream = np.concatenate(list(row_group_streams.values()))
    all_rows, _ = pack_rows(stream, ROW_LEN)
    ds = build_dataset(train_shards, tokenizer_dir, SEQ_LEN, tokenize_concurrency=1)
    splits = ds.streaming_split(2, equal=True)
    received: list[list[tuple[int, np.ndarray]]] = [[], []]
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        try:
            read(i)
        except BaseException as err:  # surfaced below: a thread's exception would be lost
            errors.append(err)

    def read(i: int) -> None:
        for batch in splits[i].iter_batches(batch_size=None, batch_format="numpy"):
            columns = (batch["tokens"], *(batch[key] for key in POSITION_KEYS))
            for row, *place in zip(*columns, strict=True):
                position = dict(zip(POSITION_KEYS, map(int, place), strict=True))
                received[i].append((stream_index(position, row_group_streams), row))

    # the consumers of a streaming split must read at the same time
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(received[0]) == len(received[1]) > 0
    starts = [start for part in received for start, _ in part]
    assert len(set(starts)) == len(starts), "a row went to both consumers"
    for start, row in received[0] + received[1]:
        assert start % ROW_LEN == 0
        np.testing.assert_array_equal(row, all_rows[start // ROW_LEN])


# Last in the file: after a failed execution Ray frees its actors' CPUs only ~20 s later, and a
# test after it would wait for them.
def test_damaged_row_group_fails_iteration_naming_file_and_row_group(local_ray, data_dir, tokenizer, tokenizer_dir,
                                                                     tmp_path, caplog):
    # The footer is fine (so building succeeds). Row group 1 holds no rows: left out of the work, and
    # counted in the log. Row group 2 holds a text that is not UTF-8, which only the tokenizer actor
    # finds: its error must reach the consumer, the same error as the plain loader's.
    shards = copy_shards(data_dir, tmp_path)
    write_row_groups(shards[1], [["fine"] * 4, [], ["fine", "caf\xe9".encode("latin-1"), "fine"]])
    with caplog.at_level(logging.WARNING, logger="nanochat.dataset"):
        ds = build_dataset(shards, tokenizer_dir, SEQ_LEN, tokenize_concurrency=1)
    total = sum(pq.ParquetFile(s).num_row_groups for s in shards)
    assert caplog.messages == [f"skipping 1 empty row groups (zero rows) of {total}: {shards[1].name} row group 1"]
    message = re.escape(f"{shards[1]}: row group 2, document 1 is not valid UTF-8")
    # the consumer gets the DataError itself (wrapped by Ray, still an instance of it)
    with pytest.raises(DataError, match=message):
        take(iter_train_batches(ds.iterator(), BATCH, "cpu"), 10_000)
    with DataLoader(shards, tokenizer, BATCH, SEQ_LEN) as plain, pytest.raises(DataError, match=message):
        for _ in range(10_000):
            next(plain)
