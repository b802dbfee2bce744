"""Sampling for a whole batch on the device: one token per row of a (rows, vocab) logits tensor, each
row with its own temperature (0 = greedy), top-k and seed, in tensor ops (replayed as CUDA graphs by a
served batch) or, where Triton is there, in one kernel (nanochat.infer.sample_kernel).

Rule: a row's token depends only on its logits, its seed and how many tokens it has sampled so far
(`index`), never on its batch mates or its place in the batch. The random numbers are a hash of
(seed, index, token id), counter-based as Philox is, and the Gumbel-max trick turns them into a
draw: argmax(logits / temperature + Gumbel noise) over the row's top k is distributed as
softmax(logits / temperature) restricted to those k tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24  # float32 holds 24-bit integers exactly


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors of values below 2**32: masking
    after each multiply keeps them there, so a product is never negative and right shifts stay logical."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def _gumbel(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) float32 Gumbel noise, a pure function of each row's (seed, index) and the token id."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32  # any int64 seed, negative ones included
    key = _mix32(_mix32(_mix32(lo ^ 0x5BD1E995) ^ hi) ^ (index & MASK32))[:, None]
    token = torch.arange(vocab, device=seed.device)
    # two rounds, the key mixed into both: rows whose keys differ by a few bits do not share noise
    bits = _mix32(_mix32(key ^ token) ^ key)
    uniform = ((bits >> (32 - _UNIFORM_BITS)).float() + 0.5) * 2.0**-_UNIFORM_BITS  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


def _draw(logits: torch.Tensor, allowed: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
          index: torch.Tensor) -> torch.Tensor:
    """Sampled rows: Gumbel-max over `allowed` (the logits, -inf outside the top k); greedy rows: argmax."""
    # shifted by the row's maximum first: a tiny temperature sends the others to -inf, not the maximum to inf
    scaled = (allowed - logits.amax(dim=1, keepdim=True)) / temperature[:, None]
    sampled = (scaled + _gumbel(seed, index, logits.size(1))).argmax(dim=1)
    return torch.where(temperature > 0, sampled, logits.argmax(dim=1))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
           index: torch.Tensor, max_top_k: int, fused: bool = False) -> torch.Tensor:
    """(rows,) token ids for (rows, vocab) `logits`; every other argument but the last two is a (rows,)
    tensor on the logits' device: temperature (float32, <= 0 = greedy), top_k (int64, <= 0 = the whole
    vocabulary), seed (any int64), index (int64: tokens the row has sampled before this one).
    `max_top_k` is the largest top_k of any row (0 = none has one), known on the host so that nothing
    here waits for the device. `fused`: on a CUDA device, draw in one Triton kernel
    (nanochat.infer.sample_kernel; where the precision plan compiles, so Triton is there)."""
    if fused and logits.is_cuda:
        from nanochat.infer.sample_kernel import sample_rows  # imports Triton

        return sample_rows(logits, temperature, top_k, seed, index)
    logits = logits.float()
    with torch.no_grad():
        if max_top_k <= 0:
            return _draw(logits, logits, temperature, seed, index)
        # each row's k-th largest logit, gathered at its own k; no threshold for a row without one
        top_values = torch.topk(logits, min(max_top_k, logits.size(1))).values
        kth = top_values.gather(1, (top_k.clamp(1, top_values.size(1)) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
        return _draw(logits, logits.masked_fill(logits < kth, float("-inf")), temperature, seed, index)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host values on `device` without waiting for the device: a plain copy to a CUDA
    device waits for all the work queued before it (a step launched ahead, say); a non-blocking copy
    from pinned memory is queued behind that work instead."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def as_int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits (seeds of 64 bits or more, or below -2**63)."""
    return (seed + 2**63) % 2**64 - 2**63


def request_seed(seed: int) -> int:
    """The decoding seed of a request's `seed` (the API's, or a test fault's): any integer, as one of 2**63."""
    return seed % 2**63


GRAPH_TOP_K = 1024  # the widest top-k a captured sampling serves; a wider one is sampled eagerly


