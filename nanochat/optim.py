"""
MuonAdamW: one optimizer object with two kinds of parameter groups.

- "muon" groups, for the 2D weight matrices inside the transformer blocks: SGD-momentum whose
  update is orthogonalized by a Newton-Schulz iteration (Muon: Keller Jordan 2024,
  https://kellerjordan.github.io/posts/muon/).
- "adamw" groups, for everything else (token embedding, lm_head): plain AdamW.

A single object matters for mixed precision: torch.amp.GradScaler unscales every .grad of the
optimizer in place, then skips step() as a whole if it found an inf/NaN, so Muon and AdamW
always skip together. step() therefore only reads .grad (nothing cached between steps) and
ignores parameters whose .grad is None (frozen ones, or ones unused this step).

All state is per parameter (momentum buffers, Adam moments, step counts), so torch's default
state_dict()/load_state_dict() round-trip it. Every group has "initial_lr"; a schedule sets
group["lr"] = group["initial_lr"] * multiplier, and a momentum warmup sets group["momentum"].
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

# Quintic Newton-Schulz coefficients from Muon (Keller Jordan 2024), also used by upstream
# nanochat's original Muon: they maximize the slope at zero, so 5 steps push singular values
# into roughly [0.7, 1.2] instead of converging exactly to 1, which trains just as well. (Only
# singular values far below the largest one, as in near-singular square matrices, stay smaller.)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately orthogonalize G (..., rows, cols): U S V^T -> U S' V^T with S' near 1.

    Batched over leading dimensions. Runs in `dtype` (bfloat16 is faster on GPUs that have it;
    never float16, whose range is too small here) and returns that dtype.
    """
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    # Frobenius normalization bounds every singular value by 1, where the iteration converges.
    # The eps keeps an all-zero update (e.g. the first gradient of a layer feeding a zero-init
    # projection) at zero instead of NaN.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = G.size(-2) > G.size(-1)
    if tall:
        # iterate on the wide orientation, so X @ X^T is the smaller (cols x cols) Gram matrix
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def grad_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of all `grads` together, a float32 scalar on their device, computed without waiting on
    it: one foreach pass of per-tensor norms, then the norm of those. Inf or NaN when any gradient holds one,
    so the same number serves the log and the decision to skip a step."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, dtype=torch.float32)))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for "muon" groups, AdamW for "adamw" groups, in one step().

    Group keys:
      adamw: kind, params, lr, betas, eps, weight_decay
      muon:  kind, params (2D), lr, momentum, nesterov, ns_steps, ns_dtype, weight_decay
    Weight decay is decoupled (p *= 1 - lr * weight_decay) in both kinds.
    """

    def __init__(self, param_groups: list[dict]):
        for group in param_groups:
            kind = group.get("kind")
            if kind not in ("muon", "adamw"):
                raise ValueError(f"param group kind must be 'muon' or 'adamw', got {kind!r}")
            if kind == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2D matrices only; put other params in an AdamW group")
        defaults = dict(
            lr=1e-3,
            weight_decay=0.0,
            betas=(0.9, 0.95),
            eps=1e-10,
            momentum=0.95,
            nesterov=True,
            ns_steps=5,
            ns_dtype=torch.float32,
        )
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "adamw":
                self._adamw(group, params)
            else:
                # Same-shape matrices are orthogonalized together as one stacked batch
                by_shape: dict[torch.Size, list[Tensor]] = defaultdict(list)
                for p in params:
                    by_shape[p.shape].append(p)
                for same_shape in by_shape.values():
                    self._muon(group, same_shape)
        return loss

    def _adamw(self, group: dict, params: list[Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            states.append(state)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        # Step counts can differ within a group (a param without grad on some step skips it),
        # hence per-param bias corrections passed as scalar lists.
        bias1 = [1 - beta1 ** s["step"] for s in states]
        bias2 = [1 - beta2 ** s["step"] for s in states]

        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, bias2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bias1])

    def _muon(self, group: dict, params: list[Tensor]) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        # buf = momentum * buf + (1 - momentum) * grad; the Nesterov update looks one step ahead
        # along the new buffer. Out of place, so the caller's .grad is left as it was.
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        ortho = zeropower_via_newtonschulz5(torch.stack(updates), group["ns_steps"], group["ns_dtype"])
        # Orthogonal updates have unit RMS per column; tall matrices (rows > cols) get
        # sqrt(rows / cols) more so their per-element update size matches (as in Muon).
        rows, cols = params[0].shape
        scale = max(1.0, rows / cols) ** 0.5
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-lr * scale)
