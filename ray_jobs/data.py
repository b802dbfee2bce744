"""Ray Data pipeline for pretraining: parquet row groups -> tokenizer actor pool -> one packer -> Train workers
(or, once tokenized, token files -> stateless row-cutting tasks -> Train workers).

    shards, token_files = training_data(data_dir, tokenizer_dir)    # token files: None until tokenized once
    E = epochs_per_pass(shards, run_tokens, token_files)
    ds = build_dataset(shards, tokenizer_dir, seq_len=2048, epochs=E, token_files=token_files)
    trainer = TorchTrainer(loop, datasets={"train": ds}, dataset_config=data_config(), ...)
    # inside the loop:
    for x, y, position in iter_train_batches(ray.train.get_dataset_shard("train"), B, device, epochs_per_pass=E): ...

Pipeline (one pass over the dataset = one execution of it = `epochs` epochs):
  1. work items: one row per row group and epoch, `{"epoch": e, "shard": i, "row_group": j}`, in
     stream order, one block each. Row groups rather than `read_parquet` files, so that a position
     names an exact place to restart from and the reading goes through
     `nanochat.dataset.read_row_group`, whose errors name the file and row group (a null text, bytes
     that are not UTF-8). Row groups of zero rows get no item (`nonempty_row_groups` logs how many).
  2. `TokenizeRowGroups`, an actor pool (the tokenizer is loaded once per actor): each row group
     becomes its BOS-prefixed, concatenated token stream (column "tokens", list<int32>).
  3. `PackRows`, ONE ordered stateful actor: concatenates the streams, carries the remainder from
     one row group into the next and cuts rows of T+1 tokens with `pack_rows`, the function the
     plain `DataLoader` uses. Each row: "tokens" int64[T+1] and "shard", "row_group", "offset",
     the source position of the row's first token (offset into that row group's token stream).
  4. Order is kept end to end (`preserve_order=True`), so a single consumer sees exactly the rows
     of `DataLoader(shards, tokenizer, B, T, rank=0, world_size=1)` during the pass's epochs (the
     packer carries a row's worth of leftover tokens from one epoch into the next, as that loader
     does). The tokens left over at the end of a pass (< T+1, plus the rows of a last incomplete
     batch) are dropped. Ray Train applies its own
     execution options to dataset shards, so `ray_jobs/train.py` must pass
     `dataset_config=data_config()` to `TorchTrainer`, or the order is lost.

Why several epochs per pass: Ray Data runs a dataset anew for every pass (new tokenizer and packer
actors, each a fresh interpreter), 5-20 s before the first row. On a corpus the GPU reads in seconds
(the embedded one: ~1M tokens, two seconds of an H200 at depth 12) that start-up, paid every epoch,
was most of the run: the one-worker Ray run streamed 0.14x the plain script's tokens/s.
`epochs_per_pass` sizes a pass to a few hundred million tokens (or one epoch of a corpus larger
than that), which makes the start-up a fraction of a percent.

Tokenize once: after `python -m nanochat.dataset tokenize`, the token files (nanochat.tokenized:
each row group's BOS-prefixed stream, keyed by the tokenizer's fingerprint) replace stages 2 and 3.
The token counts in their manifest say, before anything runs, where every row starts (`row_items`),
so stateless tasks cut each row group's rows (`token_file_dataset`): the same rows and positions as
the actors', in blocks of the rows that start in one row group (at most G + T tokens, as the packer's
blocks, so the bound below holds), with no tokenizer or packer to start,
and task workers that stay warm from one pass, epoch or Tune trial to the next. Exact counts also
let a run of known length stream in one pass (`epochs_per_pass`).

Shards may live on disk, in object storage or behind a list of URLs (nanochat.shardfs): `data_dir`
is a directory, `s3://`/`gs://`/`file://` URI, or a `.txt` list of shard URIs.

Resuming after a failure: every batch comes with the position right after its last row (the first
token of the next row). At each checkpoint the workers all-gather their positions and rank 0 stores
`resume_position(positions)`, the earliest of them. `ray_jobs/train.py` hands Ray Train a dataset
*factory* (`DatasetFromLatest`) that Ray Train calls each time it starts a worker group: it reads
the latest checkpoint and builds `build_dataset(shards, ..., start=position, epochs=E)` (the rest
of that pass), with the full dataset for the later passes (`iter_train_batches(...,
epoch=position["epoch"], next_passes=..., epochs_per_pass=E)`). So a restart after a failure, or a `--resume`d run, streams on from the
checkpoint instead of from the beginning, and nothing has to be re-tokenized to skip ahead.

Tokens trained twice after a resume: none with one worker, and no token is ever skipped. With W
workers, Ray Train splits the stream with `streaming_split(W, equal=True)`; under preserve_order
that hands out whole packed blocks in stream order, each to the worker that has received the
fewest rows so far, and each worker trains its rows in the order it received them. When the block
holding the earliest worker's next row went out, every other worker had already received at least
as many rows, all earlier in the stream; as all workers have trained the same number of rows at a
checkpoint (they step together), each other worker has trained fewer rows past the resume point
than that block holds. Prefetched rows are not trained, so the prefetch depth does not enter. A
packed block is what `PackRows` makes of one row group: at most G + T tokens, G = tokens of the
largest row group. At the very end of a pass `equal=True` splits the last buffered blocks to
even out the workers, which can cost up to three blocks per worker. Bound: at most
(W - 1) x (G + T) tokens trained twice mid-pass, and 3 x (W - 1) x (G + T) near a pass's end
(e.g. 1000-document row groups of ~1M tokens and 8 workers: under 7M, resp. 21M tokens).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch
from ray.data import ExecutionOptions
from ray.data.collate_fn import NumpyBatchCollateFn

from nanochat import shardfs
from nanochat.dataloader import pack_rows
from nanochat.dataset import DataError, split_shards
from nanochat.shardfs import Source
from nanochat.tokenized import TOKENIZE_COMMAND, TokenFiles, find_token_files, packed_rows
from nanochat.tokenizer import Tokenizer

SOURCE_KEYS = ("epoch", "shard", "row_group")  # a row group's place in the stream; epoch: counted in the pass
POSITION_KEYS = (*SOURCE_KEYS, "offset")  # + the offset of a token in that row group's token stream
# Packing is array slicing: a fraction of a CPU, so it does not crowd out the tokenizers.
PACK_NUM_CPUS = 0.5


# -----------------------------------------------------------------------------
# the two stages


class TokenizeRowGroups:
    """Row-group work items -> one BOS-prefixed token stream per row group (actor pool UDF)."""

    def __init__(self, shards: list[Source], tokenizer_dir: str):
        self.shards = shards
        self.tokenizer = Tokenizer.load(tokenizer_dir)
        self.bos = self.tokenizer.bos_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        streams = []
        for shard, row_group in zip(batch["shard"], batch["row_group"], strict=True):
            # DataError names the file; Ray re-raises it to whoever iterates the dataset.
            docs = shardfs.read_row_group(self.shards[int(shard)], int(row_group))
            ids = self.tokenizer.encode(docs, prepend=self.bos)
            parts = [np.asarray(doc, dtype=np.int32) for doc in ids]
            streams.append(np.concatenate(parts))  # work items name no empty row group
        columns = {key: pa.array(batch[key], type=pa.int64()) for key in SOURCE_KEYS}
        return pa.table({**columns, "tokens": pa.array(streams, type=pa.list_(pa.int32()))})


class PackRows:
    """Token streams, in order -> rows of `row_len` tokens plus the position of each row's first token.

    Stateful: the tokens after the last full row wait here for the next row group, so this stage
    must run as exactly one actor that receives the row groups in stream order.
    """

    def __init__(self, row_len: int, skip: int = 0):
        self.row_len = row_len
        self.skip = skip  # tokens still to drop before the first row (resuming mid row group)
        self.buffer = np.zeros(0, dtype=np.int64)
        # pieces of the buffer: (index in buffer, source, offset of that token in its row group's stream),
        # source = (epoch, shard, row_group)
        self.pieces: list[tuple[int, tuple[int, ...], int]] = []

    def _append(self, source: tuple[int, ...], tokens: np.ndarray) -> None:
        offset = min(self.skip, len(tokens))
        self.skip -= offset
        if offset < len(tokens):
            self.pieces.append((len(self.buffer), source, offset))
            self.buffer = np.concatenate([self.buffer, tokens[offset:].astype(np.int64)])

    def _position(self, index: int) -> tuple[int, ...]:
        """(epoch, shard, row_group, offset) of buffer[index]."""
        start, source, offset = next(p for p in reversed(self.pieces) if p[0] <= index)
        return (*source, offset + index - start)

    def _keep_from(self, cut: int) -> None:
        """Drop buffer[:cut], keeping the positions of what remains."""
        kept = []
        for i, (start, source, offset) in enumerate(self.pieces):
            end = self.pieces[i + 1][0] if i + 1 < len(self.pieces) else len(self.buffer)
            if end > cut:
                first = max(start, cut)
                kept.append((first - cut, source, offset + first - start))
        self.pieces = kept
        self.buffer = self.buffer[cut:].copy()

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        if batch.num_rows:
            # flatten + lengths rather than to_pylist(): a row group holds up to millions of tokens
            lengths = pc.list_value_length(batch.column("tokens")).to_numpy()
            flat = pc.list_flatten(batch.column("tokens")).to_numpy()
            streams = np.split(flat, np.cumsum(lengths)[:-1])
            sources = zip(*(batch.column(key).to_pylist() for key in SOURCE_KEYS), strict=True)
            for source, stream in zip(sources, streams, strict=True):
                self._append(source, stream)
        rows, rest = pack_rows(self.buffer, self.row_len)
        positions = np.array([self._position(i * self.row_len) for i in range(len(rows))], dtype=np.int64)
        positions = positions.reshape(len(rows), len(POSITION_KEYS))
        out = {"tokens": rows.copy()}
        out.update({key: positions[:, k] for k, key in enumerate(POSITION_KEYS)})
        self._keep_from(len(self.buffer) - len(rest))
        return out


# -----------------------------------------------------------------------------
# building the dataset


def check_shards(data_dir: Source) -> list[Source]:
    """The train shards of `data_dir` (a directory, URI or URL list: nanochat.shardfs), after reading the
    footer of every shard (val included): a missing, lone or damaged shard fails here, on the driver, before
    Ray starts (in one line naming the file). Damage inside a row group's pages shows only when it is read,
    in a tokenizer actor (DataError too)."""
    shards = shardfs.list_shards(data_dir)
    for shard in shards:
        shardfs.open_shard(shard)
    return split_shards(shards, "train")


def training_data(data_dir: Source, tokenizer_dir: str | Path) -> tuple[list[Source], TokenFiles | None]:
    """The train shards of `data_dir`, and their token files for the tokenizer in `tokenizer_dir` where
    `python -m nanochat.dataset tokenize` writes them by default (None if it has not; stale ones are refused)."""
    shards = split_shards(shardfs.list_shards(data_dir), "train")
    return shards, find_token_files(data_dir, Tokenizer.load(tokenizer_dir), shards)


def work_items(shards: list[Source], start: dict | None, epochs: int = 1) -> list[dict[str, int]]:
    """One item per row group of `shards` and epoch (counted from 0), from the row group of `start`
    (a checkpoint's data position; its epoch is the caller's to count) on."""
    # Opening every shard here checks them all (readable parquet, a 'text' column) before any
    # worker starts; damage inside a row group surfaces later, from the tokenizer actors. Row groups
    # of zero rows are left out (and counted in the log), as the plain loader leaves them out.
    row_groups = shardfs.nonempty_row_groups(shards)
    first = 0
    if start is not None:
        where = (int(start["shard"]), int(start["row_group"]))
        if where not in row_groups:
            raise DataError(
                f"start position {start} names no row group of the {len(shards)} shards given: resume with "
                "the same shards (same order) as the run that saved it."
            )
        first = row_groups.index(where)
    items = [{"epoch": e, "shard": s, "row_group": g} for e in range(epochs) for s, g in row_groups]
    return items[first:]


# A pass of a few hundred million tokens hides its 5-20 s start-up (module docstring) behind about
# ten minutes of one fast GPU; the cap on row groups per pass keeps the work items (one block each,
# created on the driver) a few thousand.
TOKENS_PER_PASS = 1 << 28
ROW_GROUPS_PER_PASS = 8192
TEXT_BYTES_PER_TOKEN = 4.0  # BPE on English text; an estimate is enough to size a pass


def _footers(shards: list[Source]) -> tuple[int, int]:
    """(uncompressed bytes of the text column, row groups) of `shards`, from their parquet footers."""
    text_bytes, row_groups = 0, 0
    for path in shards:
        meta = shardfs.open_shard(path).metadata
        column = meta.schema.names.index("text")
        text_bytes += sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
        row_groups += meta.num_row_groups
    return text_bytes, row_groups


def estimated_tokens(shards: list[Source]) -> float:
    """Tokens in one epoch of `shards`, estimated from the parquet footers (uncompressed text bytes)."""
    return _footers(shards)[0] / TEXT_BYTES_PER_TOKEN


def epochs_per_pass(shards: list[Source], run_tokens: int | None = None, token_files: TokenFiles | None = None) -> int:
    """How many epochs one execution of the dataset streams: 1 for a corpus of TOKENS_PER_PASS tokens or
    more, enough epochs for about that many tokens for a smaller one, and no more than a run of
    `run_tokens` (when its length is known) reads, with a margin for the estimate: the pipeline runs
    ahead of training, and on a 2-core machine every epoch tokenized and split that the run never
    reads is taken from training. With `token_files` the count is exact and the margin one epoch (for
    the rows the split across workers leaves out at the end of a pass), so a run of known length
    streams in one execution."""
    text_bytes, row_groups = _footers(shards)
    if token_files is not None:
        tokens, factor = max(1, sum(map(sum, token_files.counts_of(shards)))), 1
    else:
        tokens, factor = max(1.0, text_bytes / TEXT_BYTES_PER_TOKEN), 2
    wanted = math.ceil(TOKENS_PER_PASS / tokens)
    if run_tokens:
        wanted = min(wanted, math.ceil(factor * run_tokens / tokens) + 1)
    return max(1, min(wanted, ROW_GROUPS_PER_PASS // max(1, row_groups)))


def build_dataset(
    shards: list[Source],
    tokenizer_dir: str | Path,
    seq_len: int,
    start: dict | None = None,
    epochs: int = 1,
    tokenize_concurrency: int = 2,
    tokenize_num_cpus: float = 1.0,
    token_files: TokenFiles | None = None,
) -> ray.data.Dataset:
    """`epochs` epochs of packed rows {"tokens": int64[seq_len + 1], "epoch", "shard", "row_group", "offset"}
    (epoch counted from 0 in this pass).

    `start` = {"shard": s, "row_group": g, "offset": k} (a position from `iter_train_batches`):
    begin at row group g of shards[s] and drop the first k tokens of the stream from there; k may
    run past that row group, into the following ones. Any "epoch" key is ignored here: the pass's
    first epoch is the start's (`iter_train_batches` counts them).

    With `token_files` (nanochat.tokenized, made by the tokenizer in `tokenizer_dir`) the rows are cut
    from those files by stateless tasks (`token_file_dataset`): the same rows and positions, no actors.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokenize_concurrency < 1:
        raise ValueError(f"tokenize_concurrency must be >= 1, got {tokenize_concurrency}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    shards = [shardfs.as_source(s) for s in shards]
    items = work_items(shards, start, epochs)
    skip = 0 if start is None else int(start["offset"])
    if skip < 0:
        raise ValueError(f"start offset must be >= 0, got {skip}")
    if token_files is not None:
        return _ordered(token_file_dataset(shards, token_files, items, skip, seq_len + 1, tokenize_concurrency))
    # One block per row group: a block is the unit the actors receive and the split hands out.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        TokenizeRowGroups,
        fn_constructor_kwargs={"shards": [str(s) for s in shards], "tokenizer_dir": str(tokenizer_dir)},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=tokenize_concurrency),
        num_cpus=tokenize_num_cpus,
    )
    with warnings.catch_warnings():
        # max_restarts goes in as a plain remote arg, which Ray 2.60 marks deprecated (removal in
        # 2.64) but offers no other way to pass
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            PackRows,
            fn_constructor_kwargs={"row_len": seq_len + 1, "skip": skip},
            batch_size=None,
            batch_format="pyarrow",
            # One task at a time: Ray Data lets actor tasks run out of order (it only keeps the
            # order of their outputs), and the packer must see the row groups in stream order.
            compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
            num_cpus=PACK_NUM_CPUS,
            # A restarted packer would have lost its carried tokens and skip count and would emit
            # wrong rows: fail instead.
            max_restarts=0,
        )
    return _ordered(ds)


