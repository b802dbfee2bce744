"""Attention of one decode step in two Triton kernels, with the step's key/value written into the
static cache on the way: `decode_attention` (a torch custom op, so torch.compile and CUDA graphs
take it as one opaque call that mutates the cache in place).

Why: with one query per row, SDPA's kernels run one thread block per head over the whole cache, and
the two-matmul form costs three kernels plus two cache writes per layer; at depth 12-20 a decode
step is launch-bound, so each kernel saved counts. The split-K scheme is flash-decoding's (Dao et
al., 2023, "Flash-Decoding for long-context inference"): the cached columns are cut into splits,
each split reduces to a partial softmax (max, sum, weighted values), and a second kernel merges the
partials. Here the second kernel also attends to the step's own key/value (read from its inputs,
not from the cache) and only then writes them into the cache, so no kernel reads a column that
another one is writing.

Masking is the static cache's (nanochat.decode.StaticStep): row r sees columns pad[r] .. pos - 1
of the cache, plus its new key at column pos.

Imports Triton: load it only where torch.compile runs (Triton needs compute capability 7.0). The
kernels also run on CPU tensors under TRITON_INTERPRET=1, which is how the tests check them
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64  # cache columns per inner iteration of a split
MAX_SPLITS = 64  # partials the merge kernel holds at once; longer caches get longer splits


@triton.jit
def _split_partials(Q, KC, VC, Pos, Pad, M, L, Acc, q_row, q_head, c_row, c_head, c_col, scale,
                    HEADS: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                    STEPS: tl.constexpr):
    """Program (row x query head, split): softmax statistics of the query over the split's columns."""
    rh = tl.program_id(0)
    split = tl.program_id(1)
    row = rh // HEADS
    head = rh % HEADS
    pos = tl.load(Pos)
    pad = tl.load(Pad + row)
    d = tl.arange(0, D)
    q = tl.load(Q + row * q_row + head * q_head + d).to(tl.float32) * scale
    cache = row * c_row + (head // REP) * c_head
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for i in range(STEPS):
        cols = (split * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
        seen = (cols >= pad) & (cols < pos)
        offsets = cache + cols[:, None] * c_col + d[None, :]
        k = tl.load(KC + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
        v = tl.load(VC + offsets, mask=seen[:, None], other=0.0).to(tl.float32)  # both reads in flight at once
        s = tl.where(seen, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() finite
        p = tl.exp(s - m_safe)
        decay = tl.exp(m - m_safe)
        total = total * decay + tl.sum(p, axis=0)
        acc = acc * decay + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = rh * tl.num_programs(1) + split
    tl.store(M + out, m)
    tl.store(L + out, total)
    tl.store(Acc + out * D + d, acc)


@triton.jit
def _merge_and_append(Q, KN, VN, KC, VC, Pos, M, L, Acc, Out, q_row, q_head, k_row, k_head, v_row, v_head,
                      c_row, c_head, c_col, o_row, o_head, scale, splits, HEADS: tl.constexpr, REP: tl.constexpr,
                      D: tl.constexpr, SPLITS: tl.constexpr):
    """Program (row x query head): merge the splits' partials with the new key/value into the
    output; the first query head of each key/value head then stores them in the cache."""
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


@torch.library.custom_op("nanochat::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     layer: int, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """q (R, H, 1, D) attends over layer `layer` of the caches (L, rows, KV, S, D), columns
    pad[r] .. pos - 1, and over its own k, v (R, KV, 1, D), which are then stored at column pos.
    Returns (R, H, 1, D) in q's dtype."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # any layout with whole heads
    kc, vc = k_cache[layer], v_cache[layer]
    rows, heads, _, dim = q.shape
    columns = kc.size(2)
    steps = -(-columns // (BLOCK * MAX_SPLITS))  # iterations per split
    splits = -(-columns // (BLOCK * steps))
    partial = dict(device=q.device, dtype=torch.float32)
    m, total = torch.empty(rows * heads, splits, **partial), torch.empty(rows * heads, splits, **partial)
    acc = torch.empty(rows * heads, splits, dim, **partial)
    out = torch.empty_like(q)
    rep, scale = heads // k.size(1), dim**-0.5
    _split_partials[(rows * heads, splits)](
        q, kc, vc, pos, pad, m, total, acc, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        scale, HEADS=heads, REP=rep, D=dim, BLOCK=BLOCK, STEPS=steps)
    _merge_and_append[(rows * heads,)](
        q, k, v, kc, vc, pos, m, total, acc, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1), scale, splits,
        HEADS=heads, REP=rep, D=dim, SPLITS=triton.next_power_of_2(splits))
    return out


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, layer, pos, pad):
    return torch.empty_like(q)
