"""Single-process pretraining loader: shards -> BOS-prefixed token stream -> packed (x, y) batches.

Each document is tokenized with `<|bos|>` in front, documents are concatenated into one stream,
and the stream is cut into rows of T+1 tokens by `pack_rows` (the same function the Ray Data
pipeline uses). A row may span several documents; the BOS tokens tell the model where one ends.
x = row[:-1], y = row[1:].

Work is split by row group: rank r of world_size takes the row groups whose global index (over
all shards given, in order) is r modulo world_size. The stream of a rank loops over its row groups
forever; the epoch counter goes up at each wrap and the leftover tokens carry over.
Evaluation splits one stream instead: with `batch_split=(r, W)` every rank reads the whole stream and
hands out batches r, r+W, r+2W, ... of it, so W ranks see exactly the batches one process would.

The position saved by `state_dict()` is the first token not yet handed out: (epoch, shard,
row_group, offset into that row group's token stream). It does not depend on the batch size.

Batches are cut ahead on a thread that lives as long as the loader: `close()` it (or use it as a
context manager) when done, or the thread and its batches (pinned memory on CUDA) stay behind.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from nanochat.shardfs import Source, as_source, nonempty_row_groups, read_row_group
from nanochat.tokenizer import Tokenizer


def pack_rows(tokens: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 1-D token stream into as many full rows of `row_len` as fit.

    Returns (rows [n, row_len], remainder [len(tokens) - n * row_len]); both are views of `tokens`.
    """
    if tokens.ndim != 1:
        raise ValueError(f"pack_rows takes a 1-D token stream, got shape {tokens.shape}")
    if row_len < 2:
        raise ValueError(f"row_len must be >= 2 (one input and one target token), got {row_len}")
    num_rows = len(tokens) // row_len
    cut = num_rows * row_len
    return tokens[:cut].reshape(num_rows, row_len), tokens[cut:]


@dataclass
class _Chunk:
    """Not-yet-consumed tokens of one row group; `offset` = position of tokens[0] in its stream."""

    epoch: int
    item: int  # index into this rank's list of row groups
    offset: int
    tokens: np.ndarray


