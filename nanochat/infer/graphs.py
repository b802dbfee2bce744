"""Fast one-token decode steps: a static KV cache replayed as CUDA graphs (compiled where the plan allows).

A decode step of a small model is hundreds of tiny kernels that Python would launch one by one:
here it is one graph replay, compiled first where the plan compiles (with the Triton attention of
nanochat.infer.attention_kernel), eager kernels on the P100 plan. Why: docs/performance.md.

Rule: a graph replays fixed addresses and shapes, so the step may not depend on Python numbers that
change between tokens: `StaticStep` keeps the write position on the device, writes keys/values in
place and masks the cache's whole width. The step runs `decode_copy(model)`, refreshed from the
model by `sync_weights()` (per request: a model being trained, as in RL, is decoded as it is).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nanochat.gpt import GPT, AttentionCache, attention
from nanochat.infer.cache import KVCache
from nanochat.precision import PrecisionPlan

MODES = ("auto", "eager", "static", "graph")
# prompt columns of a captured prefill: a group of prompts is left-padded up to the next of these
PREFILL_WIDTHS = (16, 32, 64, 128)
PREFILL_MAX_TOKENS = 1024  # rows x columns of the largest captured prefill; larger groups prefill eagerly


class StaticStep(AttentionCache):
    """The cache of a one-token forward whose every input lives on the device.

    `pos` (shape (1,)) is the column written this step, `pad` (rows,) each row's first real
    column. Implements what GPT.forward asks of an AttentionCache, for T = 1 only."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, fused: bool = False):
        self.k, self.v, self.pos_t, self.pad = k, v, pos, pad
        self.pos = 0  # GPT.forward's bound check only; the real position is pos_t
        self.fused = fused  # attention and cache write in Triton kernels (nanochat.infer.attention_kernel)

    def positions(self, num_tokens: int, rows: int | None = None) -> torch.Tensor:
        return (self.pos_t - self.pad)[:, None].clamp(min=0)

    def attention_mask(self, num_tokens: int, device: torch.device, rows: int | None = None) -> tuple[torch.Tensor, bool]:
        keys = torch.arange(self.k.size(3), device=device)
        seen = ((keys >= self.pad[:, None]) | (keys == self.pos_t)) & (keys <= self.pos_t)  # (rows, S)
        return seen[:, None, None, :], False

    # Left out of compilation (`_compiled_one_token` wraps it in torch.compiler.disable): compiled
    # code that writes into a view of an input writes the whole input back afterwards (a copy of the
    # full cache at every step). The graph break costs only at capture time; a replayed graph has no
    # Python in it.
    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = k.size(0)
        self.k[layer, :rows].index_copy_(2, self.pos_t, k)
        self.v[layer, :rows].index_copy_(2, self.pos_t, v)
        return self.k[layer, :rows], self.v[layer, :rows]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               causal: bool) -> torch.Tensor:
        if self.fused:
            from nanochat.infer.attention_kernel import decode_attention  # imports Triton

            return decode_attention(q, k, v, self.k, self.v, layer, self.pos_t, self.pad)
        k, v = self.insert(layer, k, v)
        return attention(q, k, v, mask, causal)

    def advance(self, num_tokens: int) -> None:
        pass  # the caller advances the real KVCache after the step


def _one_token(model: nn.Module, ids: torch.Tensor, step: StaticStep) -> torch.Tensor:
    return model(ids, kv_cache=step)[:, -1, :]


