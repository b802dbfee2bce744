"""`python -m nanochat.dataset download` against a local HTTP server: shards made here, served on
127.0.0.1 by http.server with Range support, and made to misbehave (a dropped connection, a damaged
file, a server that ignores Range) to check resume, retries and verification."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataloader import DataLoader
from nanochat.dataset import (
    DOWNLOAD_MANIFEST,
    FINEWEB_EDU_URL,
    DataError,
    build_shards,
    download_shards,
    list_shards,
    nonempty_row_groups,
    read_row_group,
    shard_requests,
    split_shards,
)

NAMES = ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]  # 2 train shards + upstream's val
FAST = {"backoff_s": 0.01, "timeout_s": 10.0}


@dataclass
class Served:
    """What the server holds and how it misbehaves; `log` records (file, Range header) of every GET."""

    files: dict[str, bytes]
    drops: dict[str, int] = field(default_factory=dict)  # responses cut off halfway, per file
    corrupt: dict[str, int] = field(default_factory=dict)  # responses of zeros instead of the file, per file
    ignore_range: bool = False
    log: list[tuple[str, str | None]] = field(default_factory=list)

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for file, rng in self.log if file == name]


def make_handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            served.log.append((name, self.headers.get("Range")))
            if name not in served.files:
                self.send_error(404)
                return
            data = served.files[name]
            if served.corrupt.get(name, 0) > 0:
                served.corrupt[name] -= 1
                data = bytes(len(data))
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and not served.ignore_range:
                start = int(match[1])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if served.drops.get(name, 0) > 0:  # HTTP/1.0: the connection closes when the handler returns
                served.drops[name] -= 1
                body = body[: len(body) // 2]
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


def upstream_like_shard(docs: list[str]) -> bytes:
    """A shard written the way upstream's repackaging script writes them: one string column `text`,
    fixed-size row groups, zstd."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": docs}), sink, row_group_size=64, compression="zstd")
    return sink.getvalue().to_pybytes()


