"""Parquet shards of documents: build them from local corpora, download real ones, list them, read them.

Layout: a directory of `shard_00000.parquet`, `shard_00001.parquet`, ... each with one string
column `text` (one document per row) split into row groups of ~1000 documents. Row groups are
the unit of work for every loader. The LAST shard is the validation split; all others train.

    python -m nanochat.dataset build                                  # embedded corpus -> default dir
    python -m nanochat.dataset build --source notes.txt --out /data/nc
    python -m nanochat.dataset build --source hf:roneneldan/TinyStories::train --max-docs 200000
    python -m nanochat.dataset download --shards 8 [--out DIR] [--workers 4]   # FineWeb-Edu, ~100 MB a shard
    python -m nanochat.dataset list [--data-dir DIR]
    python -m nanochat.dataset tokenize [--data-dir DIR]   # token files every epoch reuses (nanochat/tokenized.py)

Sources (`--source`):
  embedded          the World English Bible, one document per chapter (see nanochat/corpus.py)
  FILE.txt          documents separated by one or more blank lines (single newlines stay inside)
  FILE.jsonl        one JSON object per line with a string field "text"
  FILE.parquet      a string column "text"
  DIR               every .txt/.jsonl/.parquet file under DIR, in sorted path order
  hf:NAME[:CONFIG][:SPLIT]   `datasets.load_dataset(NAME, CONFIG, split=SPLIT or "train", streaming=True)`,
                    needs a "text" column; offline by default (local HF cache or a local dataset dir):
                    set HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to stream it from the Hub
Default output dir: `$NANOCHAT_DATA`, else `$NANOCHAT_BASE_DIR/data` (~/.cache/nanochat/data).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nanochat.common import base_dir
from nanochat.config import option, parse_command
from nanochat.corpus import embedded_corpus
from nanochat.errors import UsageError, run_main

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


# A shard's file opened for reading: local shards are opened by path (open_file None); nanochat.shardfs
# passes one that opens URIs through their file system.
OpenFile = Callable[[str], BinaryIO]


def _remedy(path: str | Path) -> str:
    """What to do about a shard that cannot be read: rebuild a local one, upload a remote one again."""
    if "://" in str(path):
        return "check the URI and the credentials of its file system, or upload the shard again"
    return f"rebuild the shards from their source: `{BUILD_COMMAND} --source SOURCE --out {Path(path).parent} --overwrite`"


def _open_shard(path: str | Path, open_file: OpenFile | None = None) -> pq.ParquetFile:
    try:
        shard = pq.ParquetFile(open_file(str(path)) if open_file else Path(path))
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path} is not a readable parquet file ({_one_line(err)}); {_remedy(path)}.") from err
    if "text" not in shard.schema_arrow.names:
        raise DataError(
            f"{path} has no 'text' column (columns: {shard.schema_arrow.names}); "
            f"shards need one string column 'text': rebuild with `{BUILD_COMMAND}`."
        )
    return shard


def num_row_groups(path: str | Path, open_file: OpenFile | None = None) -> int:
    return _open_shard(path, open_file).num_row_groups


def read_row_group(path: str | Path, index: int, open_file: OpenFile | None = None) -> list[str]:
    """The documents of one row group; nulls and damaged data raise DataError naming the file."""
    shard = _open_shard(path, open_file)
    if not 0 <= index < shard.num_row_groups:
        raise IndexError(f"{path} has {shard.num_row_groups} row groups, asked for row group {index}")
    try:
        column = shard.read_row_group(index, columns=["text"]).column("text")
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: row group {index} is unreadable ({_one_line(err)}); {_remedy(path)}.") from err
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
            f"fix the source's encoding, then {_remedy(path)}."
        ) from None


def _first_undecodable(column: pa.ChunkedArray) -> tuple[int, UnicodeDecodeError]:
    """The first document of a string column that is not valid UTF-8, and its error (there is one)."""
    for row, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return row, err
    raise AssertionError("decoding the column failed, but every document decodes on its own")


def nonempty_row_groups(shards: Sequence[str | Path], open_file: OpenFile | None = None) -> list[tuple[int, int]]:
    """(shard index, row group) of every row group of `shards` that holds documents, in stream order: the
    work of every loader. Opening every shard checks them all (a bad one fails here, naming the file).
    Row groups of zero rows (some parquet writers leave them) hold nothing: left out, and counted in the log."""
    kept: list[tuple[int, int]] = []
    empty: list[tuple[str, int]] = []
    for s, path in enumerate(shards):
        meta = _open_shard(path, open_file).metadata
        for g in range(meta.num_row_groups):
            if meta.row_group(g).num_rows:
                kept.append((s, g))
            else:
                empty.append((str(path), g))
    if empty and not _logged_empty.issuperset(empty):
        names = [f"{file_name(path)} row group {g}" for path, g in empty]
        log.warning("skipping %d empty row groups (zero rows) of %d: %s", len(empty), len(kept) + len(empty),
                    ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
        _logged_empty.update(empty)
    return kept


# empty row groups already logged: once per process, not again for each evaluation's new loader
_logged_empty: set[tuple[str, int]] = set()


def file_name(path: str | Path) -> str:
    """The file name in a path or URI (a URI's query left out)."""
    return str(path).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def list_shards(data_dir: str | Path) -> list[Path]:
    """All shards in `data_dir`, sorted (the last one is validation)."""
    shards = sorted(Path(data_dir).glob(SHARD_GLOB))
    if not shards:
        raise NoShardsError(
            f"no shard_*.parquet files in {data_dir}: create them with `{BUILD_COMMAND} --out {data_dir}`, "
            "or pass --data-dir DIR where they are."
        )
    return shards


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


def shard_name(index: int) -> str:
    """The file name of shard `index` (upstream nanochat names its shards the same way)."""
    return f"shard_{index:05d}.parquet"


class _ShardWriter:
    """Writes documents into numbered shards of `staging`, one row group at a time: a build holds one row
    group in memory, never a shard. Each shard is written under a temporary name and renamed once closed,
    so a killed build never leaves half a shard."""

    def __init__(self, staging: Path, docs_per_row_group: int, row_groups_per_shard: int | None):
        self.staging, self.docs_per_row_group, self.row_groups_per_shard = staging, docs_per_row_group, row_groups_per_shard
        self.written: list[Path] = []
        self.docs = 0
        self._group: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._groups_in_shard = 0

    def add(self, doc: str) -> None:
        self._group.append(doc)
        self.docs += 1
        if len(self._group) == self.docs_per_row_group:
            self._flush_group()
            if self.row_groups_per_shard and self._groups_in_shard == self.row_groups_per_shard:
                self.close_shard()

    def _flush_group(self) -> None:
        if self._writer is None:
            path = self.staging / shard_name(len(self.written))
            self._writer = pq.ParquetWriter(path.with_name(path.name + ".tmp"), SCHEMA, compression="zstd")
            self.written.append(path)
        self._writer.write_table(pa.table({"text": self._group}, schema=SCHEMA), row_group_size=len(self._group))
        self._group = []
        self._groups_in_shard += 1

    def close_shard(self) -> None:
        """Write what is pending and close the open shard (a no-op when nothing is pending or open)."""
        if self._group:
            self._flush_group()
        if self._writer is not None:
            self._writer.close()
            path = self.written[-1]
            os.replace(path.with_name(path.name + ".tmp"), path)
        self._writer, self._groups_in_shard = None, 0


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

    `val_docs` defaults to one row group. `texts` is consumed as a stream: memory holds one row group
    and the `val_docs` most recent documents. Shards are first written into a hidden staging directory
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
    train = _ShardWriter(staging, docs_per_row_group, row_groups_per_shard)
    held_back: deque[str] = deque()  # the most recent val_docs documents: the val shard if the stream ends now
    for number, doc in enumerate(texts):
        held_back.append(_check_text(doc, number))
        if len(held_back) > val_docs:
            train.add(held_back.popleft())
    train.close_shard()
    if not train.docs:
        shutil.rmtree(staging)
        raise ValueError(
            f"got {len(held_back)} documents, need more than val_docs={val_docs} (train + val): add text or lower val_docs."
        )
    train.row_groups_per_shard = None  # the held-back documents make one val shard, however many row groups
    for doc in held_back:
        train.add(doc)
    train.close_shard()

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in existing:
        old.unlink()
    final = []
    for shard in train.written:
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

        # streamed: rows arrive as the files are read, never a whole copy prepared first (FineWeb-sized sets
        # included); a set already prepared in the local cache streams from its Arrow files
        dataset = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as err:  # datasets raises many types (connection, missing config, cache miss)
        raise DataError(
            f"could not load hf:{spec} ({type(err).__name__}: {err}). It is read from the local HF cache "
            "(~/.cache/huggingface) or a local dataset directory: download it there first, or set "
            "HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to let this command stream it from the Hub."
        ) from err
    columns = dataset.column_names  # None when the files name no columns before they are read
    if columns is not None and "text" not in columns:
        raise DataError(f"hf:{spec} has no 'text' column (columns: {columns}).")
    count = 0
    try:
        for row in dataset.select_columns(["text"]):
            yield row["text"]
            count += 1
    except Exception as err:  # a damaged file or a dropped connection surfaces here, mid-stream
        raise DataError(
            f"hf:{spec}: reading failed after {count} documents ({type(err).__name__}: {_one_line(err)}); "
            "fix or re-download the files, then build again."
        ) from err


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
# downloading upstream nanochat's pretraining shards

# Upstream nanochat pretrained on FineWeb-Edu (sample-100BT) repackaged into pre-shuffled parquet shards
# until its commit 324e69c (2026-03-04) moved to ClimbMix. github.com/karpathy/nanochat, nanochat/dataset.py
# at 324e69c^: BASE_URL =
# ".../karpathy/fineweb-edu-100b-shuffle/resolve/main", MAX_SHARD = 1822 ("the last datashard is
# shard_01822.parquet"), named `shard_{index:05d}.parquet`. Its dev/repackage_data_reference.py wrote each
# with one `text` column, row groups of 1024 documents, ~250 M characters, ~100 MB after zstd. Upstream
# keeps the last shard for validation and always downloads it: so do we, and as it sorts after every
# training shard, our rule (last shard = validation) picks the same one.
FINEWEB_EDU_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_EDU_LAST_SHARD = 1822
DOWNLOAD_COMMAND = "python -m nanochat.dataset download"
# which shards a download wrote, and from where: a directory never mixes them with other shards
DOWNLOAD_MANIFEST = "download.json"
_CHUNK = 1 << 20
# statuses that a later attempt may not get (rate limits, busy or failing servers)
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def shard_requests(count: int, base_url: str = FINEWEB_EDU_URL,
                   last_shard: int = FINEWEB_EDU_LAST_SHARD) -> list[tuple[str, str]]:
    """(file name, URL) of the first `count` training shards and then the validation shard, `last_shard`."""
    if not 1 <= count <= last_shard:
        raise DataError(f"--shards {count}: give 1 to {last_shard} training shards (the validation shard comes too).")
    names = [shard_name(index) for index in [*range(count), last_shard]]
    return [(name, f"{base_url.rstrip('/')}/{name}") for name in names]


def _parquet_problem(path: Path) -> str | None:
    """What makes a downloaded file unusable as a shard, or None: it must open as parquet and hold row
    groups of documents in a string column `text`."""
    try:
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        return f"not a readable parquet file ({_one_line(err)})"
    schema = shard.schema_arrow
    if "text" not in schema.names:
        return f"no 'text' column (columns: {schema.names})"
    kind = schema.field("text").type
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        return f"column 'text' has type {kind}, expected string"
    if not shard.metadata.num_rows:
        return f"no documents ({shard.num_row_groups} row groups)"
    return None


class _Retry(Exception):
    """A failed attempt that a later one may fix: a dropped connection, a short file, a busy server."""


class _Downloader:
    """Fetches shards into one directory from worker threads: resumes a `.tmp` with an HTTP Range request,
    retries with exponential backoff, checks the size against the server's and the file as a shard,
    fetches a bad file afresh once, then records it in the manifest under its final name."""

    def __init__(self, out: Path, base_url: str, attempts: int, backoff_s: float, timeout_s: float):
        self.out, self.base_url = out, base_url.rstrip("/")
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._manifest = self._read_manifest()
        self._counted: dict[str, int] = {}  # bytes of each shard counted in the bar
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="download")

    # -- the manifest -------------------------------------------------------------
    def _read_manifest(self) -> dict[str, int]:
        path = self.out / DOWNLOAD_MANIFEST
        manifest = json.loads(path.read_text()) if path.exists() else {"base_url": self.base_url, "shards": {}}
        if manifest["shards"] and manifest["base_url"] != self.base_url:
            raise DataError(
                f"{self.out} holds shards downloaded from {manifest['base_url']}, not {self.base_url}: "
                "download into another --out, or pass the same --base-url."
            )
        foreign = [p.name for p in sorted(self.out.glob(SHARD_GLOB)) if p.name not in manifest["shards"]]
        if foreign:
            raise DataError(
                f"{self.out} already holds {len(foreign)} shards that no download wrote ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): downloaded shards added to them would mix two corpora "
                "and move the validation shard. Download into another --out, or remove them (shards upstream "
                "nanochat downloaded need no download: train on them with --data-dir DIR)."
            )
        return manifest["shards"]

    def _record(self, name: str, size: int) -> None:
        with self._lock:
            self._manifest[name] = size
            tmp = self.out / f"{DOWNLOAD_MANIFEST}.tmp"
            tmp.write_text(json.dumps({"base_url": self.base_url, "shards": dict(sorted(self._manifest.items()))},
                                      indent=1))
            os.replace(tmp, self.out / DOWNLOAD_MANIFEST)

    def is_complete(self, name: str) -> bool:
        """A shard this directory's downloads wrote, checked then, and unchanged since (same size)."""
        path = self.out / name
        return path.exists() and self._manifest.get(name) == path.stat().st_size

    # -- the progress bar ---------------------------------------------------------
    def _count(self, name: str, size: int | None, have: int) -> None:
        """Shard `name` holds `have` bytes of `size` (None: the server did not say)."""
        with self._lock:
            if size is not None and name not in self._counted:
                self.bar.total += size
            self.bar.update(have - self._counted.get(name, 0))
            self._counted[name] = have

    # -- one shard ----------------------------------------------------------------
    def fetch(self, name: str, url: str) -> Path:
        path = self.out / name
        if self.is_complete(name):
            self._count(name, path.stat().st_size, path.stat().st_size)
            return path
        tmp = path.with_name(name + ".tmp")
        for fresh in (False, True):  # a file that is not a shard is fetched once more, from its first byte
            if fresh:
                tmp.unlink()
            self._fetch_with_retries(name, url, tmp)
            problem = _parquet_problem(tmp)
            if problem is None:
                os.replace(tmp, path)
                self._record(name, path.stat().st_size)
                return path
            log.warning("%s: %s; downloading it again", url, problem)
        tmp.unlink()
        raise DataError(
            f"{url} is not a usable shard, twice: {problem}. The server sends a damaged or different file: "
            "check --base-url, or try again later."
        )

    def _fetch_with_retries(self, name: str, url: str, tmp: Path) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                return self._fetch_once(name, url, tmp)
            except _Retry as err:
                if attempt == self.attempts or self.stopping.is_set():
                    kept = f" ({tmp.name} keeps what arrived)" if tmp.exists() else ""
                    raise DataError(
                        f"{url}: {err} (attempt {attempt} of {self.attempts}); run `{DOWNLOAD_COMMAND}` again "
                        f"to resume{kept}."
                    ) from err
                wait = self.backoff_s * 2 ** (attempt - 1)
                log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", name, err, wait, attempt + 1,
                            self.attempts)
                self.stopping.wait(wait)

    def _fetch_once(self, name: str, url: str, tmp: Path) -> None:
        """One request: appends to `tmp` from its end (a Range request) or writes it from the start."""
        have = tmp.stat().st_size if tmp.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                start, size = self._span(response, have)
                self._count(name, size, start)
                with tmp.open("ab" if start else "wb") as f:
                    while chunk := response.read(_CHUNK):
                        if self.stopping.is_set():
                            raise _Retry("interrupted")
                        f.write(chunk)
                        self._count(name, size, f.tell())
        except urllib.error.HTTPError as err:
            if err.code == 416:  # the .tmp is no prefix of the file: start again
                tmp.unlink()
                raise _Retry(f"the server refused to resume {tmp.name}; restarting it") from err
            if err.code in _RETRY_STATUS:
                raise _Retry(f"HTTP {err.code} {err.reason}") from err
            raise DataError(
                f"{url}: HTTP {err.code} {err.reason}: check --base-url (it must hold {name})."
            ) from err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise _Retry(f"{type(err).__name__}: {_one_line(err)}") from err
        got = tmp.stat().st_size
        if size is not None and got != size:
            raise _Retry(f"the connection closed at {got:,} of {size:,} bytes")

    @staticmethod
    def _span(response: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
        """(the byte the response starts at, the whole file's size or None) from its headers; a server that
        ignores the Range request sends the whole file (status 200), which restarts the .tmp."""
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != have:
                raise _Retry(f"unexpected Content-Range {response.headers.get('Content-Range')!r} for byte {have}")
            return have, None if match[2] == "*" else int(match[2])
        length = response.headers.get("Content-Length")
        return 0, int(length) if length is not None else None


def download_shards(count: int, out_dir: str | Path, base_url: str = FINEWEB_EDU_URL, workers: int = 4,
                    attempts: int = 5, backoff_s: float = 1.0, timeout_s: float = 60.0) -> list[Path]:
    """Download the first `count` training shards of upstream nanochat's FineWeb-Edu and its validation shard
    into `out_dir`, `workers` at a time; shards already there are kept and partial ones resumed. Every shard
    is checked (size, parquet, a `text` column); the first failure is raised once all others are done."""
    if workers < 1 or attempts < 1:
        raise DataError(f"--workers {workers} --attempts {attempts}: both must be at least 1.")
    requests = shard_requests(count, base_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    downloader = _Downloader(out, base_url, attempts, backoff_s, timeout_s)
    with downloader.bar, ThreadPoolExecutor(workers, thread_name_prefix="download") as pool:
        futures = [pool.submit(downloader.fetch, name, url) for name, url in requests]
        try:
            fetched = 0
            for future in as_completed(futures):
                fetched += future.exception() is None
                downloader.bar.set_postfix_str(f"{fetched}/{len(requests)} shards")
        except BaseException:  # Ctrl-C: the threads stop at their next chunk, the .tmp files stay for a resume
            downloader.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    failures = [future.exception() for future in futures if future.exception() is not None]
    if failures:
        lines = [str(err) if isinstance(err, DataError) else repr(err) for err in failures]
        raise DataError(
            f"{len(failures)} of {len(requests)} shards failed; run `{DOWNLOAD_COMMAND}` again to resume.",
            "\n".join(lines),
        ) from failures[0]
    return [out / name for name, _ in requests]


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


@dataclass
class DownloadOptions:
    """fetch upstream nanochat's pre-shuffled FineWeb-Edu shards (~100 MB each)"""

    shards: int = option(8, f"training shards, from shard_00000 (1 to {FINEWEB_EDU_LAST_SHARD}); the validation "
                            f"shard ({shard_name(FINEWEB_EDU_LAST_SHARD)}) always comes too")
    out: str = option("", "output dir; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    workers: int = option(4, "shards fetched at once")
    base_url: str = option(FINEWEB_EDU_URL, "where the shards live: upstream's, or a mirror holding the same names")
    attempts: int = option(5, "tries per shard on network errors, waiting 1, 2, 4, ... s between them")


def download(cfg: DownloadOptions) -> None:
    out = Path(cfg.out or default_data_dir())
    with logging_redirect_tqdm(loggers=[log]):  # retry notices print above the progress bar
        shards = download_shards(cfg.shards, out, cfg.base_url, workers=cfg.workers, attempts=cfg.attempts)
    print(f"{len(shards)} shards ({len(shards) - 1} train + 1 val) in {out}")
    print_shards(out)


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
    from nanochat.tokenized import TokenizeOptions, tokenize  # here: that module imports this one

    command, cfg = parse_command({"build": BuildOptions, "download": DownloadOptions, "list": ListOptions,
                                  "tokenize": TokenizeOptions}, argv, __doc__.split("\n")[0])
    if command == "build":
        build(cfg)
    elif command == "download":
        download(cfg)
    elif command == "tokenize":
        tokenize(cfg)
    else:
        print_shards(Path(cfg.data_dir or default_data_dir()))


if __name__ == "__main__":
    run_main(main)