class DataLoader:
    """Endless iterator of (x, y) int64 tensors of shape (batch_size, seq_len) on `device`."""

    def __init__(
        self,
        shards: list[Source],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        num_threads: int = 8,
        prefetch: int = 2,
        batch_split: tuple[int, int] = (0, 1),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        split_rank, split_world = batch_split
        if not 0 <= split_rank < split_world:
            raise ValueError(f"batch_split must be (rank, world) with 0 <= rank < world, got {batch_split}")
        if state is not None and split_world > 1:
            raise ValueError("a loader split by batches (evaluation) reads its stream from the start: it takes no state")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.shards = [as_source(s) for s in shards]
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.num_threads = num_threads
        self._bos = tokenizer.bos_token_id
        # Opening every shard up front also validates them all before training starts.
        all_row_groups = nonempty_row_groups(self.shards)
        self._work = all_row_groups[rank::world_size]
        if not self._work:
            raise ValueError(
                f"rank {rank} of {world_size} gets no row groups: the {len(self.shards)} shards hold only "
                f"{len(all_row_groups)} that hold documents. Use fewer ranks or rebuild with smaller row groups (--docs-per-row-group)."
            )
        self._next_epoch, self._next_item = 0, 0  # the row group to read after the pending ones
        self._split_world = split_world
        self._skip = split_rank  # batches of the stream to pass over before the next one handed out
        self._pending: deque[_Chunk] = deque()
        if state is not None:
            self._restore(state)
        self._state = self._position()
        # batches are cut ahead of time on a background thread, `prefetch` at most
        self.prefetch = prefetch
        self._ready: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # set by close(): the thread exits before it cuts another batch

    # --- reading -------------------------------------------------------------

    def _read_next_chunk(self) -> _Chunk:
        shard, row_group = self._work[self._next_item]
        docs = read_row_group(self.shards[shard], row_group)
        ids = self.tokenizer.encode(docs, prepend=self._bos, num_threads=self.num_threads)
        tokens = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in ids])
        chunk = _Chunk(self._next_epoch, self._next_item, 0, tokens)
        self._next_item += 1
        if self._next_item == len(self._work):
            self._next_epoch, self._next_item = self._next_epoch + 1, 0
        return chunk

    def _take(self, count: int) -> np.ndarray:
        """The next `count` tokens of the stream, reading row groups as needed."""
        while sum(len(c.tokens) for c in self._pending) < count:
            self._pending.append(self._read_next_chunk())
        parts = []
        while count:
            chunk = self._pending[0]
            used = min(count, len(chunk.tokens))
            parts.append(chunk.tokens[:used])
            chunk.tokens, chunk.offset = chunk.tokens[used:], chunk.offset + used
            count -= used
            if len(chunk.tokens) == 0:
                self._pending.popleft()
        return np.concatenate(parts)

    def _host_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The next (x, y) on the host and the stream position right after it."""
        row_len = self.seq_len + 1
        if self._skip:  # other ranks' batches (batch_split): read, never handed out
            self._take(self._skip * self.batch_size * row_len)
        self._skip = self._split_world - 1
        rows, _ = pack_rows(self._take(self.batch_size * row_len), row_len)
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with queued GPU work
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, self._position()

    def _produce(self) -> None:
        """Background thread: keeps `prefetch` batches ready (tokenizing releases the GIL)."""
        try:
            while not self._stop.is_set():
                self._ready.put(self._host_batch())
        except BaseException as error:  # handed to the consumer, e.g. a DataError naming the file
            self._ready.put(error)

    def _drain(self) -> None:
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Stop the prefetch thread and drop what it cut ahead; the loader hands out nothing after this."""
        self._stop.set()
        if self._thread is not None:
            # Emptying the queue frees a thread blocked on a full one; it puts at most one more item
            # (the batch it was cutting), which fits, and then sees the stop.
            self._drain()
            self._thread.join()
            self._thread = None
        self._drain()
        self._pending.clear()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stop.is_set():
            raise RuntimeError("this DataLoader was closed: make a new one to read on (its state_dict() says from where)")
        if not self.prefetch:
            x, y, self._state = self._host_batch()
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._produce, daemon=True, name="nanochat-loader")
                self._thread.start()
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            x, y, self._state = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # --- resuming ------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serializable position of the first token not yet returned (prefetched batches don't count)."""
        return dict(self._state)

    def _position(self) -> dict:
        if self._pending:
            chunk = self._pending[0]
            epoch, item, offset = chunk.epoch, chunk.item, chunk.offset
        else:
            epoch, item, offset = self._next_epoch, self._next_item, 0
        shard, row_group = self._work[item]
        return {"epoch": epoch, "shard": shard, "row_group": row_group, "offset": offset}

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    def _restore(self, state: dict) -> None:
        location = (int(state["shard"]), int(state["row_group"]))
        if location not in self._work:
            raise ValueError(
                f"loader state points at shard {location[0]} row group {location[1]}, which this rank does "
                "not read: resume with the same shards, rank and world_size as the run that saved it."
            )
        self._next_epoch, self._next_item = int(state["epoch"]), self._work.index(location)
        chunk = self._read_next_chunk()
        offset = int(state["offset"])
        if not 0 <= offset <= len(chunk.tokens):
            raise ValueError(
                f"loader state offset {offset} is past the {len(chunk.tokens)} tokens of shard {location[0]} row group "
                f"{location[1]}: the shards or the tokenizer changed since the state was saved."
            )
        chunk.tokens, chunk.offset = chunk.tokens[offset:], offset
        if len(chunk.tokens):
            self._pending.append(chunk)
