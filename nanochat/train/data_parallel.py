"""Data-parallel training: gradient buckets launched from backward, optimizer state sharded over ranks.

Gradients are synchronised on the last micro-batch only, bucket by bucket as backward produces them
(DDP's idea: communication overlaps the rest of backward). With `shard=True` (ZeRO-1) a bucket is
reduce-scattered instead of all-reduced: each rank receives the averaged gradients of the parameters
it owns, steps only those (its optimizer holds only their state), and the new values are all-gathered.
Muon needs whole matrices, so a Muon matrix is owned whole by one rank (balanced by size); AdamW is
elementwise, so embeddings and the lm_head are split by rows over every rank.

The one rule: every rank launches the same collectives in the same order. Buckets are launched in a
fixed index order (a ready bucket waits for the ones before it), whatever order its gradients arrive in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nanochat.optim import grad_norm

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size
# torch 2.13 renamed these two (the old names warn); older releases have only the old names
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


@dataclass(frozen=True)
class Ownership:
    """Which rank updates a parameter: `owner` for a whole matrix, or every rank a row range (`rows`)."""

    owner: int | None  # None = split by rows over every rank
    rows_per_rank: int = 0

    def rows(self, rank: int, total: int) -> tuple[int, int]:
        start = min(rank * self.rows_per_rank, total)
        return start, min(start + self.rows_per_rank, total)

    def held(self, rank: int, total: int) -> tuple[int, int]:
        """The rows of a `total`-row parameter that `rank` steps: all, none, or its row range."""
        if self.owner is not None:
            return (0, total) if self.owner == rank else (0, 0)
        return self.rows(rank, total)


@dataclass(frozen=True)
class Layout:
    """Who steps which parameter and how gradients travel, worked out from shapes alone (no process group),
    so the memory and scaling models read the same layout the workers use."""

    ownership: list[Ownership]  # per parameter, in the order given
    buckets: list[list[int]]  # parameter indices per bucket, in launch order
    chunks: list[int]  # per bucket, the elements of one rank's segment (every segment padded to the largest)


def plan_layout(shapes: list[torch.Size], whole: list[bool], ranks: int, bucket_bytes: int = BUCKET_BYTES) -> Layout:
    """Buckets of consecutive parameters in backward order (the reverse of `shapes`), about `bucket_bytes` of
    fp32 gradients per rank's segment (more where one matrix is larger). Then, bucket by bucket, every
    parameter not `whole` is split by rows over all ranks, and each whole (Muon) matrix, largest first, goes
    to the rank with the smallest segment (ties: the rank owning least overall). Balancing inside each bucket
    keeps the padding small (a reduce-scatter moves `ranks` x the largest segment: within 17% of the
    gradients at depths 12-32 on 2-8 ranks, against up to 3.6x when ownership ignored the buckets); the
    price is a coarser balance of the optimizer work (the busiest of 8 ranks steps 5% more than 1/8 of the
    state at depth 12). `ranks` = 1 (replicated): rank 0 owns everything."""
    numel = [math.prod(shape) for shape in shapes]
    # room for a segment of `bucket_bytes`, and at least one of the largest matrices per rank: a bucket
    # with fewer matrices than ranks would pad the others' segments to a whole matrix
    limit = ranks * max(bucket_bytes // 4, max((n for n, w in zip(numel, whole, strict=True) if w), default=0))
    buckets: list[list[int]] = [[]]
    size = 0
    for i in reversed(range(len(shapes))):
        if buckets[-1] and size + numel[i] > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += numel[i]
    ownership: list[Ownership | None] = [None] * len(shapes)
    total, chunks = [0] * ranks, []
    for bucket in buckets:
        load = [0] * ranks
        for i in bucket:
            if not whole[i]:
                ownership[i] = own = Ownership(owner=None, rows_per_rank=-(-shapes[i][0] // ranks))
                for r in range(ranks):
                    first, last = own.held(r, shapes[i][0])
                    load[r] += (last - first) * (numel[i] // max(shapes[i][0], 1))
        for i in sorted((i for i in bucket if whole[i]), key=lambda i: -numel[i]):
            rank = min(range(ranks), key=lambda r: (load[r], total[r]))
            load[rank] += numel[i]
            ownership[i] = Ownership(owner=rank)
        total = [t + x for t, x in zip(total, load, strict=True)]
        chunks.append(max(load))
    return Layout(ownership, buckets, chunks)  # type: ignore[arg-type]


@dataclass
class Bucket:
    """Consecutive parameters (in backward order) communicated as one flat buffer of `world * chunk`
    elements: rank r's owned pieces (sharded) or everything (replicated) in segment r."""

    params: list[nn.Parameter]
    slots: list[list[tuple[int, int, int]]]  # per param, per rank: (offset in flat, first row, last row)
    chunk: int
    flat: Tensor
    out: Tensor | None  # sharded: this rank's segment after the reduce-scatter
    pending: int = 0
    work: dist.Work | None = None
    ready: bool = False


