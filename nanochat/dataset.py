"""Parquet shards of documents: build them from local corpora, list them, read them.

Layout: a directory of `shard_00000.parquet`, `shard_00001.parquet`, ... each with one string
column `text` (one document per row) split into row groups of ~1000 documents. Row groups are
the unit of work for every loader. The LAST shard is the validation split; all others train.

    python -m nanochat.dataset build                                  # embedded corpus -> default dir
    python -m nanochat.dataset build --source notes.txt --out /data/nc
    python -m nanochat.dataset build --source hf:roneneldan/TinyStories::train --max-docs 200000
    python -m nanochat.dataset list [--data-dir DIR]

Sources (`--source`):
  embedded          the World English Bible, one document per chapter (see nanochat/corpus.py)
  FILE.txt          documents separated by one or more blank lines (single newlines stay inside)
  FILE.jsonl        one JSON object per line with a string field "text"
  FILE.parquet      a string column "text"
  DIR               every .txt/.jsonl/.parquet file under DIR, in sorted path order
  hf:NAME[:CONFIG][:SPLIT]   `datasets.load_dataset(NAME, CONFIG, split=SPLIT or "train")`, needs a
                    "text" column; offline by default (local HF cache or a local dataset dir):
                    set HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to allow downloads
Default output dir: `$NANOCHAT_DATA`, else `$NANOCHAT_BASE_DIR/data` (~/.cache/nanochat/data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import base_dir
from nanochat.config import option, parse_command
from nanochat.corpus import embedded_corpus
from nanochat.errors import UsageError

SHARD_GLOB = "shard_[0-9][0-9][0-9][0-9][0-9].parquet"
BUILD_COMMAND = "python -m nanochat.dataset build"
SCHEMA = pa.schema([pa.field("text", pa.string())])

# the embedded corpus has only 1189 documents: smaller groups so several ranks get work
EMBEDDED_LAYOUT = {"docs_per_row_group": 32, "row_groups_per_shard": 8, "val_docs": 64}

log = logging.getLogger(__name__)


class DataError(UsageError, ValueError):
    """A shard or source file that cannot be used; the message names the file and what to do."""


class NoShardsError(DataError, FileNotFoundError):
    """A data directory without shards (a FileNotFoundError too, for callers that catch that)."""


def _one_line(err: BaseException) -> str:
    # pyarrow's messages can span lines; ours are printed as one (nanochat/errors.py)
    return " ".join(str(err).split())


def default_data_dir() -> Path:
    """`$NANOCHAT_DATA` if set, else `$NANOCHAT_BASE_DIR/data` (base defaults to ~/.cache/nanochat)."""
    if os.environ.get("NANOCHAT_DATA"):
        return Path(os.environ["NANOCHAT_DATA"])
    return base_dir() / "data"


# -----------------------------------------------------------------------------
# reading shards


def _open_shard(path: Path) -> pq.ParquetFile:
    try:
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(
            f"{path} is not a readable parquet file ({_one_line(err)}); rebuild the shards from their source: "
            f"`{BUILD_COMMAND} --source SOURCE --out {path.parent} --overwrite`."
        ) from err
    if "text" not in shard.schema_arrow.names:
        raise DataError(
            f"{path} has no 'text' column (columns: {shard.schema_arrow.names}); "
            f"shards need one string column 'text': rebuild with `{BUILD_COMMAND}`."
        )
    return shard


def num_row_groups(path: str | Path) -> int:
    return _open_shard(Path(path)).num_row_groups


def read_row_group(path: str | Path, index: int) -> list[str]:
    """The documents of one row group; nulls and damaged data raise DataError naming the file."""
    path = Path(path)
    shard = _open_shard(path)
    if not 0 <= index < shard.num_row_groups:
        raise IndexError(f"{path} has {shard.num_row_groups} row groups, asked for row group {index}")
    try:
        column = shard.read_row_group(index, columns=["text"]).column("text")
    except (OSError, pa.ArrowException) as err:
        raise DataError(
            f"{path}: row group {index} is unreadable ({_one_line(err)}); rebuild the shards from their source: "
            f"`{BUILD_COMMAND} --source SOURCE --out {path.parent} --overwrite`."
        ) from err
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise DataError(
            f"{path}: column 'text' has type {column.type}, expected string; rebuild with `{BUILD_COMMAND}`."
        )
    if column.null_count:
        raise DataError(
            f"{path}: row group {index} has {column.null_count} null texts; fix or rebuild the shard."
        )
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # pyarrow does not check UTF-8 when it reads; Python does when it decodes
        row, err = _first_undecodable(column)
        raise DataError(
            f"{path}: row group {index}, document {row} is not valid UTF-8 ({err.reason} at byte {err.start}); "
            f"fix the source's encoding and rebuild the shards: `{BUILD_COMMAND} --source SOURCE --out {path.parent} "
            "--overwrite`."
        ) from None


def _first_undecodable(column: pa.ChunkedArray) -> tuple[int, UnicodeDecodeError]:
    """The first document of a string column that is not valid UTF-8, and its error (there is one)."""
    for row, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return row, err
    raise AssertionError("decoding the column failed, but every document decodes on its own")


def nonempty_row_groups(shards: Sequence[str | Path]) -> list[tuple[int, int]]:
    """(shard index, row group) of every row group of `shards` that holds documents, in stream order: the
    work of every loader. Opening every shard checks them all (a bad one fails here, naming the file).
    Row groups of zero rows (some parquet writers leave them) hold nothing: left out, and counted in the log."""
    kept: list[tuple[int, int]] = []
    empty: list[tuple[Path, int]] = []
    for s, path in enumerate(shards):
        meta = _open_shard(Path(path)).metadata
        for g in range(meta.num_row_groups):
            if meta.row_group(g).num_rows:
                kept.append((s, g))
            else:
                empty.append((Path(path), g))
    if empty and not _logged_empty.issuperset(empty):
        names = [f"{path.name} row group {g}" for path, g in empty]
        log.warning("skipping %d empty row groups (zero rows) of %d: %s", len(empty), len(kept) + len(empty),
                    ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
        _logged_empty.update(empty)
    return kept


# empty row groups already logged: once per process, not again for each evaluation's new loader
_logged_empty: set[tuple[Path, int]] = set()


def list_shards(data_dir: str | Path) -> list[Path]:
    """All shards in `data_dir`, sorted (the last one is validation)."""
    shards = sorted(Path(data_dir).glob(SHARD_GLOB))
    if not shards:
        raise NoShardsError(
            f"no shard_*.parquet files in {data_dir}: create them with `{BUILD_COMMAND} --out {data_dir}`, "
            "or pass --data-dir DIR where they are."
        )
    return shards


def shard_fingerprint(paths: list[Path]) -> str:
    """A hash of the shards' names and sizes, in order: it changes when a shard is added, removed,
    renamed or rewritten, which moves the validation split and the saved data positions."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{Path(path).name}\0{Path(path).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def split_shards(shards: list[Path], split: str) -> list[Path]:
    """Train = every shard but the last; val = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(shards) < 2:
        raise DataError(
            f"need at least 2 shards (train + val), found {len(shards)}"
            + (f" in {shards[0].parent}" if shards else "") + ": rebuild with more documents."
        )
    return shards[:-1] if split == "train" else shards[-1:]


# -----------------------------------------------------------------------------
# writing shards


def _write_shard(path: Path, docs: list[str], docs_per_row_group: int) -> None:
    # Write under a temporary name, then rename: a killed build never leaves half a shard.
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
        for start in range(0, len(docs), docs_per_row_group):
            rows = docs[start : start + docs_per_row_group]
            writer.write_table(pa.table({"text": rows}, schema=SCHEMA), row_group_size=len(rows))
    os.replace(tmp, path)


def _check_text(doc: object, number: int) -> str:
    if not isinstance(doc, str):
        raise TypeError(f"document #{number} is a {type(doc).__name__}, expected str")
    return doc


def build_shards(
    texts: Iterable[str],
    out_dir: str | Path,
    docs_per_row_group: int = 1000,
    row_groups_per_shard: int = 10,
    val_docs: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write `texts` as parquet shards in `out_dir`; the last `val_docs` documents become the last (val) shard.

    `val_docs` defaults to one row group. Shards are first written into a hidden staging directory
    and moved into `out_dir` only once all are complete, so an interrupted build cannot leave a
    train shard posing as the validation shard.
    """
    out_dir = Path(out_dir).resolve()
    val_docs = docs_per_row_group if val_docs is None else val_docs
    if docs_per_row_group < 1 or row_groups_per_shard < 1 or val_docs < 1:
        raise ValueError("docs_per_row_group, row_groups_per_shard and val_docs must all be >= 1")
    existing = sorted(out_dir.glob(SHARD_GLOB))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(existing)} shards: pick another directory or pass overwrite=True (--overwrite)."
        )

    staging = out_dir.parent / f".{out_dir.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    docs_per_shard = docs_per_row_group * row_groups_per_shard
    written: list[Path] = []
    pending: list[str] = []
    held_back: deque[str] = (
        deque()
    )  # the most recent val_docs documents: the val shard if the stream ends now

    for number, doc in enumerate(texts):
        held_back.append(_check_text(doc, number))
        if len(held_back) > val_docs:
            pending.append(held_back.popleft())
        if len(pending) == docs_per_shard:
            written.append(staging / f"shard_{len(written):05d}.parquet")
            _write_shard(written[-1], pending, docs_per_row_group)
            pending = []
    if pending:
        written.append(staging / f"shard_{len(written):05d}.parquet")
        _write_shard(written[-1], pending, docs_per_row_group)
    if not written or len(held_back) < val_docs:
        shutil.rmtree(staging)
        total = sum(pq.ParquetFile(p).metadata.num_rows for p in written) + len(held_back)
        raise ValueError(
            f"got {total} documents, need more than val_docs={val_docs} (train + val): add text or lower val_docs."
        )
    written.append(staging / f"shard_{len(written):05d}.parquet")
    _write_shard(written[-1], list(held_back), docs_per_row_group)

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in existing:
        old.unlink()
    final = []
    for shard in written:
        os.replace(shard, out_dir / shard.name)
        final.append(out_dir / shard.name)
    staging.rmdir()
    return final


