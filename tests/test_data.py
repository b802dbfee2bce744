"""Shards, sources and the packing loader, each checked against an independent reconstruction."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataset
from nanochat.corpus import NUM_CHAPTERS, embedded_corpus
from nanochat.dataloader import DataLoader, pack_rows
from nanochat.dataset import (
    DataError,
    build_shards,
    iter_source,
    list_shards,
    num_row_groups,
    read_row_group,
    split_shards,
)
from nanochat.train.base import BaseTrainConfig
from nanochat.train.base import setup as base_setup

# -----------------------------------------------------------------------------
# helpers: read shards with pyarrow directly and tokenize one document at a time, so the
# expected values do not go through the code under test


def row_groups_of(shards) -> list[tuple[int, int]]:
    return [(s, g) for s, path in enumerate(shards) for g in range(pq.ParquetFile(path).num_row_groups)]


def expected_stream(shards, tokenizer, rank: int, world_size: int) -> np.ndarray:
    """One epoch of the BOS-prefixed token stream that `rank` should see."""
    tokens: list[int] = []
    for s, g in row_groups_of(shards)[rank::world_size]:
        for doc in pq.ParquetFile(shards[s]).read_row_group(g).column("text").to_pylist():
            tokens += [tokenizer.bos_token_id] + tokenizer.encode(doc)
    return np.array(tokens, dtype=np.int64)


def rows_from_batch(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    assert torch.equal(x[:, 1:], y[:, :-1]), "y must be x shifted by one"
    return torch.cat([x[:, :1], y], dim=1).numpy()


def write_parquet(path, table: pa.Table) -> None:
    pq.write_table(table, path)


def write_row_groups(path, row_groups: list[list]) -> None:
    """One parquet row group per list, as given: empty ones too, and bytes that are not UTF-8 in a string column."""
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for docs in row_groups:
            # view: the bytes go in as they are (a string array built from str would be valid UTF-8)
            column = pa.array([d.encode() if isinstance(d, str) else d for d in docs], type=pa.binary()).view(pa.string())
            writer.write_table(pa.table({"text": column}))


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nanochat-loader"]


@pytest.fixture(scope="module")
def train_shards(data_dir):
    return split_shards(list_shards(data_dir), "train")


# -----------------------------------------------------------------------------
# embedded corpus


def test_embedded_corpus_is_the_whole_bible_by_chapter():
    docs = list(embedded_corpus())
    assert len(docs) == NUM_CHAPTERS == 1189
    assert all(doc.strip() for doc in docs)
    assert docs[0].startswith("Genesis 1\nIn the beginning God created the heavens and the earth.")
    assert docs[-1].startswith("Revelation 22\n")
    assert not any(doc.split("\n", 1)[1].startswith("1. ") for doc in docs), "verse numbers are stripped"
    assert 3_500_000 < sum(map(len, docs)) < 6_000_000


# -----------------------------------------------------------------------------
# building and reading shards


def test_shards_give_back_exactly_the_documents(data_dir, corpus_docs):
    shards = list_shards(data_dir)
    read_back = [
        doc for shard in shards for g in range(num_row_groups(shard)) for doc in read_row_group(shard, g)
    ]
    assert read_back == corpus_docs
    rows = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    assert sum(rows) == len(corpus_docs)
    # the last shard is validation and holds the last val_docs documents
    (val,) = split_shards(shards, "val")
    assert val == shards[-1] and split_shards(shards, "train") == shards[:-1]
    assert [doc for g in range(num_row_groups(val)) for doc in read_row_group(val, g)] == corpus_docs[-16:]
    # layout: 16 docs per row group, 4 row groups per train shard
    assert [pq.ParquetFile(s).metadata.row_group(0).num_rows for s in shards] == [16] * len(shards)
    assert all(num_row_groups(s) == 4 for s in shards[:-2])


def test_build_refuses_to_mix_with_old_shards(tmp_path):
    docs = [f"document {i}" for i in range(30)]
    first = build_shards(docs, tmp_path, docs_per_row_group=2, row_groups_per_shard=2, val_docs=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shards(docs, tmp_path, docs_per_row_group=2)
    second = build_shards(
        docs, tmp_path, docs_per_row_group=10, row_groups_per_shard=2, val_docs=10, overwrite=True
    )
    assert len(second) < len(first) and list_shards(tmp_path) == second
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.building")), "staging dir is cleaned up"


def test_build_needs_more_documents_than_val_docs(tmp_path):
    with pytest.raises(ValueError, match="val_docs"):
        build_shards(["a", "b"], tmp_path, val_docs=2)
    assert not list(tmp_path.glob("*.parquet"))


def test_list_shards_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="nanochat.dataset build"):
        list_shards(tmp_path)


def test_bad_shards_raise_data_error_naming_the_file(tmp_path, tokenizer):
    no_text = tmp_path / "shard_00000.parquet"
    write_parquet(no_text, pa.table({"body": ["a", "b"]}))
    garbage = tmp_path / "shard_00001.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    for bad in (no_text, garbage):
        with pytest.raises(DataError, match=bad.name):
            num_row_groups(bad)
        with pytest.raises(DataError, match=bad.name):
            read_row_group(bad, 0)
        with pytest.raises(DataError, match=bad.name):
            DataLoader([bad], tokenizer, batch_size=1, seq_len=8)
    nulls = tmp_path / "nulls.parquet"
    write_parquet(nulls, pa.table({"text": ["ok", None]}))
    with pytest.raises(DataError, match="null"):
        read_row_group(nulls, 0)


def test_text_that_is_not_utf8_names_the_file_row_group_and_document(tmp_path, tokenizer):
    bad = tmp_path / "latin1.parquet"
    write_row_groups(bad, [["fine", "also fine"], ["fine", "caf\xe9 au lait".encode("latin-1"), "fine"]])
    message = re.escape(f"{bad}: row group 1, document 1 is not valid UTF-8 (invalid continuation byte at byte 3)")
    # every reader of shards: the row group reader, a parquet source for `build`, the loader
    with pytest.raises(DataError, match=message):
        read_row_group(bad, 1)
    with pytest.raises(DataError, match=message):
        list(iter_source(str(bad)))
    with DataLoader([bad], tokenizer, batch_size=1, seq_len=8) as loader, pytest.raises(DataError, match=message):
        for _ in range(100):  # row group 0 first, then the bad one
            next(loader)
    assert read_row_group(bad, 0) == ["fine", "also fine"]


def test_empty_row_groups_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    docs = [f"document number {i} of a few" for i in range(12)]
    with_empty = tmp_path / "with_empty.parquet"
    write_row_groups(with_empty, [[], docs[:5], [], [], docs[5:], []])
    plain = tmp_path / "plain.parquet"
    write_row_groups(plain, [docs[:5], docs[5:]])
    with caplog.at_level(logging.WARNING, logger="nanochat.dataset"):
        loader = DataLoader([with_empty], tokenizer, batch_size=2, seq_len=15, prefetch=0)
    assert caplog.messages == [
        "skipping 4 empty row groups (zero rows) of 6: with_empty.parquet row group 0, with_empty.parquet row group 2, "
        "with_empty.parquet row group 3, with_empty.parquet row group 5"
    ]
    # two routes to one stream: the same documents without the empty row groups, over two epochs
    reference = DataLoader([plain], tokenizer, batch_size=2, seq_len=15, prefetch=0)
    while reference.epoch == 0:
        x, y = next(loader)
        rx, ry = next(reference)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert loader.epoch == 1 and loader.state_dict()["row_group"] in (1, 4)
    with pytest.raises(ValueError, match="that hold documents"):
        write_row_groups(tmp_path / "none.parquet", [[], []])
        DataLoader([tmp_path / "none.parquet"], tokenizer, batch_size=1, seq_len=8)


# -----------------------------------------------------------------------------
# sources


def test_local_sources_agree(tmp_path):
    docs = ["First doc,\nline two.", "Second doc.", "Third: émoji 👍"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n\n".join(docs[:2]) + "\n\n  \n\n", encoding="utf-8")
    with (tmp_path / "src" / "b.jsonl").open("w", encoding="utf-8") as f:
        f.write(json.dumps({"text": docs[2], "id": 7}) + "\n\n")
    write_parquet(tmp_path / "c.parquet", pa.table({"text": docs}))
    assert list(iter_source(str(tmp_path / "src" / "a.txt"))) == docs[:2]
    assert list(iter_source(str(tmp_path / "src"))) == docs
    assert list(iter_source(str(tmp_path / "c.parquet"))) == docs
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        list(iter_source(str(tmp_path / "bad.jsonl")))
    with pytest.raises(FileNotFoundError):
        iter_source(str(tmp_path / "missing.txt"))


def test_hf_source_reads_a_local_dataset_offline(tmp_path):
    if (
        importlib.util.find_spec("datasets") is None
    ):  # not importorskip: importing it first would defeat the offline default
        pytest.skip("datasets is not installed")
    docs = ["one", "two 👍", "three"]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert list(iter_source(f"hf:{tmp_path / 'ds'}")) == docs
    with pytest.raises(DataError, match="local HF cache"):
        list(iter_source("hf:surely-not/a-cached-dataset"))


def test_hf_source_streams_rows_before_the_whole_set_is_read(tmp_path):
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets is not installed")
    docs = ["one", "two 👍", "three"]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "ds" / "b.jsonl").write_text('{"text": "four"}\nnot json\n')
    # a load that prepared the whole set before the first row would fail here, on b.jsonl
    stream = iter_source(f"hf:{tmp_path / 'ds'}")
    assert [next(stream) for _ in docs] == docs
    with pytest.raises(DataError, match=r"hf:.*ds: reading failed after 3 documents \(.*JSON"):
        next(stream)


def test_cli_build_and_list(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"paragraph {i} " * 5 for i in range(25)), encoding="utf-8")
    out = tmp_path / "shards"
    dataset.main(
        ["build", "--source", str(src), "--out", str(out), "--docs-per-row-group", "4", "--val-docs", "5"]
    )
    shards = list_shards(out)
    assert sum(pq.ParquetFile(s).metadata.num_rows for s in shards) == 25
    assert pq.ParquetFile(shards[-1]).metadata.num_rows == 5
    dataset.main(["list", "--data-dir", str(out)])
    printed = capsys.readouterr().out
    assert shards[-1].name in printed and "val" in printed


# -----------------------------------------------------------------------------
# packing and loading


@pytest.mark.parametrize("length,row_len", [(0, 5), (4, 5), (5, 5), (23, 5), (1000, 129)])
def test_pack_rows_keeps_every_token_in_order(length, row_len):
    tokens = np.arange(length, dtype=np.int64) * 7 % 1000
    rows, rest = pack_rows(tokens, row_len)
    assert rows.shape == (length // row_len, row_len)
    assert len(rest) < row_len
    assert np.array_equal(np.concatenate([rows.ravel(), rest]), tokens)


def test_pack_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        pack_rows(np.zeros((2, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="row_len"):
        pack_rows(np.zeros(3, dtype=np.int64), 1)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_loader_yields_the_token_stream_in_order_across_epochs(train_shards, tokenizer, rank, world_size):
    batch_size, seq_len = 8, 127
    epoch = expected_stream(train_shards, tokenizer, rank, world_size)
    num_batches = int(1.5 * len(epoch)) // (batch_size * (seq_len + 1)) + 1
    loader = DataLoader(train_shards, tokenizer, batch_size, seq_len, rank=rank, world_size=world_size)
    got = []
    for _ in range(num_batches):
        x, y = next(loader)
        assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == torch.int64
        got.append(rows_from_batch(x, y).ravel())
    got = np.concatenate(got)
    assert np.array_equal(got, np.concatenate([epoch, epoch])[: len(got)])
    assert loader.epoch == 1


def test_ranks_read_disjoint_row_groups_covering_all(train_shards, tokenizer):
    seen = []
    for rank in range(2):
        loader = DataLoader(train_shards, tokenizer, batch_size=2, seq_len=255, rank=rank, world_size=2)
        visited = set()
        while loader.epoch == 0:
            state = loader.state_dict()
            visited.add((state["shard"], state["row_group"]))
            next(loader)
        seen.append(visited)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(row_groups_of(train_shards))


def test_resume_yields_exactly_the_batches_that_would_have_come(train_shards, tokenizer):
    batch_size, seq_len, following = 4, 255, 4
    reference = DataLoader(train_shards, tokenizer, batch_size, seq_len)
    states, batches = [], []

    def step():
        states.append(reference.state_dict())
        batches.append(next(reference))

    while reference.epoch == 0:
        step()
    for _ in range(following + 1):  # into the second epoch
        step()
    # resume points: the start, every row-group change, the last batch before and after the wrap
    row_group_changes = [
        k
        for k in range(1, len(states))
        if (states[k]["shard"], states[k]["row_group"])
        != (states[k - 1]["shard"], states[k - 1]["row_group"])
    ]
    wrap = next(k for k, s in enumerate(states) if s["epoch"] == 1)
    resume_points = sorted(
        {0, 1, wrap - 1, wrap, *row_group_changes[::3]} & set(range(len(states) - following))
    )
    assert len(resume_points) >= 5
    for k in resume_points:
        resumed = DataLoader(
            train_shards, tokenizer, batch_size, seq_len, state=json.loads(json.dumps(states[k]))
        )
        for expected_x, expected_y in batches[k : k + following]:
            x, y = next(resumed)
            assert torch.equal(x, expected_x) and torch.equal(y, expected_y), (
                f"resume from batch {k} diverged"
            )


def test_resume_state_does_not_depend_on_batch_size(train_shards, tokenizer):
    big = DataLoader(train_shards, tokenizer, batch_size=8, seq_len=63)
    for _ in range(37):
        next(big)
    small = DataLoader(train_shards, tokenizer, batch_size=2, seq_len=63, state=big.state_dict())
    x, y = next(big)
    small_rows = np.concatenate([rows_from_batch(*next(small)) for _ in range(4)])
    assert np.array_equal(small_rows, rows_from_batch(x, y))


def test_loader_refuses_states_and_ranks_it_cannot_serve(train_shards, tokenizer):
    with pytest.raises(ValueError, match="no row groups"):
        DataLoader(train_shards[:1], tokenizer, 1, 8, rank=5, world_size=6)
    other_ranks_row_group = {"epoch": 0, "shard": 0, "row_group": 1, "offset": 0}
    with pytest.raises(ValueError, match="same shards, rank and world_size"):
        DataLoader(train_shards, tokenizer, 1, 8, rank=0, world_size=2, state=other_ranks_row_group)
    past_the_end = {"epoch": 0, "shard": 0, "row_group": 0, "offset": 10**9}
    with pytest.raises(ValueError, match="tokenizer changed"):
        DataLoader(train_shards, tokenizer, 1, 8, state=past_the_end)


@pytest.mark.gpu
def test_cuda_batches_match_cpu_batches(train_shards, tokenizer):
    on_cpu = DataLoader(train_shards, tokenizer, 4, 64)
    on_gpu = DataLoader(train_shards, tokenizer, 4, 64, device="cuda")
    for _ in range(3):
        (cx, cy), (gx, gy) = next(on_cpu), next(on_gpu)
        assert gx.is_cuda and torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)


# -----------------------------------------------------------------------------
# closing: the prefetch thread and its batches go with the loader


def test_closed_loader_stops_its_thread_and_hands_out_nothing(train_shards, tokenizer):
    before = loader_threads()
    loader = DataLoader(train_shards, tokenizer, 2, 31, prefetch=2)
    first = next(loader)
    # the thread cuts batches until the queue is full, then waits for room: close() must free it
    deadline = time.monotonic() + 30
    while not loader._ready.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loader._ready.full() and len(loader_threads()) == len(before) + 1
    loader.close()
    assert loader_threads() == before and loader._ready.empty()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    loader.close()  # twice is fine
    with DataLoader(train_shards, tokenizer, 2, 31) as again:
        assert torch.equal(next(again)[0], first[0])
    assert loader_threads() == before


def test_evaluations_leave_no_thread_behind(data_dir, tokenizer_dir):
    cfg = BaseTrainConfig(device="cpu", data_dir=str(data_dir), tokenizer_dir=str(tokenizer_dir), depth=2, head_dim=32,
                          max_seq_len=64, device_batch_size="4", total_batch_size=256, eval_tokens=512,
                          compile="off")
    run = base_setup(cfg, torch.device("cpu"))
    first = run.evaluate()  # anything the first evaluation starts for good (torch's pools) is counted before
    threads = threading.enumerate()
    results = [run.evaluate() for _ in range(10)]
    assert threading.enumerate() == threads
    assert results == [first] * 10, "each evaluation reads the same batches"