class DataParallel:
    """Synchronises one model's gradients over the default process group; see the module docstring.

    Use: `arm()` before the last micro-batch's backward, `finish(loss)` after it (returns the mean loss and
    the gradient norm), step `self.optimizer` (or, on a non-finite norm, skip it on every rank alike), then
    `gather_params()` (sharded)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, shard: bool = True,
                 comm_dtype: torch.dtype | None = None, bucket_bytes: int = BUCKET_BYTES):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.shard, self.comm_dtype = shard, comm_dtype
        params = [p for p in model.parameters() if p.requires_grad]
        kinds = {id(p): g.get("kind") for g in optimizer.param_groups for p in g["params"]}
        self.ranks = self.world if shard else 1  # segments per bucket
        layout = plan_layout([p.shape for p in params], [kinds.get(id(p)) == "muon" for p in params], self.ranks, bucket_bytes)
        self.ownership = {id(p): o for p, o in zip(params, layout.ownership, strict=True)}
        self.buckets = [self._bucket([params[i] for i in ids], chunk) for ids, chunk in zip(layout.buckets, layout.chunks, strict=True)]
        self.next_launch, self.armed = 0, False
        self.reference = optimizer  # the whole model's optimizer: its layout is the checkpoint's
        self.local: dict[int, Tensor] = {}  # id(param) -> what this rank steps (the param or a row view of it)
        self.optimizer = self._local_optimizer(optimizer) if shard else optimizer
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._on_grad(b))

    # -- layout -------------------------------------------------------------------------------------
    def _piece_rows(self, p: Tensor, rank: int) -> tuple[int, int]:
        """Rows of p that `rank` carries in its segment: all, none, or its row range (replicated: all)."""
        return self.ownership[id(p)].held(rank, p.shape[0])

    def _bucket(self, params: list[nn.Parameter], chunk: int) -> Bucket:
        sizes = [0] * self.ranks
        slots: list[list[tuple[int, int, int]]] = []
        for p in params:
            row = p[0].numel() if p.ndim else 1
            slots.append([])
            for r in range(self.ranks):
                first, last = self._piece_rows(p, r)
                slots[-1].append((r * chunk + sizes[r], first, last))
                sizes[r] += (last - first) * row
        dtype = self.comm_dtype or params[0].dtype
        flat = torch.zeros(chunk * self.ranks, dtype=dtype, device=params[0].device)  # padding stays zero
        out = torch.empty(chunk, dtype=dtype, device=flat.device) if self.shard else None  # this rank's reduced segment
        return Bucket(params, slots, chunk, flat, out, pending=len(params))

    # -- gradients ----------------------------------------------------------------------------------
    def arm(self) -> None:
        """The next backward is the step's last: its gradients are final and get launched as they land."""
        self.armed, self.next_launch = True, 0
        for b in self.buckets:
            b.pending, b.ready, b.work = len(b.params), False, None

    def _on_grad(self, bucket: Bucket) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            if not self.armed:
                return  # accumulating: no communication until the last micro-batch (DDP's no_sync)
            bucket.pending -= 1
            if bucket.pending == 0:
                bucket.ready = True
                self._launch_ready()
        return hook

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].ready:
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1

    def _launch(self, b: Bucket) -> None:
        for p, slots in zip(b.params, b.slots, strict=True):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            for off, first, last in slots:
                piece = grad[first:last].reshape(-1)
                b.flat[off:off + piece.numel()].copy_(piece)
            if self.shard:
                p.grad = None  # its copy is in the buffer now; _hand_out gives this rank's piece back
        b.flat.div_(self.world)  # average before the sum, so 16-bit buffers do not overflow
        if self.shard:
            b.work = reduce_scatter(b.out, b.flat, async_op=True)
        else:
            b.work = dist.all_reduce(b.flat, async_op=True)

    def finish(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """Launch what backward left (unused parameters), wait for every bucket, hand out the averaged
        gradients; returns the loss averaged over ranks and the norm of the whole averaged gradient, the
        same on every rank (inf or NaN on all of them when any rank holds a non-finite piece)."""
        for b in self.buckets[self.next_launch:]:
            b.ready = True
        self._launch_ready()
        self.armed = False
        for b in self.buckets:
            b.work.wait()
            self._hand_out(b)
        # a sharded rank holds only its own pieces: their squared norms add up to the whole's over the ranks
        # (replicated: every rank holds the whole, so each adds a world-th); one collective carries the loss too
        held = [t.grad for t in self.local.values()] if self.shard else [p.grad for b in self.buckets for p in b.params]
        squared = grad_norm(held).square() / (1 if self.shard else self.world)
        totals = torch.stack([loss.detach().float().reshape(()) / self.world, squared])
        dist.all_reduce(totals)
        return totals[0], totals[1].sqrt()

    def _hand_out(self, b: Bucket) -> None:
        source = b.out if self.shard else b.flat
        base = self.rank * b.chunk if self.shard else 0
        for p, slots in zip(b.params, b.slots, strict=True):
            target = self.local.get(id(p)) if self.shard else p
            if target is None:
                continue
            off = slots[self.rank if self.shard else 0][0] - base
            target.grad = source[off:off + target.numel()].view_as(target).to(p.dtype)

    # -- sharded optimizer --------------------------------------------------------------------------
    def _local_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The same optimizer class and groups over only what this rank owns (row views share storage)."""
        groups = []
        for group in optimizer.param_groups:
            local = []
            for p in group["params"]:
                first, last = self._piece_rows(p, self.rank)
                if last > first:
                    self.local[id(p)] = p if (first, last) == (0, p.shape[0]) else p.detach()[first:last]
                    local.append(self.local[id(p)])
            groups.append({**group, "params": local})
        if not any(g["params"] for g in groups):
            raise ValueError(f"rank {self.rank} owns no parameter: {self.world} workers is more than this model can shard over")
        return type(optimizer)(groups)

    @torch.no_grad()
    def gather_params(self) -> None:
        """After the step: every rank receives the new values of the parameters it does not own."""
        if not self.shard:
            return
        gathered = []
        for b in self.buckets:
            # the step's gradient buffers are free until the next backward: the new values travel through
            # them (padding stays zero), unless they are 16-bit and the parameters are not
            reuse = b.flat.dtype == b.params[0].dtype
            segment = b.out if reuse else torch.zeros(b.chunk, dtype=b.params[0].dtype, device=b.flat.device)
            for p, slots in zip(b.params, b.slots, strict=True):
                off, first, last = slots[self.rank]
                piece = p.detach()[first:last].reshape(-1)
                segment[off - self.rank * b.chunk:][:piece.numel()].copy_(piece)
            values = b.flat if reuse else torch.empty(b.chunk * self.world, dtype=segment.dtype, device=segment.device)
            gathered.append((b, values, all_gather(values, segment, async_op=True)))
        for b, values, work in gathered:
            work.wait()
            for p, slots in zip(b.params, b.slots, strict=True):
                for r, (off, first, last) in enumerate(slots):
                    if r != self.rank and last > first:
                        rows = p.data[first:last]
                        rows.copy_(values[off:off + rows.numel()].view_as(rows))

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer state as one process would hold it (every parameter whole), assembled from the
        owners' pieces, so a checkpoint resumes on any number of workers. Collective: every rank calls it."""
        if not self.shard:
            return self.optimizer.state_dict()
        params = [p for g in self.reference.param_groups for p in g["params"]]
        mine = {i: (self._piece_rows(p, self.rank)[0], {k: v.cpu() if torch.is_tensor(v) else v
                                                         for k, v in self.optimizer.state[self.local[id(p)]].items()})
                for i, p in enumerate(params) if id(p) in self.local and self.local[id(p)] in self.optimizer.state}
        everyone: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(everyone, mine)  # once per checkpoint; the pieces travel through the host
        state: dict[int, dict] = {}
        for i in range(len(params)):
            pieces = sorted((held[i] for held in everyone if i in held), key=lambda piece: piece[0])
            if pieces:
                state[i] = {k: torch.cat([s[k] for _, s in pieces]) if torch.is_tensor(v) and v.ndim else v
                            for k, v in pieces[0][1].items()}
        return {"state": state, "param_groups": self.reference.state_dict()["param_groups"]}

    def load_state_dict(self, full: dict) -> None:
        """Take this rank's pieces of a whole-parameter optimizer state (as state_dict writes it)."""
        if not self.shard:
            return self.optimizer.load_state_dict(full)
        params = [p for g in self.reference.param_groups for p in g["params"]]
        local_index = {id(t): j for j, t in enumerate(t for g in self.optimizer.param_groups for t in g["params"])}
        state = {}
        for i, p in enumerate(params):
            if id(p) in self.local and i in full["state"]:
                first, last = self._piece_rows(p, self.rank)
                state[local_index[id(self.local[id(p)])]] = {
                    k: v[first:last] if torch.is_tensor(v) and v.ndim else v for k, v in full["state"][i].items()}
        groups = [{**g, "params": [local_index[id(t)] for t in local["params"]]}
                  for g, local in zip(full["param_groups"], self.optimizer.param_groups, strict=True)]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