# -----------------------------------------------------------------------------
# sources


def _read_txt(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    for doc in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text):
        if doc.strip():
            yield doc.strip()


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object with a 'text' field ({err!r})."
                ) from err
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{line_number}: 'text' is a {type(text).__name__}, expected a string."
                )
            yield text


def _read_parquet(path: Path) -> Iterator[str]:
    for index in range(num_row_groups(path)):
        yield from read_row_group(path, index)


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read_hf(spec: str) -> Iterator[str]:
    name, config, split = (spec.split(":") + ["", ""])[:3]
    # Offline unless the caller says otherwise: without a network the Hub client would retry
    # for half a minute before failing. HF_HUB_OFFLINE=0 allows downloads. (It only takes effect
    # if `datasets` was not imported earlier in this process: the library reads it at import.)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # datasets raises many types (connection, missing config, cache miss)
        raise DataError(
            f"could not load hf:{spec} ({type(err).__name__}: {err}). It is read from the local HF cache "
            "(~/.cache/huggingface) or a local dataset directory: download it there first, or set "
            "HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to let this command download it."
        ) from err
    if "text" not in dataset.column_names:
        raise DataError(f"hf:{spec} has no 'text' column (columns: {dataset.column_names}).")
    for row in dataset.select_columns(["text"]):
        yield row["text"]