def graph_width(max_top_k: int, vocab: int) -> int:
    """The top-k width of the captured sampling for a batch whose widest top-k is `max_top_k` (0 = none):
    the next power of two, so that a few graphs serve every width. Exact: each row gathers its own
    k-th value from the wider top, which holds it."""
    return 0 if max_top_k <= 0 else min(1 << (max(max_top_k, 2) - 1).bit_length(), vocab)


class BatchSampler:
    """The sampling settings of each row of a batch, kept on the device and written only when rows
    start sampling; `sample` draws one token for each row asked and advances those rows' counters.

    With `graphs` (CUDA, tensor-op sampling: no Triton kernel) the sampling of rows 0..n-1 from a
    static logits buffer (a captured decode step's) replays a CUDA graph per (buffer, rows, top-k
    width), captured by `warm_up`: launched from Python, the top-k, the hash and the draws are some 75
    kernels, and a decoding loop that runs ahead of the device waits on their launches, not on the
    device (docs/serving.md). The graphs share one memory pool: they run one at a time, and each one's
    tokens are used before the next runs."""

    def __init__(self, rows: int, device: torch.device, fused: bool = False, graphs: bool = False):
        self.device, self.fused = device, fused
        self.graphs = graphs and device.type == "cuda" and not fused
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.temperature = torch.zeros(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self._top_k = [0] * rows  # on the host: the top-k width without reading the device
        self.max_top_k = 0

    def start(self, rows: Sequence[int], temperature: Sequence[float], top_k: Sequence[int | None],
              seed: Sequence[int]) -> None:
        """Rows `rows` sample from now on with these settings (top_k None: the whole vocabulary),
        their token counters back at 0."""
        ids = to_device(list(rows), torch.long, self.device)
        ks = [k if k is not None and k > 0 else 0 for k in top_k]
        self.temperature[ids] = to_device(list(temperature), torch.float32, self.device)
        self.top_k[ids] = to_device(ks, torch.long, self.device)
        self.seed[ids] = to_device([as_int64(s) for s in seed], torch.long, self.device)
        self.index.index_fill_(0, ids, 0)
        for row, k in zip(rows, ks, strict=True):
            self._top_k[row] = k
        self.max_top_k = max(self._top_k)

    def stop(self, row: int) -> None:
        """Row `row` no longer samples: its top-k stops widening the batch's top-k."""
        self._top_k[row] = 0
        self.max_top_k = max(self._top_k)

    def sample(self, logits: torch.Tensor, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """(rows,) token ids on the device for `logits` (one row per entry of `rows`: a slice or an
        int64 tensor of row numbers); those rows' counters advance by one. Where a captured graph
        draws them (see the class), the tokens are its output buffer: use them before the next call."""
        width = graph_width(self.max_top_k, logits.size(1))
        if (self.graphs and isinstance(rows, slice) and not rows.start and rows.stop == logits.size(0)
                and width <= GRAPH_TOP_K):
            graph, tokens = self._graph(logits, width)
            graph.replay()
            return tokens
        return self._draw(logits, rows, self.max_top_k)

    def warm_up(self, logits: torch.Tensor) -> None:
        """Capture the sampling of every row of `logits` (a static buffer) at each top-k width a graph
        serves, so that nothing is captured while serving; nothing to do without `graphs`."""
        if self.graphs:
            vocab = logits.size(1)
            for width in sorted({0, *(min(1 << i, vocab) for i in range(1, GRAPH_TOP_K.bit_length()))}):
                self._graph(logits, width)

    def _draw(self, logits: torch.Tensor, rows: slice | torch.Tensor, max_top_k: int) -> torch.Tensor:
        tokens = sample(logits, self.temperature[rows], self.top_k[rows], self.seed[rows], self.index[rows],
                        max_top_k, self.fused)
        self.index[rows] += 1
        return tokens

    def _graph(self, logits: torch.Tensor, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured sampling of every row of `logits` (a static buffer) at top-k `width`."""
        key = (logits.data_ptr(), logits.size(0), width)
        if key not in self._graphs:
            rows = slice(0, logits.size(0))
            counters = self.index.clone()  # the warm-up draws advance them: put back after
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # the allocator's blocks, before the capture
                self._draw(logits, rows, width)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                tokens = self._draw(logits, rows, width)
            self.index.copy_(counters)
            self._graphs[key] = (graph, tokens)
        return self._graphs[key]
