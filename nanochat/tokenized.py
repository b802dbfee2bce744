"""Token files: the shards tokenized once, then read by every epoch, worker and Tune trial.

    python -m nanochat.dataset tokenize [--data-dir D] [--tokenizer-dir T]    # -> D/tokens/<fingerprint>/

A token directory (`<data dir>/tokens/<tokenizer fingerprint>/` unless told otherwise; a local path or
any URI of nanochat.shardfs) holds one `shard_NNNNN.parquet` per shard. Row group g of it is row group g
of the shard, as one row whose `tokens` (list<int32>) are that row group's documents tokenized with
BOS in front of each, concatenated: the stream every loader cuts rows from, so a data position
(shard, row group, offset) means the same token in both. `manifest.json`, written last, records the
tokenizer's fingerprint and each shard (name, bytes) with the tokens of each row group: token files of
another tokenizer, or of shards rewritten since, are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import shardfs
from nanochat.config import option
from nanochat.dataset import DataError, default_data_dir
from nanochat.shardfs import Source
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

MANIFEST = "manifest.json"
FORMAT = "nanochat-tokens-1"
TOKENIZE_COMMAND = "python -m nanochat.dataset tokenize"
SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32()))])


class TokenFilesError(DataError):
    """Token files that do not belong to these shards and this tokenizer; the message says what to run."""


def default_dir(data_dir: Source, tokenizer: Tokenizer) -> Source:
    """Where `tokenize` writes by default and the Ray Data pipeline looks: keyed by the tokenizer."""
    return shardfs.join(shardfs.join(data_dir, "tokens"), tokenizer.fingerprint())


@dataclass(frozen=True)
class TokenFiles:
    """An opened token directory: `counts[name][g]` = tokens of row group g of shard `name`."""

    directory: Source
    fingerprint: str
    counts: dict[str, list[int]]

    def counts_of(self, shards: list[Source]) -> list[list[int]]:
        """Tokens per row group of each of `shards`, in their order."""
        return [self.counts[shardfs.name(s)] for s in shards]

    def read(self, shard: Source, row_group: int) -> np.ndarray:
        """The token stream (int32) of one row group of `shard`."""
        source = shardfs.join(self.directory, shardfs.name(shard))
        fs, path = shardfs.filesystem(source)
        try:
            column = pq.ParquetFile(fs.open_input_file(path)).read_row_group(row_group).column("tokens")
        except (OSError, pa.ArrowException) as err:
            raise TokenFilesError(f"{source}: row group {row_group} is unreadable ({' '.join(str(err).split())}): "
                                  f"write the token files again with `{TOKENIZE_COMMAND} --overwrite`.") from err
        return column.combine_chunks().flatten().to_numpy()


def _identity(shard: Source) -> dict:
    return {"name": shardfs.name(shard), "bytes": shardfs.size(shard)}


def open_token_files(directory: Source, tokenizer: Tokenizer, shards: list[Source]) -> TokenFiles:
    """The token files in `directory`, after checking they were made by `tokenizer` from these `shards`."""
    manifest_path = shardfs.join(directory, MANIFEST)
    if not shardfs.exists(manifest_path):
        raise TokenFilesError(f"no {MANIFEST} in {directory}: write the token files with `{TOKENIZE_COMMAND}`.")
    manifest = json.loads(shardfs.read_bytes(manifest_path))
    redo = f"write them again: `{TOKENIZE_COMMAND} --out {directory} --overwrite` (with the same --tokenizer-dir)."
    if manifest.get("format") != FORMAT:
        raise TokenFilesError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}: {redo}")
    if manifest["tokenizer"] != tokenizer.fingerprint():
        raise TokenFilesError(f"the token files in {directory} were made by tokenizer {manifest['tokenizer']}, "
                              f"not by this one ({tokenizer.fingerprint()}): {redo}")
    recorded = {entry["name"]: entry for entry in manifest["shards"]}
    for shard in shards:
        entry = recorded.get(shardfs.name(shard))
        if entry is None or entry["bytes"] != shardfs.size(shard):
            state = "has no entry for" if entry is None else "was made from another version of"
            raise TokenFilesError(f"{manifest_path} {state} shard {shard}: {redo}")
    return TokenFiles(directory, manifest["tokenizer"], {name: e["row_group_tokens"] for name, e in recorded.items()})


def find_token_files(data_dir: Source, tokenizer: Tokenizer, shards: list[Source]) -> TokenFiles | None:
    """The token files of `tokenizer` in `data_dir`'s default place, or None when there are none; files that
    are there but stale (shards rewritten since) are refused."""
    directory = default_dir(data_dir, tokenizer)
    if not shardfs.exists(shardfs.join(directory, MANIFEST)):
        return None
    return open_token_files(directory, tokenizer, shards)


def _write_shard(shard: Source, tokenizer: Tokenizer, out: Source) -> list[int]:
    """Tokenize one shard into `out`/<its name>; returns the tokens of each row group."""
    counts = []
    fs, path = shardfs.filesystem(shardfs.join(out, shardfs.name(shard)))
    with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, SCHEMA, compression="zstd") as writer:
        for g in range(shardfs.open_shard(shard).num_row_groups):
            ids = tokenizer.encode(shardfs.read_row_group(shard, g), prepend=tokenizer.bos_token_id)
            stream = np.concatenate([np.asarray(doc, dtype=np.int32) for doc in ids] or [np.zeros(0, np.int32)])
            # one row group per shard row group, empty ones included: row group numbers stay the shard's
            writer.write_table(pa.table({"tokens": pa.array([stream], type=SCHEMA.field("tokens").type)}), row_group_size=1)
            counts.append(len(stream))
    return counts


def tokenize_shards(shards: list[Source], tokenizer: Tokenizer, out: Source, overwrite: bool = False) -> TokenFiles:
    """Write the token files of `shards` into `out` (module docstring). Token files already there for these
    shards and this tokenizer are kept; others are replaced only with `overwrite`."""
    names = [shardfs.name(s) for s in shards]
    if len(set(names)) != len(names):
        raise DataError(f"shards with the same file name cannot share a token directory: {names}")
    manifest_path = shardfs.join(out, MANIFEST)
    if shardfs.exists(manifest_path):
        try:
            return open_token_files(out, tokenizer, shards)
        except TokenFilesError:
            if not overwrite:
                raise
        fs, path = shardfs.filesystem(manifest_path)
        fs.delete_file(path)  # first: a directory without its manifest is never read
    fs, path = shardfs.filesystem(out)
    fs.create_dir(path, recursive=True)
    entries = [{**_identity(shard), "row_group_tokens": _write_shard(shard, tokenizer, out)} for shard in shards]
    manifest = {"format": FORMAT, "tokenizer": tokenizer.fingerprint(), "shards": entries}
    fs, path = shardfs.filesystem(manifest_path)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return open_token_files(out, tokenizer, shards)


def packed_rows(files: TokenFiles, shards: list[Source], order: list[tuple[int, int]], item: dict,
                row_len: int) -> np.ndarray:
    """The `item["rows"]` rows of `row_len` tokens starting at offset `item["start"]` of row group
    order[item["index"]]'s stream; the last rows run on into the next row groups of `order` (wrapping
    around into the next epoch), as in one concatenated stream."""
    need = item["rows"] * row_len
    index = item["index"]
    parts = [files.read(shards[order[index][0]], order[index][1])[item["start"]:]]
    have = len(parts[0])
    while have < need:
        index = (index + 1) % len(order)
        parts.append(files.read(shards[order[index][0]], order[index][1]))
        have += len(parts[-1])
    return np.concatenate(parts)[:need].astype(np.int64).reshape(item["rows"], row_len)


# -----------------------------------------------------------------------------
# CLI (registered as `python -m nanochat.dataset tokenize`)


@dataclass
class TokenizeOptions:
    """tokenize the shards once, for every epoch, worker and trial to reuse"""

    data_dir: str = option("", "shards (a dir, URI or URL list); empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    tokenizer_dir: str = option("", "empty = $NANOCHAT_BASE_DIR/tokenizer")
    out: str = option("", "token directory; empty = <data dir>/tokens/<tokenizer fingerprint> (where training looks)")
    overwrite: bool = option(False, "replace token files made by another tokenizer or from other shards")


def tokenize(cfg: TokenizeOptions) -> None:
    data_dir = cfg.data_dir or default_data_dir()
    tokenizer = Tokenizer.load(cfg.tokenizer_dir or default_tokenizer_dir())
    shards = shardfs.list_shards(data_dir)
    out = cfg.out or default_dir(data_dir, tokenizer)
    files = tokenize_shards(shards, tokenizer, out, overwrite=cfg.overwrite)
    total = sum(sum(c) for c in files.counts.values())
    print(f"token files of {len(shards)} shards ({total:,} tokens, tokenizer {files.fingerprint}) in {out}")
