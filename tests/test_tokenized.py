"""Token files (nanochat.tokenized) and shards read through URIs (nanochat.shardfs), without Ray."""

from __future__ import annotations

import functools
import http.server
import io
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from nanochat import shardfs
from nanochat.dataloader import pack_rows
from nanochat.dataset import list_shards
from nanochat.tokenized import (
    TokenFilesError,
    default_dir,
    find_token_files,
    open_token_files,
    packed_rows,
    tokenize_shards,
)
from nanochat.tokenizer import Tokenizer
from ray_jobs.data import row_items, work_items


@pytest.fixture(scope="module")
def token_files(data_dir, tokenizer_dir, tmp_path_factory):
    """The test shards tokenized by the CLI into their default place (a copy of the shards: data_dir is shared)."""
    copy = tmp_path_factory.mktemp("tokenized_data")
    for shard in list_shards(data_dir):
        shutil.copy(shard, copy / shard.name)
    subprocess.run([sys.executable, "-m", "nanochat.dataset", "tokenize", "--data-dir", str(copy),
                    "--tokenizer-dir", str(tokenizer_dir)], check=True, capture_output=True, text=True)
    return copy


def test_token_files_hold_the_plain_loaders_stream(token_files, tokenizer):
    shards = list_shards(token_files)
    files = find_token_files(token_files, tokenizer, shards)
    assert files is not None and files.directory == default_dir(token_files, tokenizer)
    for shard, counts in zip(shards, files.counts_of(shards), strict=True):
        for g, count in enumerate(counts):
            expected = [t for doc in shardfs.read_row_group(shard, g) for t in [tokenizer.bos_token_id, *tokenizer.encode(doc)]]
            np.testing.assert_array_equal(files.read(shard, g), expected)
            assert count == len(expected)


def test_rows_cut_from_counts_equal_packing_the_concatenated_stream(token_files, tokenizer):
    """row_items + packed_rows (what the Ray tasks do) against pack_rows over the whole stream, from a start
    whose offset runs past its row group, over two epochs."""
    shards = list_shards(token_files)[:-1]
    files = find_token_files(token_files, tokenizer, shards)
    streams = {(s, g): files.read(shard, g) for s, shard in enumerate(shards) for g in range(len(files.counts_of(shards)[s]))}
    order = list(streams)
    start = {"shard": 0, "row_group": 1, "offset": len(streams[(0, 1)]) + 5}
    row_len = 65
    stream = np.concatenate([streams[w] for w in order[1:]] + [streams[w] for w in order])[start["offset"]:]
    expected, _ = pack_rows(stream, row_len)
    items = work_items(shards, start, epochs=2)
    placed = row_items(items, [len(streams[(i["shard"], i["row_group"])]) for i in items], start["offset"], row_len)
    got = np.concatenate([packed_rows(files, shards, order, {**item, "index": order.index((item["shard"], item["row_group"]))},
                                      row_len) for item in placed])
    np.testing.assert_array_equal(got, expected)
    assert placed[0]["row_group"] == 2 and placed[0]["start"] == 5 and {i["epoch"] for i in placed} == {0, 1}


def test_another_tokenizer_or_a_rewritten_shard_is_refused(token_files, tokenizer, corpus_docs, tmp_path):
    shards = list_shards(token_files)
    other = Tokenizer.train(corpus_docs[:50], 300)
    assert find_token_files(token_files, other, shards) is None  # keyed by fingerprint: none for that one
    with pytest.raises(TokenFilesError, match="made by tokenizer"):
        open_token_files(default_dir(token_files, tokenizer), other, shards)
    changed = tmp_path / shards[0].name
    changed.write_bytes(shards[0].read_bytes() + b"\0")
    with pytest.raises(TokenFilesError, match="another version of shard"):
        find_token_files(token_files, tokenizer, [changed, *shards[1:]])
    with pytest.raises(TokenFilesError, match="--overwrite"):
        tokenize_shards([changed], tokenizer, default_dir(token_files, tokenizer))


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP range requests (as object stores and CDNs do): parquet readers fetch the
    footer and single row groups, not whole files."""

    def send_head(self):
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not ranged:
            return super().send_head()
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        first, last = int(ranged[1]), int(ranged[2] or len(data) - 1)
        body = data[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server(data_dir):
    """The test shards served over HTTP on 127.0.0.1, with a URL list of them."""
    root = data_dir.parent / "served_shards"
    root.mkdir(exist_ok=True)
    for shard in list_shards(data_dir):
        shutil.copy(shard, root / shard.name)
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    (root / "shards.txt").write_text("".join(f"{url}/{s.name}\n" for s in list_shards(root)))
    yield url
    server.shutdown()


def test_shards_read_through_file_and_http_uris_equal_the_local_ones(data_dir, http_server):
    local = list_shards(data_dir)
    for source in (f"file://{data_dir}", f"{http_server}/shards.txt"):
        remote = shardfs.list_shards(source)
        assert [shardfs.name(r) for r in remote] == [s.name for s in local]
        assert shardfs.row_group_sizes(remote) == shardfs.row_group_sizes(local)
        assert shardfs.read_row_group(remote[1], 2) == shardfs.read_row_group(local[1], 2)
        assert shardfs.size(remote[0]) == local[0].stat().st_size
