"""Sampling a batch in one Triton kernel: the draws of nanochat.infer.sampling (same hash, same
Gumbel-max, same top-k rule), one program per row, instead of a top-k sort and a dozen tensor ops.

Why: the tensor ops are a radix top-k over the vocabulary, then the noise and two argmaxes in dozens
of small kernels; on an H200 they take 184 us of GPU time per call for one row of 16 K logits, this
kernel 30 us (`python -m nanochat.scripts.bench_sampler`, docs/serving.md), against a 0.27 ms decode
step at depth 12. Here a
row's k-th largest logit is found by bisection over the logits' order-preserving integer keys (32
counting passes over a row held in registers, reloaded per pass only beyond MAX_BLOCK logits),
then one pass draws: no sort, no launches between.

A row's token is a function of its logits, temperature, top-k, seed and index only, as in the
tensor ops; the kernel agrees with them token for token but where two candidates' perturbed
logits differ by an ulp of the logarithm (Triton's and torch's logs may round differently).

Imports Triton; the kernel also runs on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 65536  # logits a program holds at once (64 per thread at 32 warps): a 65,536-token vocabulary in registers


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (products wrap at 2**32 as nanochat.infer.sampling masks them)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _flip(bits):
    """A negative int32's magnitude bits flipped: float32 bits <-> order-preserving keys (its own inverse)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key(x):
    """float32 -> int32 in the same order."""
    return _flip(x.to(tl.int32, bitcast=True))


@triton.jit
def _count_at_least(base, V, threshold, held, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """How many logits of the row have a key >= threshold (from `held` when the row is one block)."""
    if CHUNKS == 1:
        return tl.sum((held >= threshold).to(tl.int32), axis=0)
    total = 0
    for chunk in range(CHUNKS):
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        keys = _key(tl.load(base + offs, mask=offs < V, other=float("-inf")))
        total += tl.sum(((keys >= threshold) & (offs < V)).to(tl.int32), axis=0)
    return total


@triton.jit
def _kth_largest(base, V, k, lowest, highest, held, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """The k-th largest key of the row: the largest t with at least k keys >= t, by bisection
    between its smallest and largest key (int64 bounds: their distance can exceed int32)."""
    lo = lowest.to(tl.int64)
    hi = highest.to(tl.int64)
    for _ in range(32):
        if lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if _count_at_least(base, V, mid.to(tl.int32), held, BLOCK, CHUNKS) >= k:
                lo = mid
            else:
                hi = mid - 1
    return lo.to(tl.int32)


@triton.jit
def _sample(logits_ptr, temperature_ptr, top_k_ptr, seed_ptr, index_ptr, out_ptr, V, stride, BLOCK: tl.constexpr,
            CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    held = tl.zeros([BLOCK], dtype=tl.int32)
    if CHUNKS == 1:  # the row stays in registers for the bisection's passes
        offs = tl.arange(0, BLOCK)
        held = tl.where(offs < V, _key(tl.load(base + offs, mask=offs < V, other=float("-inf"))), -(2**31))
    # pass 1: the maximum (first index on ties: the greedy token) and the smallest key
    best = float("-inf")
    best_i = 0
    lowest = 2**31 - 1
    for chunk in range(CHUNKS):
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf"))
        m, i = tl.max(x, axis=0, return_indices=True)
        if m > best:
            best, best_i = m, chunk * BLOCK + i
        lowest = tl.minimum(lowest, tl.min(tl.where(offs < V, _key(x), 2**31 - 1), axis=0))
    token = best_i.to(tl.int64)
    if temperature > 0:
        threshold = float("-inf")
        if (top_k > 0) & (top_k < V):
            kth = _kth_largest(base, V, top_k, lowest, _key(best), held, BLOCK, CHUNKS)
            threshold = _flip(kth).to(tl.float32, bitcast=True)  # the key's float
        seed = tl.load(seed_ptr + row)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        index = (tl.load(index_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
        key = _mix32(_mix32(_mix32(lo ^ 0x5BD1E995) ^ hi) ^ index)
        # pass 2: Gumbel-max over the logits at or above the threshold
        drawn = float("-inf")
        drawn_i = 0
        for chunk in range(CHUNKS):
            offs = chunk * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf"))
            bits = _mix32(_mix32(key ^ offs.to(tl.uint32)) ^ key)
            uniform = ((bits >> 8).to(tl.float32) + 0.5) * (2.0**-24)
            gumbel = -tl.log(-tl.log(uniform))
            value = tl.where((x >= threshold) & (offs < V), (x - best) / temperature + gumbel, float("-inf"))
            m, i = tl.max(value, axis=0, return_indices=True)
            if m > drawn:
                drawn, drawn_i = m, chunk * BLOCK + i
        token = drawn_i.to(tl.int64)
    tl.store(out_ptr + row, token)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
    """(rows,) int64 tokens for float32 `logits` (rows, vocab), each row drawn with its own settings,
    as nanochat.infer.sampling.sample draws them (the other arguments: (rows,) tensors, same meaning)."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        logits = logits.float().contiguous()
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows:
        _sample[(rows,)](logits, temperature.contiguous(), top_k.contiguous(), seed.contiguous(), index.contiguous(),
                         out, vocab, logits.stride(0), BLOCK=block, CHUNKS=triton.cdiv(vocab, block),
                         num_warps=max(4, min(32, block // 1024)))
    return out