def _last_logits(model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    # a copy, not a view: a view would keep every column's logits (rows x columns x vocab) alive in the graph's pool
    return model(ids, kv_cache=cache)[:, -1, :].clone()


@functools.cache
def _compiled_one_token() -> Callable:
    """`_one_token` under torch.compile, built on first use (importing inductor costs every entry point
    seconds otherwise). Programmatic dependent launch (compute capability 9.0+, where this torch has the
    option) lets each generated kernel launch while the one before it ends, as the kernels of
    nanochat.infer.matvec_kernel and nanochat.infer.attention_kernel do."""
    from torch._inductor import config as inductor_config

    # here, not as a decorator on the method: torch.compiler.disable imports dynamo (seconds) at once
    StaticStep.insert = torch.compiler.disable(StaticStep.insert)
    pdl = {"triton.enable_pdl": True} if hasattr(inductor_config.triton, "enable_pdl") else {}
    return torch.compile(_one_token, dynamic=None, options=pdl)


def decode_copy(model: GPT, dtype: torch.dtype, few_row_kernel: bool) -> GPT:
    """A frozen copy of `model` for decode steps, with the same parameter names (for sync_weights):
    q/k/v fused into one matmul per layer (at these sizes a matmul costs its launch, whatever its
    width); the matrices in `dtype`, so autocast does not cast every weight at every step (the
    embedding and rotary tables stay float32, as under autocast); and, with `few_row_kernel` (Triton
    is there), every nn.Linear turned into a matvec_kernel.FewRowLinear by swapping its class."""
    copied = copy.deepcopy(model).eval().requires_grad_(False)
    for block in copied.transformer.h:
        block.attn.fuse_qkv()
    for module in copied.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    if few_row_kernel:
        from nanochat.infer.matvec_kernel import FewRowLinear  # imports Triton

        for module in copied.modules():
            if type(module) is nn.Linear:
                module.__class__ = FewRowLinear  # a subclass with the same state: module tree and names stay
    return copied


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    pos: torch.Tensor
    pad: torch.Tensor
    logits: torch.Tensor


@dataclass
class _PrefillGraph:
    graph: torch.cuda.CUDAGraph | None  # None in "static" mode
    ids: torch.Tensor  # (rows, columns)
    cache: KVCache  # its pad: (rows,)
    logits: torch.Tensor


class Decoder:
    """One-token forwards over a KVCache: `decoder(ids, cache)` -> (rows, vocab) float32 logits.
    In graph mode the logits are a view of the graph's output buffer: use them (sample, copy)
    before the next call, which overwrites them.

    mode: "eager" runs the model as it is (any device); "static" runs the graph's computation
    without capturing it (for tests on the CPU); "graph" captures and replays CUDA graphs;
    "auto" is "graph" on CUDA, else "eager"."""

    def __init__(self, model: GPT, plan: PrecisionPlan, mode: str = "auto", compile: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {', '.join(MODES)}, not {mode!r}")
        device = next(model.parameters()).device
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"decode mode 'graph' needs a CUDA device; the model is on {device.type}")
        self.model, self.plan, self.mode = model, plan, mode
        self.compile = plan.compile and mode == "graph" if compile is None else compile
        self._copy: nn.Module | None = None
        self._graphs: dict[int, _Graph] = {}  # by rows, for the cache at _cache_ptr
        self._cache_ptr: int | None = None
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefills: dict[tuple[int, int], _PrefillGraph] = {}  # by (rows, columns)
        self._prefill_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # shared: prefills never overlap
        self._prefill_pool = None  # the captured prefills' memory pool, shared for the same reason

    @property
    def fused(self) -> bool:
        """Whether the captured steps attend with nanochat.infer.attention_kernel's Triton kernels:
        where the step is compiled (so Triton is there) and the head width suits them."""
        if not self.compile:
            return False
        from nanochat.infer.attention_kernel import supports

        return supports(self.model.config.n_embd // self.model.config.n_head)

    @property
    def weights(self) -> nn.Module:
        """The model the static steps run: its decode copy, made on first use."""
        if self.mode == "eager":
            return self.model
        if self._copy is None:
            self._copy = decode_copy(self.model, self.plan.torch_dtype, few_row_kernel=self.compile)
        return self._copy

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the model's current weights into the decode copy (if there is one yet)."""
        if self._copy is None:
            return
        source = dict(self.model.named_parameters())
        mine = [(p, source[name]) for name, p in self._copy.named_parameters() if name in source]
        torch._foreach_copy_([p for p, _ in mine], [s for _, s in mine])
        for block, src in zip(self._copy.transformer.h, self.model.transformer.h, strict=True):
            block.attn.load_qkv(src.attn.c_q, src.attn.c_k, src.attn.c_v)

    def workspace(self, rows: int, min_len: int, like: KVCache) -> KVCache:
        """An empty KVCache of `rows` rows and at least `min_len` columns (rounded up to 256) whose
        tensors are reused from call to call while that shape stays the same, so captured graphs stay valid."""
        columns = -(-min_len // 256) * 256
        k = like.k
        shape = (k.size(0), rows, k.size(2), columns, k.size(4))
        cache = KVCache(like.num_layers, columns)
        held = self._workspace
        if held is None or held[0].shape != shape or held[0].dtype != k.dtype or held[0].device != k.device:
            self._graphs.clear()
            # zeros, not empty: attention weighs masked columns by 0, and 0 * NaN garbage would be NaN
            held = (k.new_zeros(shape), k.new_zeros(shape))
            self._workspace = held
        cache.k, cache.v = held
        return cache

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.mode == "eager" or cache.k is None:
            with self.plan.compute_context():
                return self.model(ids, kv_cache=cache)[:, -1, :]
        if cache.pos >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.pos + 1} positions needed, {cache.max_len} allocated")
        if self.mode == "static":
            rows = ids.size(0)
            pad = cache.pad[:rows] if cache.pad is not None else torch.zeros(rows, dtype=torch.long, device=ids.device)
            logits = self._static(ids, cache, torch.tensor([cache.pos], device=ids.device), pad)
        else:
            logits = self._replay(ids, cache)
        cache.advance(1)
        return logits

    def step_rows(self, rows: int, limit: int) -> int:
        """The rows a one-token step of `rows` rows computes: in graph mode rounded up to a power of two
        (at most `limit`, the cache's rows) so that a few graphs cover every batch, the extra rows
        being free slots of the cache, masked to themselves, output dropped; `rows` in other modes."""
        return min(1 << (rows - 1).bit_length(), limit) if self.mode == "graph" else rows

    def _replay(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        rows = ids.size(0)
        if cache.k.data_ptr() != self._cache_ptr:
            self._graphs.clear()  # graphs of an earlier cache would write into memory it no longer owns
            self._cache_ptr = cache.k.data_ptr()
        padded = self.step_rows(rows, cache.k.size(1))
        g = self._graphs.get(padded)
        fresh = g is None
        if fresh:
            g = self._graphs[padded] = self._buffers(padded, ids.device)
        g.ids[:rows].copy_(ids)
        if cache.pad is None:
            g.pad[:rows].zero_()
        else:
            g.pad[:rows].copy_(cache.pad[:rows])
        g.pad[rows:].fill_(cache.max_len + 1)  # a free row sees only its own column
        g.pos.fill_(cache.pos)
        if not fresh:
            g.graph.replay()
            return g.logits[:rows]
        try:
            self._capture(g, cache)  # its warm-up runs compute this very step
        except Exception as e:  # noqa: BLE001 - any failure to compile or capture: decode eagerly instead
            print(f"decode: capturing the CUDA graph failed ({type(e).__name__}: {e}); decoding eagerly from now on",
                  flush=True)
            self.mode, self._graphs = "eager", {}
            # this step still on the static inputs (the caller advances the cache)
            return self._static(g.ids, cache, g.pos, g.pad)[:rows]
        return g.logits[:rows]

    def _static(self, ids: torch.Tensor, cache: KVCache, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The graph's computation run eagerly, on inputs that live on the device."""
        with self.plan.compute_context():
            return _one_token(self.weights, ids, StaticStep(cache.k, cache.v, pos, pad))

    # ---- prefill: a whole group of prompts in one captured graph

    def prefill_shape(self, rows: int, columns: int) -> tuple[int, int] | None:
        """The captured prefill that holds `rows` prompts left-padded to `columns` (both rounded up), or
        None where there is none (eager decoding, or a group too wide or too large)."""
        if self.mode not in ("static", "graph"):
            return None
        width = next((w for w in PREFILL_WIDTHS if w >= columns), None)
        padded = 1 << (rows - 1).bit_length()
        return None if width is None or padded * width > PREFILL_MAX_TOKENS else (padded, width)

    def prefill_shapes(self, max_rows: int) -> list[tuple[int, int]]:
        """Every captured prefill that groups of up to `max_rows` prompts can use."""
        shapes = {self.prefill_shape(rows, width) for rows in range(1, max_rows + 1) for width in PREFILL_WIDTHS}
        return sorted(shapes - {None})

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> tuple[KVCache, torch.Tensor] | None:
        """Prefill a left-padded group of prompts (ids (rows, columns), pad (rows,)) in one captured graph,
        padded further up to its shape: (their cache, the logits of their last column), views of the
        graph's buffers that the next prefill overwrites; None where no captured shape holds the group
        (the caller prefills eagerly). One replay instead of launching every kernel of the forward
        from Python: on an H200, 8-12 ms of host time per prefill at depth 12 -> about 1-2 ms."""
        rows, columns = ids.shape
        shape = self.prefill_shape(rows, columns)
        if shape is None:
            return None
        p = self._prefills.get(shape) or self._new_prefill(shape, ids.device)
        extra = shape[1] - columns
        p.ids.zero_()  # padding: any token, no query attends to it
        p.ids[:rows, extra:] = ids
        p.cache.pad[:rows] = pad + extra
        p.cache.pad[rows:].fill_(shape[1])  # a row of nothing but padding: each query sees itself only
        if p.graph is None:
            p.cache.pos = 0
            p.logits = self._prefill_forward(p)
        else:
            p.graph.replay()
        view = KVCache(p.cache.num_layers, columns, pad=pad)
        view.k, view.v, view.pos = p.cache.k[:, :rows, :, extra:], p.cache.v[:, :rows, :, extra:], columns
        return view, p.logits[:rows]

    def _prefill_forward(self, p: _PrefillGraph) -> torch.Tensor:
        with self.plan.compute_context():
            return _last_logits(self.weights, p.ids, p.cache)

    def _new_prefill(self, shape: tuple[int, int], device: torch.device) -> _PrefillGraph:
        """The buffers of a prefill shape, captured in graph mode: the cache's keys and values are views
        of one buffer that every shape shares (allocated for the largest), outside the graphs' pool."""
        rows, columns = shape
        cfg = self.model.config
        if self._prefill_kv is None:
            dtype = self.plan.torch_dtype if device.type == "cuda" else torch.float32
            size = cfg.n_layer * PREFILL_MAX_TOKENS * cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
            self._prefill_kv = (torch.zeros(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device))
        kv_shape = (cfg.n_layer, rows, cfg.n_kv_head, columns, cfg.n_embd // cfg.n_head)
        cache = KVCache(cfg.n_layer, columns, pad=torch.zeros(rows, dtype=torch.long, device=device))
        cache.k, cache.v = (t[: kv_shape[0] * rows * kv_shape[2] * columns * kv_shape[4]].view(kv_shape) for t in self._prefill_kv)
        p = self._prefills[shape] = _PrefillGraph(None, torch.zeros(rows, columns, dtype=torch.long, device=device),
                                                  cache, torch.empty(0, device=device))
        if self.mode == "graph":
            self._capture_prefill(p)
        return p

    def _capture_prefill(self, p: _PrefillGraph) -> None:
        device = p.ids.device
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # workspaces and lazy initialisation, before the capture
                p.cache.pos = 0
                self._prefill_forward(p)
        torch.cuda.current_stream(device).wait_stream(side)
        p.graph = torch.cuda.CUDAGraph()
        p.cache.pos = 0
        with torch.cuda.graph(p.graph, pool=self._prefill_pool):
            p.logits = self._prefill_forward(p)

    def _buffers(self, rows: int, device: torch.device) -> _Graph:
        return _Graph(torch.cuda.CUDAGraph(), torch.zeros(rows, 1, dtype=torch.long, device=device),
                      torch.zeros(1, dtype=torch.long, device=device), torch.zeros(rows, dtype=torch.long, device=device),
                      torch.empty(0, device=device))

    def _capture(self, g: _Graph, cache: KVCache) -> None:
        """Capture the step on g's input buffers, which already hold this step's inputs: the warm-up
        runs (compilation, cuBLAS/attention workspaces; capture needs them on a side stream) compute
        the step for real, and the captured graph is not replayed this time."""
        step = StaticStep(cache.k, cache.v, g.pos, g.pad, fused=self.fused)
        fn = _compiled_one_token() if self.compile else _one_token
        weights = self.weights
        device = g.ids.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self.plan.compute_context():
            for _ in range(2):
                logits = fn(weights, g.ids, step)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(g.graph), self.plan.compute_context():
            g.logits = fn(weights, g.ids, step)
        g.logits.copy_(logits)  # the warm-up's result, into the graph's own output buffer
