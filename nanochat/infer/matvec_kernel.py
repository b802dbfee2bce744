"""The matmuls of a one- or two-row decode step as a Triton matrix-vector kernel: `decode_linear`
(a torch custom op, opaque to torch.compile and capturable in a CUDA graph).

With one row, a decode step's matmuls are bound by how soon their weight reads get going, not by
bandwidth: each program here holds its whole slice of the weights, so all its loads are in flight
at once. On compute capability 9.0+ it uses programmatic dependent launch: it loads its weights
(which no kernel of the step writes) before waiting for the kernel ahead, and lets the next one
launch once it has waited, the rule torch.compile's kernels keep under `triton.enable_pdl`.
`supports` follows `python -m nanochat.scripts.bench_matvec` (docs/performance.md).

Imports Triton; the kernel also runs on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 16384  # weight elements per program: with 4 warps, 128 per thread held in registers


@triton.jit
def _matvec(X, W, Y, N, K, x_row, ROWS: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
    """Program: BN output features of every row, from BN whole rows of W (KP = K rounded up to a
    power of two)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, KP)
    w = tl.load(W + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
    w = w.to(tl.float32)
    if PDL:  # weights are loaded (or on their way): now wait for x, and let the next kernel launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for row in tl.static_range(ROWS):
        x = tl.load(X + row * x_row + k, mask=k < K, other=0.0).to(tl.float32)
        y = tl.sum(w * x[None, :], axis=1)
        tl.store(Y + row * N + n, y.to(Y.dtype.element_ty), mask=n < N)


def _padded(in_features: int) -> int:
    return triton.next_power_of_2(in_features)


def supports(rows: int, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Where the kernel is the faster choice (measured: see above): 16-bit weights (fp32 ones keep
    cuBLAS, and with it the eager step's exact results), one row (two with programmatic dependent
    launch), and a weight row short enough for a program to hold."""
    max_rows = 2 if programmatic_launch(device) else 1
    return dtype in (torch.bfloat16, torch.float16) and 1 <= rows <= max_rows and _padded(in_features) <= TILE


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels launch with programmatic dependent launch: compute capability 9.0+ (Hopper)
    and a Triton that has it."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
            and hasattr(tl.extra.cuda, "gdc_wait"))


def pdl_options(pdl: bool) -> dict:
    """Launch keywords of a Triton kernel that opts in to programmatic dependent launch (or not)."""
    return {"launch_pdl": True} if pdl else {}


def matvec(x: torch.Tensor, weight: torch.Tensor, pdl: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T in weight's dtype (into `out`, contiguous, if given), launched
    with programmatic dependent launch if `pdl` (which needs compute capability 9.0+)."""
    n_out, k_in = weight.shape
    rows = x.reshape(-1, k_in)
    if rows.stride(-1) != 1 or weight.stride(-1) != 1 or weight.stride(0) != k_in:
        rows, weight = rows.contiguous(), weight.contiguous()
    y = torch.empty(rows.size(0), n_out, device=x.device, dtype=weight.dtype) if out is None else out
    padded = _padded(k_in)
    block = max(1, min(8, TILE // padded))
    _matvec[(triton.cdiv(n_out, block),)](rows, weight, y, n_out, k_in, rows.stride(0), ROWS=rows.size(0), BN=block,
                                          KP=padded, PDL=pdl, num_warps=4, **pdl_options(pdl))
    return y.view(*x.shape[:-1], n_out)


@torch.library.custom_op("nanochat::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T for a few rows of x (see `supports`), in weight's dtype."""
    return matvec(x, weight, programmatic_launch(x.device))


@decode_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.size(0), dtype=weight.dtype)


class FewRowLinear(torch.nn.Linear):
    """nn.Linear for the decoder's copy of the model (nanochat.infer.graphs.decode_copy swaps its
    class in): inputs of rows and weights that `supports` covers go through `decode_linear`, cast
    to the weights' dtype as autocast would; everything else is nn.Linear's (cuBLAS)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if supports(x.numel() // x.size(-1), self.in_features, self.weight.dtype, x.device):
            return decode_linear(x.to(self.weight.dtype), self.weight)
        return super().forward(x)