@pytest.fixture
def served() -> Iterator[tuple[Served, str]]:
    docs = {name: [f"{name} document {i}: " + "some educational text. " * (i % 7 + 1) for i in range(150)]
            for name in NAMES}
    state = Served({name: upstream_like_shard(d) for name, d in docs.items()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/datasets/fineweb"
    server.shutdown()
    server.server_close()


def assert_downloaded(out: Path, state: Served) -> None:
    assert [p.name for p in list_shards(out)] == NAMES
    for name in NAMES:
        assert (out / name).read_bytes() == state.files[name], name
    assert not list(out.glob("*.tmp"))


# -----------------------------------------------------------------------------
# the request list: upstream's real URL and shard count, no network


def test_request_list_is_upstreams_fineweb_edu_shards_with_its_last_shard_for_validation():
    base = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    assert FINEWEB_EDU_URL == base
    assert shard_requests(2) == [
        ("shard_00000.parquet", f"{base}/shard_00000.parquet"),
        ("shard_00001.parquet", f"{base}/shard_00001.parquet"),
        ("shard_01822.parquet", f"{base}/shard_01822.parquet"),
    ]
    everything = shard_requests(1822)
    assert len(everything) == 1823 and everything[-1][0] == "shard_01822.parquet"
    assert [name for name, _ in everything] == sorted(name for name, _ in everything), "val sorts last"
    for bad in (0, 1823):
        with pytest.raises(DataError, match="give 1 to 1822 training shards"):
            shard_requests(bad)


# -----------------------------------------------------------------------------
# downloads


def test_downloaded_shards_are_the_served_files_and_the_loaders_read_them(served, tmp_path, tokenizer, capsys):
    state, url = served
    out = tmp_path / "data"
    dataset.main(["download", "--shards", "2", "--out", str(out), "--base-url", url, "--workers", "3"])
    assert_downloaded(out, state)
    assert "shard_01822.parquet" in capsys.readouterr().out
    assert json.loads((out / DOWNLOAD_MANIFEST).read_text())["shards"] == {n: len(state.files[n]) for n in NAMES}
    shards = list_shards(out)
    assert split_shards(shards, "val") == [out / "shard_01822.parquet"]
    train = split_shards(shards, "train")
    assert read_row_group(train[1], 2) == pq.read_table(pa.BufferReader(state.files[NAMES[1]])).column(
        "text").to_pylist()[128:150]
    assert len(nonempty_row_groups(train)) == 6
    x, y = next(DataLoader(train, tokenizer, batch_size=2, seq_len=32, prefetch=0))
    assert x.shape == y.shape == (2, 32)

    # complete shards are skipped: a second run sends no request; a wider one fetches only the new shard
    state.log.clear()
    download_shards(2, out, url, **FAST)
    assert state.log == []
    state.files["shard_00002.parquet"] = state.files["shard_00000.parquet"]
    download_shards(3, out, url, **FAST)
    assert state.log == [("shard_00002.parquet", None)]
    assert split_shards(list_shards(out), "val") == [out / "shard_01822.parquet"], "val stays the last shard"


def test_a_dropped_connection_is_resumed_with_a_range_request(served, tmp_path):
    state, url = served
    state.drops["shard_00001.parquet"] = 2
    size = len(state.files["shard_00001.parquet"])
    download_shards(2, tmp_path, url, attempts=3, **FAST)
    assert_downloaded(tmp_path, state)
    half = size // 2
    assert state.requests_for("shard_00001.parquet") == [None, f"bytes={half}-", f"bytes={half + (size - half) // 2}-"]


def test_a_download_out_of_attempts_keeps_its_partial_file_and_the_next_run_resumes_it(served, tmp_path):
    state, url = served
    state.drops["shard_01822.parquet"] = 10
    with pytest.raises(DataError, match=r"1 of 3 shards failed; run `python -m nanochat.dataset download` again") as err:
        download_shards(2, tmp_path, url, attempts=2, **FAST)
    assert "connection closed at" in str(err.value) and "attempt 2 of 2" in str(err.value)
    partial = tmp_path / "shard_01822.parquet.tmp"
    kept = partial.stat().st_size
    assert 0 < kept < len(state.files["shard_01822.parquet"])
    assert [p.name for p in tmp_path.glob("shard_*.parquet")] != NAMES, "no val shard until it is whole"

    state.drops.clear()
    state.log.clear()
    download_shards(2, tmp_path, url, **FAST)
    assert_downloaded(tmp_path, state)
    assert state.log == [("shard_01822.parquet", f"bytes={kept}-")]


def test_a_server_that_ignores_range_restarts_the_partial_file(served, tmp_path):
    state, url = served
    state.ignore_range = True
    (tmp_path / "shard_00000.parquet.tmp").write_bytes(b"stale bytes from another file")
    download_shards(2, tmp_path, url, **FAST)
    assert_downloaded(tmp_path, state)
    assert state.requests_for("shard_00000.parquet") == ["bytes=29-"]


def test_a_damaged_file_is_fetched_again_once_then_refused_naming_it(served, tmp_path):
    state, url = served
    state.corrupt = {"shard_00000.parquet": 1, "shard_00001.parquet": 2}
    with pytest.raises(DataError, match="1 of 3 shards failed") as err:
        download_shards(2, tmp_path, url, **FAST)
    assert re.search(r"shard_00001.parquet is not a usable shard, twice: not a readable parquet file", str(err.value))
    assert state.requests_for("shard_00000.parquet") == [None, None], "fetched afresh, not resumed"
    assert (tmp_path / "shard_00000.parquet").read_bytes() == state.files["shard_00000.parquet"]
    assert not (tmp_path / "shard_00001.parquet").exists() and not list(tmp_path.glob("*.tmp"))

    state.log.clear()
    download_shards(2, tmp_path, url, **FAST)
    assert_downloaded(tmp_path, state)
    assert state.log == [("shard_00001.parquet", None)]


def test_a_missing_file_fails_at_once_and_foreign_shards_are_refused(served, tmp_path):
    state, url = served
    with pytest.raises(DataError, match="HTTP 404") as err:
        download_shards(3, tmp_path / "a", url, **FAST)
    assert "shard_00002.parquet" in str(err.value) and state.requests_for("shard_00002.parquet") == [None]

    built = tmp_path / "built"
    build_shards([f"doc {i}" for i in range(8)], built, docs_per_row_group=2, val_docs=2)
    state.log.clear()
    with pytest.raises(DataError, match="already holds 2 shards that no download wrote"):
        download_shards(2, built, url, **FAST)
    assert state.log == []