def _ordered(ds: ray.data.Dataset) -> ray.data.Dataset:
    # The dataset's own context governs ds.iterator()/streaming_split; Ray Train uses data_config().
    ds.context.execution_options.preserve_order = True
    # Hand the consumer the DataError itself (it names the file), not a UserCodeException wrapper
    # that keeps it only as traceback text.
    ds.context.raise_original_map_exception = True
    return ds


def row_items(items: list[dict], lengths: list[int], skip: int, row_len: int) -> list[dict]:
    """Where each packed row starts, per work item: `items` (from `work_items`) with the tokens of each
    (`lengths`) -> those that hold the first token of some row, with "start" (the offset of their first
    row's first token) and "rows" (how many rows start in them). The stream is the items' token streams
    concatenated, the first `skip` tokens dropped, cut into rows of `row_len` with the rest dropped:
    the rows `PackRows` cuts, computed from token counts alone."""
    rows_in_pass = max(0, sum(lengths) - skip) // row_len
    out, begin = [], 0
    for item, length in zip(items, lengths, strict=True):
        # rows j with begin <= skip + j * row_len < begin + length
        first = max(0, -(-(begin - skip) // row_len))
        end = min(rows_in_pass, max(0, -(-(begin + length - skip) // row_len)))
        if end > first:
            out.append({**item, "start": skip + first * row_len - begin, "rows": end - first})
        begin += length
    return out


def _cut_rows(batch: dict[str, np.ndarray], shards: list[Source], files: TokenFiles,
              order: list[tuple[int, int]], row_len: int) -> dict[str, np.ndarray]:
    """One row item -> its packed rows and their positions (the output of `PackRows`)."""
    item = {key: int(value[0]) for key, value in batch.items()}
    rows = packed_rows(files, shards, order, item, row_len)
    out = {"tokens": rows}
    out.update({key: np.full(len(rows), item[key], dtype=np.int64) for key in SOURCE_KEYS})
    out["offset"] = item["start"] + row_len * np.arange(len(rows), dtype=np.int64)
    return out


def token_file_dataset(shards: list[Source], files: TokenFiles, items: list[dict], skip: int, row_len: int,
                       concurrency: int) -> ray.data.Dataset:
    """The packed rows of `items` cut from token files: one block per row group holding a row's first
    token, made by a stateless task (no tokenizer to load, no carried state: nothing to start but tasks),
    at most `concurrency` at a time (each new worker process costs seconds of imports; reading is fast)."""
    counts = files.counts_of(shards)
    order = [(s, g) for s, per_shard in enumerate(counts) for g, tokens in enumerate(per_shard) if tokens]
    index = {where: i for i, where in enumerate(order)}
    where = [(item["shard"], item["row_group"]) for item in items]
    if any(w not in index for w in where):  # a row group with documents and no tokens: not these shards' files
        raise DataError(f"the token files in {files.directory} do not match the shards' row groups: write them "
                        f"again with `{TOKENIZE_COMMAND} --overwrite`.")
    lengths = [counts[s][g] for s, g in where]
    placed = [{**item, "index": index[(item["shard"], item["row_group"])]}
              for item in row_items(items, lengths, skip, row_len)]
    # no rows at all when resuming at the very end of a pass: iter_train_batches goes on to the next pass
    ds = ray.data.from_items(placed, override_num_blocks=max(1, len(placed)))
    return ds.map_batches(_cut_rows, fn_kwargs={"shards": shards, "files": files, "order": order, "row_len": row_len},
                          batch_size=None, batch_format="numpy", num_cpus=PACK_NUM_CPUS,
                          compute=ray.data.TaskPoolStrategy(size=concurrency))


def data_config() -> ray.train.DataConfig:
    """The DataConfig `TorchTrainer(dataset_config=...)` needs: Train's ingest options plus preserve_order."""
    import ray.train  # here, not at the top: the data actors import this module and never need Train

    defaults = ray.train.DataConfig.default_ingest_options()
    options = ExecutionOptions(
        resource_limits=defaults.resource_limits,
        exclude_resources=defaults.exclude_resources,
        preserve_order=True,
        verbose_progress=defaults.verbose_progress,
    )
    return ray.train.DataConfig(execution_options=options)


# -----------------------------------------------------------------------------
# consuming it


class _RowsToBatch(NumpyBatchCollateFn):
    """numpy rows -> (x, y, position) on the host; runs in Ray's prefetch threads."""

    def __init__(self, pin: bool):
        self.pin = pin

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rows = batch["tokens"]
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1], dtype=np.int64))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64))
        if self.pin:  # pinned host memory lets the copy overlap with queued GPU work
            x, y = x.pin_memory(), y.pin_memory()
        last = {key: int(batch[key][-1]) for key in POSITION_KEYS}
        last["offset"] += rows.shape[1]  # the next row's first token
        return x, y, last


