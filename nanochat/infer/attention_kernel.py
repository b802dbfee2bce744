"""Attention of one decode step in two Triton kernels, with the step's key/value written into the
static cache on the way: `decode_attention` (a torch custom op, so torch.compile and CUDA graphs
take it as one opaque call that mutates the cache in place).

Split-K as in flash-decoding (Dao et al., 2023): each split of the cached columns reduces to a
partial softmax, and a second kernel merges the partials, attends to the step's own key/value (from
its inputs) and only then writes them into the cache, so no kernel reads a column another writes.
The query heads that share a key/value head are the rows of one product (`tl.dot` on tensor cores
from compute capability 8.0, CUDA cores below), so a cached column is read once per key/value head.
Scores, sums and the running maximum stay float32; float32 caches multiply in full precision, not
TF32. Why and how fast: docs/performance.md, "Decoding".

Rule: masking is the static cache's (nanochat.infer.graphs.StaticStep): row r sees columns
pad[r] .. pos - 1 of the cache, plus its new key at column pos.

Imports Triton: load it only where torch.compile runs (compute capability 7.0+). The kernels also
run on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanochat.infer.matvec_kernel import pdl_options, programmatic_launch

BLOCK = 64  # cache columns per inner iteration of a split
MAX_SPLITS = 64  # partials the merge kernel holds at once; longer caches get longer splits
MANY_PROGRAMS = 128  # (row, key/value head) pairs that fill a GPU without splitting columns finely


@triton.jit
def _split_partials(Q, KC, VC, Pos, Pad, M, L, Acc, q_row, q_head, c_row, c_head, c_col, scale,
                    KV_HEADS: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, QB: tl.constexpr,
                    BLOCK: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr, TENSOR_CORES: tl.constexpr,
                    PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (row x key/value head, split): softmax statistics of the REP query heads that share
    the key/value head, over the split's columns, so each cached column is read once for all of
    them. With TENSOR_CORES the queries are the rows of one product, padded to QB = 16 (the
    smallest tile); without (QB = REP rounded up to a power of two) the products are
    multiply-and-sum on CUDA cores."""
    if PDL:  # q comes from the kernel before: wait for it, then let the next kernel launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rk = tl.program_id(0)
    split = tl.program_id(1)
    row = rk // KV_HEADS
    kv_head = rk % KV_HEADS
    pos = tl.load(Pos)
    pad = tl.load(Pad + row)
    d = tl.arange(0, D)
    r = tl.arange(0, QB)
    real = r < REP
    heads = kv_head * REP + r
    q = tl.load(Q + row * q_row + heads[:, None] * q_head + d[None, :], mask=real[:, None], other=0.0)
    q = q.to(KC.dtype.element_ty)
    cache = row * c_row + kv_head * c_head
    m = tl.full([QB], float("-inf"), dtype=tl.float32)
    total = tl.zeros([QB], dtype=tl.float32)
    acc = tl.zeros([QB, D], dtype=tl.float32)
    start = split * STEPS * BLOCK
    # only blocks holding a column the row sees: a split past pos (or before the padding) does no work
    lo = tl.maximum(start, pad // BLOCK * BLOCK)
    hi = tl.minimum(start + STEPS * BLOCK, pos)
    for c0 in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK)
        seen = (cols >= pad) & (cols < pos)
        offsets = cache + cols[:, None] * c_col + d[None, :]
        k = tl.load(KC + offsets, mask=seen[:, None], other=0.0)
        v = tl.load(VC + offsets, mask=seen[:, None], other=0.0)
        if TENSOR_CORES:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (QB, BLOCK), float32
        else:
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        s = s * scale
        s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() finite
        p = tl.exp(s - m_safe[:, None])
        decay = tl.exp(m - m_safe)
        total = total * decay + tl.sum(p, axis=1)
        if TENSOR_CORES:  # the weights in the cache's dtype, as flash attention does; the sums stay float32
            acc = acc * decay[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            acc = acc * decay[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
        m = m_new
    out = (row * KV_HEADS * REP + heads) * tl.num_programs(1) + split
    tl.store(M + out, m, mask=real)
    tl.store(L + out, total, mask=real)
    tl.store(Acc + out[:, None] * D + d[None, :], acc, mask=real[:, None])


@triton.jit
def _merge_and_append(Q, KN, VN, KC, VC, Pos, M, L, Acc, Out, q_row, q_head, k_row, k_head, v_row, v_head,
                      c_row, c_head, c_col, o_row, o_head, scale, splits, HEADS: tl.constexpr, REP: tl.constexpr,
                      D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program (row x query head): merge the splits' partials with the new key/value into the
    output; the first query head of each key/value head then stores them in the cache."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rh = tl.program_id(0)
    row = rh // HEADS
    head = rh % HEADS
    kv_head = head // REP
    d = tl.arange(0, D)
    q = tl.load(Q + row * q_row + head * q_head + d).to(tl.float32) * scale
    k_new = tl.load(KN + row * k_row + kv_head * k_head + d)
    v_new = tl.load(VN + row * v_row + kv_head * v_head + d)
    s_new = tl.sum(q * k_new.to(tl.float32), axis=0)
    j = tl.arange(0, SPLITS)
    live = j < splits
    m = tl.load(M + rh * splits + j, mask=live, other=float("-inf"))
    total = tl.load(L + rh * splits + j, mask=live, other=0.0)
    acc = tl.load(Acc + (rh * splits + j)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    top = tl.maximum(tl.max(m, axis=0), s_new)  # finite: the new key is always seen
    w = tl.exp(m - top)
    w_new = tl.exp(s_new - top)
    y = (tl.sum(acc * w[:, None], axis=0) + w_new * v_new.to(tl.float32)) / (tl.sum(total * w, axis=0) + w_new)
    tl.store(Out + row * o_row + head * o_head + d, y.to(Out.dtype.element_ty))
    if head % REP == 0:
        column = row * c_row + kv_head * c_head + tl.load(Pos) * c_col + d
        tl.store(KC + column, k_new.to(KC.dtype.element_ty))
        tl.store(VC + column, v_new.to(VC.dtype.element_ty))


def supports(head_dim: int) -> bool:
    """The kernels take a whole head per program: its width must be a power of two, 16 or more."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _split_blocks(rows_x_heads: int, columns: int) -> int:
    """Blocks per split. One while there are few (row, head) programs, so that many short splits fill
    the GPU; two once there are many, so that each program streams longer (at depth 20, 32 rows on an
    H200: 0.65 ms for all layers vs 0.78 with one). Longer caches take more, to stay in MAX_SPLITS."""
    steps = 1 if rows_x_heads < MANY_PROGRAMS else 2
    return max(steps, -(-columns // (BLOCK * MAX_SPLITS)))


def tensor_cores(device: torch.device) -> bool:
    """Whether the split kernel multiplies with `tl.dot`: on compute capability 8.0 and up (Triton
    dropped its Volta tensor-core path in late 2024 and runs `tl.dot` as scalar FMAs below 8.0,
    where a product padded to 16 rows for one query would cost 16x the arithmetic), and on the CPU
    (the interpreter)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _pipeline_stages(cache: torch.Tensor) -> int:
    """Blocks in flight per program: two where both blocks' keys and values fit in half the shared
    memory a program may take (Ampere, Hopper), else one (a T4 has 64 KB, a V100 96 KB)."""
    if cache.device.type != "cuda":
        return 1
    shared = getattr(torch.cuda.get_device_properties(cache.device), "shared_memory_per_block_optin", 48 * 1024)
    return 2 if 2 * 2 * BLOCK * cache.size(-1) * cache.element_size() <= shared // 2 else 1


@torch.library.custom_op("nanochat::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     layer: int, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """q (R, H, 1, D) attends over layer `layer` of the caches (L, rows, KV, S, D), columns
    pad[r] .. pos - 1, and over its own k, v (R, KV, 1, D), which are then stored at column pos.
    Returns (R, H, 1, D) in q's dtype."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # any layout with whole heads
    kc, vc = k_cache[layer], v_cache[layer]
    rows, heads, _, dim = q.shape
    kv_heads, columns = k.size(1), kc.size(2)
    steps = _split_blocks(rows * kv_heads, columns)
    splits = -(-columns // (BLOCK * steps))
    partial = dict(device=q.device, dtype=torch.float32)
    m, total = torch.empty(rows * heads, splits, **partial), torch.empty(rows * heads, splits, **partial)
    acc = torch.empty(rows * heads, splits, dim, **partial)
    out = torch.empty_like(q)
    rep, scale, tensors = heads // kv_heads, dim**-0.5, tensor_cores(q.device)
    pdl = programmatic_launch(q.device)
    _split_partials[(rows * kv_heads, splits)](
        q, kc, vc, pos, pad, m, total, acc, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        scale, KV_HEADS=kv_heads, REP=rep, D=dim, QB=max(16 if tensors else 1, triton.next_power_of_2(rep)), BLOCK=BLOCK,
        STEPS=steps, STAGES=_pipeline_stages(kc), TENSOR_CORES=tensors, PRECISION="ieee" if kc.dtype == torch.float32 else "tf32",
        PDL=pdl, **pdl_options(pdl))
    _merge_and_append[(rows * heads,)](
        q, k, v, kc, vc, pos, m, total, acc, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1), scale, splits,
        HEADS=heads, REP=rep, D=dim, SPLITS=triton.next_power_of_2(splits), PDL=pdl, **pdl_options(pdl))
    return out


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, layer, pos, pad):
    return torch.empty_like(q)
