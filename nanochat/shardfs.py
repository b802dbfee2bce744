"""Shards wherever they live: a local directory, object storage or a list of URLs.

A data source is one of
  DIR                           a local directory of shard_*.parquet (nanochat.dataset's layout)
  s3://bucket/prefix, gs://..., file:///dir, any URI pyarrow.fs or fsspec knows: the same layout there
  LIST.txt or https://.../LIST.txt   one shard URI per line, in stream order (the last one is validation)

Local paths stay `Path`s and go through `nanochat.dataset` (its errors, its checks); URIs are opened
with pyarrow's own file systems (s3, gs, hdfs, file) or, for schemes it lacks (http, https, ...),
fsspec's behind `pyarrow.fs.PyFileSystem`. Nothing is copied to local disk first.
"""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nanochat import dataset
from nanochat.dataset import NoShardsError

Source = str | Path  # a local path, or a URI string


def is_uri(source: Source) -> bool:
    return isinstance(source, str) and "://" in source


def as_source(shard: Source) -> Source:
    """A shard as the readers take it: a URI string, or a Path for anything local."""
    return shard if is_uri(shard) else Path(shard)


def filesystem(source: Source) -> tuple[pafs.FileSystem, str]:
    """(file system, path in it) of a local path or a URI."""
    if not is_uri(source):
        return pafs.LocalFileSystem(), str(Path(source).resolve())
    try:
        return pafs.FileSystem.from_uri(source)
    except pa.ArrowInvalid:  # a scheme pyarrow has no file system for: fsspec's (needs its package, e.g. aiohttp)
        fs, path = fsspec.core.url_to_fs(source)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def absolute(source: Source) -> str:
    """A source as every node names it: a URI unchanged, a local path made absolute."""
    return source if is_uri(source) else str(Path(source).resolve())


def join(base: Source, name: str) -> Source:
    """`name` inside the directory `base` (a Path for a local one, a URI for a URI, its query kept at the end)."""
    if not is_uri(base):
        return Path(base) / name
    head, mark, query = base.partition("?")
    return f"{head.rstrip('/')}/{name}{mark}{query}"


def read_bytes(source: Source) -> bytes:
    fs, path = filesystem(source)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(source: Source) -> bool:
    fs, path = filesystem(source)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(source: Source) -> int:
    fs, path = filesystem(source)
    return fs.get_file_info(path).size


name = dataset.file_name  # of a shard, local or a URI (a query, e.g. s3://...?endpoint_override=..., left out)


def fingerprint(shards: list[Source]) -> str:
    """A hash of the shards' names and sizes, in order: it changes when a shard is added, removed,
    renamed or rewritten, which moves the validation split and the saved data positions."""
    h = hashlib.sha256()
    for shard in shards:
        h.update(f"{name(shard)}\0{size(shard)}\n".encode())
    return h.hexdigest()[:16]


def list_shards(source: Source) -> list[Source]:
    """The shards of a data source (module docstring), in stream order: the last one is validation."""
    if str(source).partition("?")[0].endswith(".txt"):
        lines = (line.strip() for line in read_bytes(source).decode("utf-8").splitlines())
        shards = [line for line in lines if line and not line.startswith("#")]
        if not shards:
            raise NoShardsError(f"the shard list {source} names no shards: put one shard URI per line in it.")
        return [as_source(s) for s in shards]
    if not is_uri(source):
        return list(dataset.list_shards(source))
    fs, path = filesystem(source)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if fnmatch.fnmatch(i.base_name, dataset.SHARD_GLOB))
    if not names:
        raise NoShardsError(f"no shard_*.parquet files under {source}: upload the shards that "
                            f"`{dataset.BUILD_COMMAND}` writes there, or pass --data-dir where they are.")
    return [join(source, name) for name in names]


def _open_file(uri: str) -> pa.NativeFile:
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


def _opener(source: Source) -> dataset.OpenFile | None:
    """How nanochat.dataset's readers open `source`: by path when local, through its file system when a URI."""
    return _open_file if is_uri(source) else None


def open_shard(source: Source) -> pq.ParquetFile:
    """A shard's parquet file, its footer read; a missing or unreadable one raises DataError naming it."""
    return dataset._open_shard(source, _opener(source))


def num_row_groups(source: Source) -> int:
    return open_shard(source).num_row_groups


def read_row_group(source: Source, index: int) -> list[str]:
    """The documents of one row group; a bad one raises DataError naming the shard and row group."""
    return dataset.read_row_group(source, index, _opener(source))


def nonempty_row_groups(shards: list[Source]) -> list[tuple[int, int]]:
    """(shard index, row group) of every row group that holds documents, in stream order (the work of
    every loader; nanochat.dataset.nonempty_row_groups, which logs the empty ones)."""
    return dataset.nonempty_row_groups(shards, _open_file if any(is_uri(s) for s in shards) else None)


def row_group_sizes(shards: list[Source]) -> list[list[int]]:
    """Documents in each row group of each shard, from the footers (a bad shard raises DataError naming it)."""
    sizes = []
    for shard in shards:
        meta = open_shard(shard).metadata
        sizes.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    return sizes