def iter_train_batches(
    data_iterator: ray.data.DataIterator,
    batch_size: int,
    device: torch.device | str,
    prefetch_batches: int = 2,
    epoch: int = 0,
    next_passes: ray.data.DataIterator | None = None,
    epochs_per_pass: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Endless (x, y, position): x, y int64 (batch_size, T) on `device`; position = where to resume after it.

    position = {"epoch", "shard", "row_group", "offset"}: the first token of the row after this
    batch's last row (offset may run past the end of its row group; `build_dataset` accepts that).
    Each pass over an iterator streams `epochs_per_pass` epochs (its dataset's `epochs`), the first
    numbered `epoch`. After a resume, pass the iterator of `build_dataset(start=position)` as
    `data_iterator` (read once: the rest of that pass) and the full dataset's iterator as
    `next_passes` (read for every later pass).

    The positions stay on the host (x and y alone go to the device), so reading them never waits
    for the GPU.
    """
    device = torch.device(device)
    # Returning a non-tensor tuple from the collate fn means Ray leaves device placement to us.
    collate = _RowsToBatch(pin=device.type == "cuda")
    iterator = data_iterator
    while True:
        batches = 0
        for x, y, position in iterator.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            prefetch_batches=prefetch_batches,
            device=device,
            collate_fn=collate,
        ):
            batches += 1
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y, {**position, "epoch": epoch + position["epoch"]}
        # A resumed pass may be empty (resumed right at the end of a pass); a full one may not.
        if batches == 0 and (next_passes is None or iterator is next_passes):
            raise ValueError(
                f"the dataset yields no full batch of {batch_size} rows per worker: use a smaller "
                "batch size or sequence length, fewer workers, or more data."
            )
        iterator = next_passes if next_passes is not None else data_iterator
        epoch += epochs_per_pass


def resume_position(positions: list[dict]) -> dict:
    """The earliest, in stream order, of the workers' positions: where a resumed run starts.

    Comparing (epoch, shard, row_group, offset) as tuples is exact even for offsets that run past
    their row group: positions handed out by one run are all row boundaries, T+1 tokens apart,
    and an offset runs at most T tokens past its row group. Rows the other workers trained past
    this point are trained again: at most (world_size - 1) x (G + T) tokens, G = tokens of the
    largest row group, or three times that near the end of a pass (the module docstring says why).
    """
    if not positions:
        raise ValueError("resume_position needs the position of at least one worker, got none")
    return dict(min(positions, key=lambda p: tuple(int(p.get(k, 0)) for k in POSITION_KEYS)))