def iter_source(source: str) -> Iterator[str]:
    """Documents from a source spec (see the module docstring for the forms it takes)."""
    if source == "embedded":
        return embedded_corpus()
    if source.startswith("hf:"):
        return _read_hf(source[3:])
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READERS)
        if not files:
            raise DataError(f"{path} holds no .txt, .jsonl or .parquet files.")
        return (doc for f in files for doc in READERS[f.suffix](f))
    if path.is_file():
        if path.suffix not in READERS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet.")
        return READERS[path.suffix](path)
    raise FileNotFoundError(
        f"source {source!r} is not 'embedded', 'hf:NAME[:CONFIG][:SPLIT]', or an existing file/directory."
    )


# -----------------------------------------------------------------------------
# CLI


def _limit(docs: Iterator[str], max_docs: int | None) -> Iterator[str]:
    for number, doc in enumerate(docs):
        if max_docs is not None and number >= max_docs:
            return
        yield doc


@dataclass
class BuildOptions:
    """write shards from a source"""

    source: str = option("embedded", "embedded | FILE.txt/.jsonl/.parquet | DIR | hf:NAME[:CONFIG][:SPLIT]")
    out: str = option("", "output dir; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    docs_per_row_group: int | None = option(None, "None = 1000 (32 for embedded)")
    row_groups_per_shard: int | None = option(None, "None = 10 (8 for embedded)")
    val_docs: int | None = option(None, "documents in the val shard; None = one row group (64 for embedded)")
    max_docs: int | None = option(None, "stop after this many documents")
    overwrite: bool = option(False, "replace shards already in --out")


@dataclass
class ListOptions:
    """print shards, rows, row groups, bytes"""

    data_dir: str = option("", "shards; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")


def build(cfg: BuildOptions) -> None:
    layout = (
        dict(EMBEDDED_LAYOUT)
        if cfg.source == "embedded"
        else {"docs_per_row_group": 1000, "row_groups_per_shard": 10}
    )
    for key in ("docs_per_row_group", "row_groups_per_shard", "val_docs"):
        if getattr(cfg, key) is not None:
            layout[key] = getattr(cfg, key)
    out = Path(cfg.out or default_data_dir())
    shards = build_shards(
        _limit(iter_source(cfg.source), cfg.max_docs), out, overwrite=cfg.overwrite, **layout
    )
    print(f"wrote {len(shards)} shards ({len(shards) - 1} train + 1 val) to {out}")
    print_shards(out)


def print_shards(data_dir: Path) -> None:
    shards = list_shards(data_dir)
    print(f"{data_dir}:")
    print(f"{'shard':<22}{'split':>6}{'rows':>10}{'row groups':>12}{'bytes':>14}")
    for shard in shards:
        meta = _open_shard(shard).metadata
        split = "val" if shard == shards[-1] else "train"
        print(
            f"{shard.name:<22}{split:>6}{meta.num_rows:>10}{meta.num_row_groups:>12}{shard.stat().st_size:>14,}"
        )


def main(argv: list[str] | None = None) -> None:
    command, cfg = parse_command({"build": BuildOptions, "list": ListOptions}, argv, __doc__.split("\n")[0])
    if command == "build":
        build(cfg)
    else:
        print_shards(Path(cfg.data_dir or default_data_dir()))


if __name__ == "__main__":
    main()
